#!/usr/bin/env bash
# The ctest fixture: tiny engine folders for the native runtime tests, built with the project's Python.
#   DEST/cfg     LCM-LoRA and the style LoRA fused, guidance mode cfg
#   DEST/refit   LCM-LoRA fused, the style LoRA refittable (style-lora, 0.8), plus lcm2 (weight 0)
# Usage: make_tiny_folders.sh PYTHON DEST    (skips the work when DEST/.done exists)
set -euo pipefail
python=$1
dest=$2
[ -f "$dest/.done" ] && exit 0
rm -rf "$dest" && mkdir -p "$dest"
log="$dest/build.log"
lcmrt() { "$python" -m lcmrt "$@" >> "$log" 2>&1 || { cat "$log" >&2; exit 1; }; }
lcmrt random-model "$dest/model" --arch sd15 --size tiny --seed 0 --overwrite
common=("$dest/model/model" --lcm-lora "$dest/model/lcm-lora.safetensors"
        --lora "$dest/model/style-lora.safetensors:0.8" --height 128 --width 128 --guidance-mode cfg --overwrite
        --no-openvino --no-choose-backends)
lcmrt build "${common[@]}" --out "$dest/cfg"
lcmrt build "${common[@]}" --refittable --out "$dest/refit"
lcmrt adapter add "$dest/refit" "$dest/model/lcm-lora.safetensors" --name lcm2
touch "$dest/.done"
