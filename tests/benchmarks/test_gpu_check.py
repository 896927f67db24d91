"""benchmarks/gpu_check.sh end to end on the tiny model, with TensorRT and CuPy replaced by the CPU stand-in
(tests/gpu_standin) in every process the script starts: a GPU machine's one short run must not be the first
time the script runs. Steps that need real CUDA (Polygraphy, ONNX Runtime's CUDA provider) are skipped by the
script with a line saying so."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Module shims that make `import tensorrt` / `import cupy` give the stand-in; they exist only in this test's
# temporary folder, which only the script's processes have on their path.
SHIMS = {
    "tensorrt.py": "import sys\nfrom gpu_standin import tensorrt as _standin\nsys.modules[__name__] = _standin\n",
    "cupy.py": ("import sys\nfrom gpu_standin import cupy as _standin\nsys.modules[__name__] = _standin\n"
                "sys.modules[__name__ + '.cuda'] = _standin.cuda\n"),
}
STANDIN_RUNS = ("environment", "gpu tests", "tiny: random model", "tiny: build onnx", "tiny: fp16 + tensorrt engines",
                "tiny: parity + adapter swap", "tiny: benchmark harness")
REAL_GPU_ONLY = ("tiny: engines vs onnxruntime (polygraphy)", "tiny: onnxruntime-cuda parity")


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_standin(tmp_path):
    shims = tmp_path / "shims"
    shims.mkdir()
    for name, text in SHIMS.items():
        (shims / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shims), str(ROOT / "tests")]),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "PYTHON": sys.executable, "SIZES": "tiny", "GPU_CHECK_STANDIN": "1", "BENCH_REPEATS": "1",
           "COVERAGE_FILE": str(tmp_path / ".coverage")}  # the inner pytest must not replace this run's data
    work = tmp_path / "work"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(work)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    steps = {row["step"]: row for row in map(json.loads, (work / "results.jsonl").read_text().splitlines())}
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert {s: steps[s]["status"] for s in STANDIN_RUNS} == {s: "ok" for s in STANDIN_RUNS}
    assert {s: steps[s]["status"] for s in REAL_GPU_ONLY} == {s: "skipped" for s in REAL_GPU_ONLY}
    assert "CPU stand-in" in steps["environment"]["detail"]
    gpu_tests = steps["gpu tests"]["detail"]  # the GPU tests themselves ran on the stand-in
    assert re.search(r"\b[1-9]\d* passed", gpu_tests) and not re.search(r"failed|error|skipped", gpu_tests), gpu_tests
    parity = json.loads(steps["tiny: parity + adapter swap"]["detail"].split("; ", 1)[1])
    assert [row["backend"] for row in parity] == ["tensorrt"]
    assert parity[0]["psnr_db"] > 60 and parity[0]["swap_roundtrip_psnr_db"] == float("inf")
