"""Smoke test of the benchmark harness (benchmarks/compare.py) on the tiny model: every contender but those in
venvs of their own runs once and the report has its keys and positive numbers. No timing assertions: CI
machines are noisy."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("e2e_s", "text_encoder_s", "unet_step_s", "vae_decode_s", "cold_start_s")


@pytest.mark.slow
def test_compare_tiny(tiny_model, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # the harness's model layout (WORKDIR/ARCH/model, WORKDIR/ARCH/lcm-lora.safetensors), from the shared fixture
    (work / "sd15").symlink_to(Path(tiny_model["model"]).parent, target_is_directory=True)
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--arch", "sd15", "--size", "tiny", "--height", "64",
         "--width", "64", "--steps", "2", "--repeats", "1", "--no-peer-venvs", "--baseline-steps", "2",
         "--gemm-size", "512", "--workdir", str(work), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "compare.json").read_text())

    names = [row["contender"] for row in report["contenders"]]
    assert names[0] == "lcmrt/onnxruntime-cpu" and "diffusers/lcm" in names and "diffusers/default-2" in names
    assert not report["failed"]
    assert any("--no-peer-venvs" in note for note in report["notes"])
    assert report["machine"]["gemm_peak_gflops"] > 0
    assert report["flops_per_image"]["unet_step"] > 0 and report["flops_per_image"]["vae_decode"] > 0
    for row in report["contenders"]:
        for key in STAGES:
            assert row[key]["median"] > 0, (row["contender"], key)
        assert row["images_per_s"] > 0 and row["peak_rss_bytes"] > 0
        assert 0 < row["roofline_fraction"]["unet_step"] and 0 < row["roofline_fraction"]["vae_decode"]
        if not row["contender"].startswith("diffusers/default"):  # PNDM adds a warm-up step of its own
            assert len(row["records"][0]["warm"][0]["unet_steps"]) == row["steps"]
    lcmrt = report["contenders"][0]
    assert lcmrt["overhead_per_step_s"]["n"] == 2
    ratios = report["ratios"]["lcmrt/onnxruntime-cpu"]
    assert ratios["diffusers/lcm"]["e2e"]["median"] > 0 and ratios["diffusers/default-2"]["e2e"]["median"] > 0
    goals = report["goals"]["lcmrt/onnxruntime-cpu"]
    assert set(goals) == set(compare.GOALS)
    assert goals["e2e_speedup_vs_diffusers_lcm"]["value"] == ratios["diffusers/lcm"]["e2e"]["median"]
    assert goals["e2e_speedup_vs_optimum"]["met"] is None  # not measured
    diffusers = next(row for row in report["contenders"] if row["contender"] == "diffusers/lcm")
    assert goals["peak_rss_over_diffusers"]["value"] == pytest.approx(lcmrt["peak_rss_bytes"] / diffusers["peak_rss_bytes"])
    assert (out / "stages.png").stat().st_size > 0 and (out / "summary.png").stat().st_size > 0
    assert "lcmrt/onnxruntime-cpu vs diffusers/lcm" in proc.stdout


def test_lcmrt_bench_command(tiny_engine, tmp_path):
    """`lcmrt bench FOLDER` on the tiny engine folder (the runtime-only part)."""
    from click.testing import CliRunner

    from lcmrt.cli import cli

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(cli, ["bench", str(tiny_engine), "--steps", "2", "--repeats", "2",
                                      "--gemm-size", "512", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "UNet step" in result.output and "of roofline" in result.output
    report = json.loads(out.read_text())
    s = report["summary"]
    assert s["e2e_s"]["n"] == 2 and s["unet_step_s"]["n"] == 4 and s["images_per_s"] > 0
    assert s["peak_rss_bytes"] > 0 and report["gemm_peak_gflops"] > 0
    assert s["roofline_fraction"]["unet_step"] > 0 and s["overhead_per_step_s"]["n"] == 4
