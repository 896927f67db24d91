"""benchmarks/native.py on the tiny folder: both runtimes run, in alternating rounds, and write the same image."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_native_benchmark_runs_both_runtimes(native_build, tiny_engine, tmp_path):
    out = tmp_path / "native.json"
    subprocess.run([sys.executable, "-m", "benchmarks.native", str(tiny_engine), "--build", str(native_build),
                    "--rounds", "2", "--repeat", "2", "--steps", "2", "--json", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["image_max_difference_levels"] <= 1
    for name in ("native", "python"):
        stats = result["summary"][name]
        assert len(result["processes"][name]) == 2 and all(len(p["runs"]) == 2 for p in result["processes"][name])
        assert stats["peak_rss_gb"] > 0.01 and stats["cold_start"] >= stats["total"] > 0
    assert len(result["python_over_native_per_round"]) == 2
    assert result["native_sizes_bytes"]["liblcmrt.so"] > 100_000 and "libonnxruntime.so.1" in result["native_sizes_bytes"]
