"""The int8 UNet against the fp32 one on the same folder, on this CPU, in one run.

    lcmrt build --engines-only results/full/fused --int8 --no-ort-cpu-graphs   # once: adds unet.int8.onnx
    python -m benchmarks.int8 results/full/fused [--rounds 5] [--steps 4] [--json results/full/int8.json]

Measures the UNet step of both graphs alternating in one process (per-round ratios), the UNet output's
difference on those inputs and on the build's seeded fidelity inputs (from the manifest), the 4-step image
of both pipelines for one seed (PSNR, max abs diff), and the peak RSS of a process holding each pipeline.
int8 accuracy and speed depend on the instruction set (VNNI or not, see lcmrt/cpu.py): the report names it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.refit import peak_rss_gb
from benchmarks.refit_strategies import unet_feeds

PRECISIONS = ("fp32", "int8")


def unet_steps(folder: str, rounds: int) -> dict:
    """Both UNets loaded side by side (plain graphs, ONNX Runtime's default optimizations), run alternately."""
    from lcmrt.backends import get_backend
    from lcmrt.manifest import read_manifest

    manifest = read_manifest(folder)
    feeds = unet_feeds(manifest)
    sessions = {p: get_backend("onnxruntime", precision=p).load(Path(folder), manifest, "unet") for p in PRECISIONS}
    assert sessions["int8"].precision == "int8", f"{folder} has no int8 UNet: run lcmrt build --engines-only --int8"
    outputs = {p: sessions[p].run(feeds)["noise_pred"] for p in PRECISIONS}  # warm-up
    times = {p: [] for p in PRECISIONS}
    for _ in range(rounds):
        for p in PRECISIONS:
            start = time.perf_counter()
            sessions[p].run(feeds)
            times[p].append(time.perf_counter() - start)
    diff = float(np.abs(outputs["int8"] - outputs["fp32"]).max())
    return {"unet_step_s": {p: statistics.median(t) for p, t in times.items()}, "unet_step_runs_s": times,
            "speedup_per_round": [a / b for a, b in zip(times["fp32"], times["int8"])],
            "unet_max_abs_diff": diff, "unet_relative_diff": diff / float(np.abs(outputs["fp32"]).max())}


def images(folder: str, steps: int, seed: int = 0) -> dict:
    """The same seed through the fp32 and the int8 pipeline (one at a time: memory)."""
    import lcmrt
    from lcmrt.engines.graphs import psnr

    out = {}
    for p in PRECISIONS:
        pipe = lcmrt.Pipeline.load(folder, precision=p)
        out[p] = pipe("a watercolor fox in the snow", num_inference_steps=steps, seed=seed, output="np")
        del pipe
    return {"steps": steps, "seed": seed, "psnr_db": psnr(out["fp32"], out["int8"]),
            "max_abs_diff": float(np.abs(out["int8"] - out["fp32"]).max())}


def main() -> None:
    from lcmrt.backends.onnxruntime import cpu_graph_key
    from lcmrt.cpu import has_int8_vnni
    from lcmrt.manifest import INT8, read_manifest

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    graph = read_manifest(args.folder).component("unet").variants.get(INT8)
    if graph is None:
        raise SystemExit(f"{args.folder} has no int8 UNet: run `lcmrt build --engines-only {args.folder} --int8`.")
    variant = graph.data
    cpu = cpu_graph_key()
    # peak RSS first, while this process is small
    result = {"cpu": cpu, "int8_vnni": has_int8_vnni(cpu["isa"]), "quantization": variant["quantization"],
              "build_fidelity": variant["fidelity"],
              "peak_rss_gb": {p: peak_rss_gb(args.folder, precision=p) for p in PRECISIONS}}
    result.update(unet_steps(args.folder, args.rounds))
    result["image"] = images(args.folder, args.steps)
    step, ratios = result["unet_step_s"], result["speedup_per_round"]
    build = variant["fidelity"]["outputs"]["noise_pred"]
    print(f"CPU: {cpu['machine']} {' '.join(cpu['isa'])} ({'with' if result['int8_vnni'] else 'without'} VNNI), "
          f"ONNX Runtime {cpu['onnxruntime']}")
    print(f"UNet step: fp32 {step['fp32']:.2f} s, int8 {step['int8']:.2f} s: {statistics.median(ratios):.2f}x "
          f"(per round {min(ratios):.2f}-{max(ratios):.2f}x); peak RSS fp32 {result['peak_rss_gb']['fp32']:.2f} GB, "
          f"int8 {result['peak_rss_gb']['int8']:.2f} GB")
    print(f"UNet output vs fp32: {result['unet_relative_diff']:.2%} of peak here, {build['relative']:.2%} on the "
          f"build's seeded inputs (measured on {' '.join(variant['fidelity']['measured_on']['isa'])})")
    print(f"{args.steps}-step image vs fp32: PSNR {result['image']['psnr_db']:.1f} dB, "
          f"max abs diff {result['image']['max_abs_diff']:.2e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
