"""Smoke test of benchmarks/img2img_stream.py on the tiny model: every contender runs once and the report has
its keys, positive numbers and the ratios. No timing assertions: CI machines are noisy."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_img2img_stream_tiny(tmp_path):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.img2img_stream", "--size", "tiny", "--rounds", "1",
                           "--frames", "3", "--workdir", str(work)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((work / "bench" / "img2img_stream.json").read_text())
    assert report["settings"]["stream_batch"] == 2 and report["settings"]["height"] == 128
    summary = report["summary"]
    for name in ("lcmrt/img2img", "lcmrt/img2img-tiny", "lcmrt/stream", "lcmrt/stream-tiny", "diffusers/img2img",
                 "diffusers/img2img-tiny"):
        row = summary[name]
        assert row["frame_s_median"] > 0 and row["frames_per_s"] > 0 and row["peak_rss_bytes"] > 0, name
    # the warm-up push fills a batch of 2: every timed push returns a frame
    assert len(report["rounds"][0]["lcmrt/stream"]["frame_s"]) == 3
    assert all(summary["ratios"][key]["median"] > 0 for key in summary["ratios"])
    assert "stream_over_img2img" in proc.stdout
