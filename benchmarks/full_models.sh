#!/usr/bin/env bash
# The full-size SD1.5 models and engine folders the benchmarks use (random weights, real architecture).
# Takes ~15 minutes and ~20 GB of disk on a 2-core CPU. Usage: benchmarks/full_models.sh [DIR]
set -euo pipefail
dir=${1:-results/full}
lcmrt=${LCMRT:-.venv/bin/lcmrt}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$dir"
[ -d "$dir/sd15" ] || $lcmrt random-model "$dir/sd15" --arch sd15 --size full --seed 0
# a rank-64 style LoRA over every LCM-LoRA target module (kohya format), for adapter-swap timings
[ -f "$dir/sd15/style-r64.safetensors" ] || $py -m benchmarks.style_lora "$dir/sd15/model" "$dir/sd15/style-r64.safetensors"
common=(--lcm-lora "$dir/sd15/lcm-lora.safetensors" --height 512 --width 512 --overwrite)
[ -d "$dir/fused" ] || $lcmrt build "$dir/sd15/model" "${common[@]}" --out "$dir/fused"
[ -d "$dir/style-fused" ] || $lcmrt build "$dir/sd15/model" "${common[@]}" \
    --lora style="$dir/sd15/style-r64.safetensors":0.8 --out "$dir/style-fused"
[ -d "$dir/style-refit" ] || $lcmrt build "$dir/sd15/model" "${common[@]}" \
    --lora style="$dir/sd15/style-r64.safetensors":0.8 --refittable --out "$dir/style-refit"
