#!/usr/bin/env bash
# One-shot GPU check, for a fresh GPU machine with `pip install -e ".[gpu,build,test]"` done:
#   GPU tests; tiny and full-size builds with fp16 graphs and TensorRT engines; each engine against ONNX
#   Runtime through Polygraphy (benchmarks/trt_compare.py, one table per size); image parity of the
#   TensorRT and ONNX Runtime CUDA backends against the CPU fp32 image; adapter swap timing; the benchmark
#   harness on the GPU backends. Prints one summary table at the end; exits non-zero if any step failed.
# Usage: benchmarks/gpu_check.sh [WORKDIR]   (default: ./gpu-check; SIZES="tiny full" to choose sizes)
set -u -o pipefail
WORK=${1:-gpu-check}
SIZES=${SIZES-"tiny full"}  # SIZES="" runs only the environment and GPU-test steps
PY=${PYTHON:-python}
BENCH_REPEATS=${BENCH_REPEATS:-3}
# Set by tests/benchmarks/test_gpu_check.py, which runs this script in CI with TensorRT and CuPy replaced by
# the CPU stand-in (tests/gpu_standin): steps that need real CUDA are then skipped with a line saying so.
STANDIN=${GPU_CHECK_STANDIN:-}
mkdir -p "$WORK"
RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
FAILED=0

record() {  # record STEP STATUS DETAIL
    "$PY" -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "status": sys.argv[2], "detail": sys.argv[3]}))' \
        "$1" "$2" "$3" >> "$RESULTS"
    [ "$2" = "FAIL" ] && FAILED=1
    return 0
}

skip() {  # skip STEP WHY
    echo "== $1: skipped: $2"
    record "$1" skipped "$2"
}

run() {  # run STEP COMMAND...: the command's last output line is the detail
    local step=$1; shift
    echo "== $step: $*"
    local log="$WORK/$(echo "$step" | tr ' /' '__').log"
    local start=$SECONDS
    if "$@" > "$log" 2>&1; then
        record "$step" ok "$(( SECONDS - start ))s; $(tail -n 1 "$log")"
    else
        record "$step" FAIL "$(( SECONDS - start ))s; see $log: $(tail -n 1 "$log")"
    fi
}

run "environment" "$PY" - <<'PY'
import cupy, onnxruntime as ort, tensorrt as trt
from lcmrt.backends.tensorrt import gpu_compute_capability
name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
print(f"{name}, compute capability {gpu_compute_capability(0)}, TensorRT {trt.__version__}, "
      f"onnxruntime {ort.__version__} {ort.get_available_providers()}")
PY

run "gpu tests" "$PY" -m pytest -m gpu tests -q -rs -p no:cacheprovider

for SIZE in $SIZES; do
    if [ "$SIZE" = tiny ]; then RES=128; else RES=512; fi
    MODEL="$WORK/model-$SIZE"
    FOLDER="$WORK/engines-$SIZE"
    run "$SIZE: random model" lcmrt random-model "$MODEL" --size "$SIZE" --overwrite
    run "$SIZE: build onnx" lcmrt build "$MODEL/model" --lcm-lora "$MODEL/lcm-lora.safetensors" \
        --lora "style=$MODEL/style-lora.safetensors:0.8" --height "$RES" --width "$RES" --guidance-mode cfg \
        --refittable --out "$FOLDER" --overwrite --quiet
    run "$SIZE: fp16 + tensorrt engines" lcmrt build --engines-only "$FOLDER" --backend tensorrt --fp16
    if [ -n "$STANDIN" ]; then
        skip "$SIZE: engines vs onnxruntime (polygraphy)" "Polygraphy drives TensorRT through CUDA itself: real GPU only"
    else
        run "$SIZE: engines vs onnxruntime (polygraphy)" "$PY" -m benchmarks.trt_compare "$FOLDER"
    fi
    BACKENDS="tensorrt onnxruntime-cuda"
    if [ -n "$STANDIN" ]; then
        BACKENDS="tensorrt"
        skip "$SIZE: onnxruntime-cuda parity" "ONNX Runtime's CUDA provider: real GPU only"
    fi
    run "$SIZE: parity + adapter swap" "$PY" - "$FOLDER" $BACKENDS <<'PY'
import json, sys, time
import numpy as np
from lcmrt import Pipeline
from lcmrt.engines.fp16 import image_fidelity

folder = sys.argv[1]
args = dict(prompt="a lighthouse on a cliff at sunset", num_inference_steps=4, guidance_scale=1.0, seed=7,
            output="np")
ref = Pipeline.load(folder, backend="onnxruntime-cpu")(**args)
rows = []
for backend in sys.argv[2:]:
    pipe = Pipeline.load(folder, backend=backend)
    pipe(**args)  # warm-up (CUDA graph capture, cuDNN autotune)
    start = time.perf_counter()
    image = pipe(**args)
    seconds = time.perf_counter() - start
    fid = image_fidelity(ref, image)
    row = {"backend": backend, "psnr_db": round(fid["psnr_db"], 2), "max_abs_diff": round(fid["max_abs_diff"], 4),
           "seconds": round(seconds, 4), "finite": bool(np.all(np.isfinite(image)))}
    # only refittable adapters can be swapped (the LCM-LoRA is fused): the style LoRA, built --refittable
    built = {a.name: a.weight for a in pipe.manifest.adapters if not a.fused}
    if built:
        swaps = []
        for weights in ({n: 0.0 for n in built}, {n: 1.0 for n in built}, built):
            start = time.perf_counter()
            pipe.set_adapters(weights)
            swaps.append(time.perf_counter() - start)
        row["adapter_swap_s"] = round(float(np.median(swaps)), 4)
        # back to the original weights: the image must be the one before the swaps (refit from pristine)
        row["swap_roundtrip_psnr_db"] = round(image_fidelity(image, pipe(**args))["psnr_db"], 2)
    rows.append(row)
    assert row["finite"], f"{backend}: NaN/inf in the image"
    assert row["psnr_db"] > 30, f"{backend}: PSNR {row['psnr_db']} dB against the CPU fp32 image"
print(json.dumps(rows))
PY
done

# The harness runs lcmrt on every backend this machine has (tensorrt, onnxruntime-cuda/-trt here).
for SIZE in $SIZES; do
    run "$SIZE: benchmark harness" "$PY" -m benchmarks.compare --size "$SIZE" --no-peer-venvs \
        --contenders lcmrt,diffusers-lcm --workdir "$WORK/bench-$SIZE" --repeats "$BENCH_REPEATS"
done

"$PY" - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
width = max(len(r["step"]) for r in rows)
print()
print(f"{'step':<{width}}  status  detail")
print(f"{'-' * width}  ------  {'-' * 60}")
for r in rows:
    print(f"{r['step']:<{width}}  {r['status']:<6}  {r['detail'][:240]}")
PY
exit $FAILED
