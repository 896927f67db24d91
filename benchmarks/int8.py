"""The int8 UNet against the fp32 one on the same folder and backend, on this CPU, in one run.

    lcmrt build --engines-only results/full/fused --int8 --no-ort-cpu-graphs --no-choose-backends  # once
    python -m benchmarks.int8 results/full/fused [--backend openvino] [--rounds 5] [--steps 4] [--json FILE]

`--backend onnxruntime` (default) compares ONNX Runtime's int8 graph (`unet.int8.onnx`) with its fp32 graph;
`--backend openvino` the int8-weight OpenVINO model (`unet.openvino-int8.xml`) with the fp32 OpenVINO model.
Measures the UNet step of both alternating in one process (per-round ratios), the UNet output's difference
on those inputs and on the build's seeded fidelity inputs (from the manifest), the 4-step image of both
pipelines for one seed (PSNR, max abs diff), and the peak RSS of a process holding each pipeline (OpenVINO:
loading from its model cache, which the runs before fill). int8 accuracy and speed depend on the instruction
set (VNNI or not, see lcmrt/cpu.py): the report names it.
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
BACKENDS = ("onnxruntime", "openvino")


def unet_steps(folder: str, rounds: int, backend: str) -> dict:
    """Both UNets loaded side by side (ONNX Runtime: plain graphs, its default optimizations), run alternately."""
    from lcmrt.backends import get_backend
    from lcmrt.manifest import read_manifest

    manifest = read_manifest(folder)
    feeds = unet_feeds(manifest)
    sessions = {p: get_backend(backend, precision=p).load(Path(folder), manifest, "unet") for p in PRECISIONS}
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


def images(folder: str, steps: int, backend: str, seed: int = 0) -> dict:
    """The same seed through the fp32 and the int8 pipeline (one at a time: memory)."""
    import lcmrt
    from lcmrt.engines.graphs import psnr

    out = {}
    for p in PRECISIONS:
        pipe = lcmrt.Pipeline.load(folder, backend=backend, precision=p)
        out[p] = pipe("a watercolor fox in the snow", num_inference_steps=steps, seed=seed, output="np")
        del pipe
    return {"steps": steps, "seed": seed, "psnr_db": psnr(out["fp32"], out["int8"]),
            "max_abs_diff": float(np.abs(out["int8"] - out["fp32"]).max())}


def runtime_version(backend: str) -> str:
    if backend == "openvino":
        from lcmrt.backends.openvino import openvino_version

        return f"OpenVINO {openvino_version()}"
    import onnxruntime

    return f"ONNX Runtime {onnxruntime.__version__}"


def main() -> None:
    from lcmrt.cpu import cpu_description, has_int8_vnni
    from lcmrt.manifest import INT8, OPENVINO_INT8, read_manifest

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    name = {"onnxruntime": INT8, "openvino": OPENVINO_INT8}[args.backend]
    graph = read_manifest(args.folder).component("unet").variants.get(name)
    if graph is None:
        raise SystemExit(f"{args.folder} has no {name} UNet: run `lcmrt build --engines-only {args.folder} --int8`"
                         + (" where OpenVINO and NNCF are installed." if args.backend == "openvino" else "."))
    variant = graph.data
    cpu = {**cpu_description(), "runtime": runtime_version(args.backend)}
    result = {"backend": args.backend, "cpu": cpu, "int8_vnni": has_int8_vnni(cpu["isa"]),
              "quantization": variant["quantization"], "build_fidelity": variant["fidelity"]}
    result.update(unet_steps(args.folder, args.rounds, args.backend))
    result["image"] = images(args.folder, args.steps, args.backend)
    result["peak_rss_gb"] = {p: peak_rss_gb(args.folder, backend=args.backend, precision=p) for p in PRECISIONS}
    step, ratios = result["unet_step_s"], result["speedup_per_round"]
    build = variant["fidelity"]["outputs"]["noise_pred"]
    print(f"CPU: {cpu['machine']} {' '.join(cpu['isa'])} ({'with' if result['int8_vnni'] else 'without'} VNNI), "
          f"{cpu['runtime']}")
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
