#!/usr/bin/env bash
# Full-size SDXL-family builds (random weights, real architectures): wall time, peak RSS and size on disk of
# `lcmrt random-model` and of `lcmrt build` (LCM-LoRA fused, 1024x1024) per family, one line each in
# DIR/xl-build.txt. Needs ~10 GB of disk per family for the model and as much for its engine folder.
# Usage: benchmarks/full_xl_build.sh [DIR] [FAMILY ...]   (families: ssd1b sdxl; default both)
# BUILD_ARGS adds build options, e.g. BUILD_ARGS=--no-ort-cpu-graphs to leave out the pre-optimized CPU graphs
# (as much disk again as the graphs).
set -euo pipefail
dir=${1:-results/full}
shift || true
if [ $# -gt 0 ]; then families=("$@"); else families=(ssd1b sdxl); fi
lcmrt=${LCMRT:-.venv/bin/lcmrt}
size=${SIZE:-1024}
mkdir -p "$dir"
report="$dir/xl-build.txt"

measure() {  # measure LABEL COMMAND...: one line "LABEL: S s, peak RSS G GB" in the report
  local label=$1 log
  shift
  log=$(mktemp)
  /usr/bin/time -f "%e %M" -o "$log" "$@"
  read -r seconds kb < "$log"
  rm -f "$log"
  printf '%s: %.0f s, peak RSS %.1f GB\n' "$label" "$seconds" "$(echo "$kb / 1048576" | bc -l)" | tee -a "$report"
}

for arch in "${families[@]}"; do
  [ -d "$dir/$arch" ] || measure "random-model $arch full" $lcmrt random-model "$dir/$arch" --arch "$arch" --size full
  rm -rf "$dir/$arch-fused"
  measure "build $arch ${size}x${size}" $lcmrt build "$dir/$arch/model" --lcm-lora "$dir/$arch/lcm-lora.safetensors" \
      --height "$size" --width "$size" --out "$dir/$arch-fused" --quiet ${BUILD_ARGS:-}
  echo "$arch engine folder: $(du -sh "$dir/$arch-fused" | cut -f1) ($(du -sh "$dir/$arch/model" | cut -f1) model)" | tee -a "$report"
done
