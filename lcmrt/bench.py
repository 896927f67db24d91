"""Time an engine folder with the lcmrt runtime: cold start, time per stage, images/s, peak RSS, and each
stage as a fraction of the machine's fp32 roofline (the manifest's FLOPs over the measured GEMM peak).

Runtime-only (numpy and a backend, no torch). `lcmrt bench` and the benchmark harness's lcmrt contender
(`benchmarks/compare.py`) both use it, so the two report the same numbers the same way.

One generation gives a *record*: {"e2e", "text_encoder", "unet_steps": [...], "vae_decode",
"unet_run": [...]}, seconds. `unet_run` is the backend's own kernel call inside each step, timed in the
same step, so `unet_steps[i] - unet_run[i]` is the sampler + runtime overhead of that step.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np

from .manifest import Manifest

DEFAULT_PROMPT = "a watercolor fox in the snow"
# 4096^3 fp32: large enough to reach the kernels' steady state, 0.14 TFLOP per product so a few repeats take
# seconds; the best repeat is the peak.
GEMM_SIZE = 4096
GEMM_REPEATS = 5


def gemm_peak(size: int = GEMM_SIZE, repeats: int = GEMM_REPEATS) -> float:
    """The machine's fp32 GEMM peak in GFLOP/s: the better of numpy's matmul and ONNX Runtime's MatMul (MLAS,
    the kernels the CPU backend runs; often much faster than numpy's BLAS), size^3, best of `repeats`."""
    return max(numpy_gemm_peak(size, repeats), ort_gemm_peak(size, repeats))


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: thread pool, page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def numpy_gemm_peak(size: int = GEMM_SIZE, repeats: int = GEMM_REPEATS) -> float:
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    out = np.empty_like(a)
    return 2.0 * size ** 3 / _best_seconds(lambda: np.matmul(a, b, out=out), repeats) / 1e9


def ort_gemm_peak(size: int = GEMM_SIZE, repeats: int = GEMM_REPEATS) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(_matmul_model(size), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((size, size), dtype=np.float32) for name in ("a", "b")}
    return 2.0 * size ** 3 / _best_seconds(lambda: session.run(None, feeds), repeats) / 1e9


def _matmul_model(size: int) -> bytes:
    """A one-node ONNX model c = a @ b ([size, size] fp32), written as protobuf by hand: the runtime has no
    `onnx` package. Field numbers from onnx/onnx.proto."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def field(number: int, payload) -> bytes:
        if isinstance(payload, int):
            return varint(number << 3) + varint(payload)
        payload = payload.encode() if isinstance(payload, str) else payload
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    dims = field(1, field(1, size)) * 2  # TensorShapeProto.dim: Dimension.dim_value
    tensor_type = field(1, field(1, 1) + field(2, dims))  # TypeProto.tensor_type: elem_type FLOAT, shape

    def value_info(name: str) -> bytes:
        return field(1, name) + field(2, tensor_type)

    node = field(1, "a") + field(1, "b") + field(2, "c") + field(4, "MatMul")
    graph = (field(1, node) + field(2, "gemm") + field(11, value_info("a")) + field(11, value_info("b"))
             + field(12, value_info("c")))
    # ModelProto: ir_version 8, graph, opset_import {domain "", version 18}
    return field(1, 8) + field(7, graph) + field(8, field(1, "") + field(2, 18))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def stage_flops(manifest: Manifest | dict, guided: bool) -> dict[str, float]:
    """FLOPs of one prompt encoding (all text encoders), one UNet step and one VAE decode of a folder's static batch.

    The manifest records each graph's FLOPs at the largest batch it accepts; the UNet runs the static batch,
    or twice it with classifier-free guidance, so its FLOPs are scaled to the batch actually run."""
    manifest = Manifest.of(manifest)
    shapes = manifest.shapes
    unet_batch = shapes.batch * (2 if guided else 1)
    return {
        "text_encoder": sum(float(manifest.component(name).number("flops") or 0.0)  # both of SDXL's
                            for name in manifest.family_info.text_encoders),
        "unet_step": float(manifest.component("unet").number("flops") or 0.0) * unet_batch / max(shapes.unet_batch_sizes),
        "vae_decode": float(manifest.component("vae_decoder").number("flops") or 0.0),
    }


class _KernelTimer:
    """Stands in for a backend session's inner runner and records how long each call took."""

    def __init__(self, inner):
        self._inner = inner
        self.seconds: list[float] = []

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._inner.run(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - start)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def time_generation(pipe, prompt: str = DEFAULT_PROMPT, steps: int = 4, guidance: float = 1.0,
                    num_images: int | None = None, seed: int = 0) -> dict:
    """Run one generation and return its record (see the module docstring)."""
    num_images = num_images or pipe.shapes.batch
    # Every contender encodes the prompt on every call, so lcmrt's prompt cache is emptied first.
    pipe._prompt_cache.clear()
    unet = pipe.sessions["unet"]
    # The ONNX Runtime session keeps its InferenceSession in `_session`: timing that call leaves the input
    # checks of lcmrt's backend wrapper on the overhead side. Other backends are timed at `run`.
    holder, key = (unet.__dict__, "_session") if hasattr(unet, "_session") else (pipe.sessions, "unet")
    timer = _KernelTimer(holder[key])
    holder[key] = timer
    try:
        start = time.perf_counter()
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, seed=seed, num_images=num_images,
             output="np")
        e2e = time.perf_counter() - start
    finally:
        holder[key] = timer._inner
    t = pipe.last_timings
    return {"e2e": e2e, "text_encoder": t["text_encoder"], "unet_steps": list(t["unet_steps"]),
            "vae_decode": t["vae_decode"], "unet_run": timer.seconds, "num_images": num_images}


def measure(folder, backend: str = "auto", steps: int = 4, guidance: float = 1.0, warm_runs: int = 3,
            num_images: int | None = None, prompt: str = DEFAULT_PROMPT, seed: int = 0, **backend_options) -> dict:
    """Load FOLDER, time the first (cold) generation, then `warm_runs` warm ones, in this process.

    Returns {"load_s", "first": record, "warm": [records], "peak_rss_bytes", "backend", "manifest"}; the
    peak RSS is read before anything else (a GEMM peak measurement) adds to it."""
    from .pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.load(folder, backend=backend, **backend_options)
    load_s = time.perf_counter() - start
    args = dict(prompt=prompt, steps=steps, guidance=guidance, num_images=num_images, seed=seed)
    first = time_generation(pipe, **args)
    warm = [time_generation(pipe, **args) for _ in range(warm_runs)]
    return {"load_s": load_s, "first": first, "warm": warm, "peak_rss_bytes": peak_rss_bytes(),
            "backend": pipe.backend, "manifest": pipe.manifest}


def stats(values) -> dict:
    """median, min, max and count of a list of seconds (None for an empty list)."""
    values = [float(v) for v in values]
    if not values:
        return None
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "n": len(values)}


def summarize(warm: list[dict], cold_start_s: list[float], flops: dict | None, gemm_gflops: float | None,
              peak_rss: int | None = None) -> dict:
    """Per-stage statistics of warm records, images/s, cold start, overhead and roofline fractions.

    `flops` are per call of the batch the records ran (`stage_flops`). Shared by `lcmrt bench` and every
    contender of the harness (whose records have the same keys)."""
    steps = [s for r in warm for s in r["unet_steps"]]
    overhead = [s - k for r in warm if r.get("unet_run") for s, k in zip(r["unet_steps"], r["unet_run"])]
    e2e = stats(r["e2e"] for r in warm)
    num_images = warm[0]["num_images"] if warm else 1
    summary = {
        "num_images": num_images,
        "e2e_s": e2e,
        "text_encoder_s": stats(r["text_encoder"] for r in warm),
        "unet_step_s": stats(steps),
        "vae_decode_s": stats(r["vae_decode"] for r in warm),
        "images_per_s": num_images / e2e["median"] if e2e else None,
        "cold_start_s": stats(cold_start_s),
        "cold_over_warm": (float(np.median(cold_start_s)) / e2e["median"]) if cold_start_s and e2e else None,
        "peak_rss_bytes": peak_rss,
        "overhead_per_step_s": stats(overhead),
        "overhead_fraction_of_step": (float(np.median(overhead)) / stats(steps)["median"]) if overhead else None,
    }
    if flops and gemm_gflops:
        peak = gemm_gflops * 1e9
        roofline = {}
        for stage, key in (("unet_step", "unet_step_s"), ("vae_decode", "vae_decode_s"),
                           ("text_encoder", "text_encoder_s")):
            if flops.get(stage) and summary[key] and summary[key]["median"] > 0:
                roofline[stage] = flops[stage] / (summary[key]["median"] * peak)
        summary["roofline_fraction"] = roofline
    return summary


def bench_folder(folder, backend: str = "auto", steps: int = 4, guidance: float = 1.0, repeats: int = 3,
                 prompt: str = DEFAULT_PROMPT, seed: int = 0, gemm_size: int = GEMM_SIZE) -> dict:
    """What `lcmrt bench` prints: one process, load, one cold generation, `repeats` warm ones, GEMM peak."""
    raw = measure(folder, backend=backend, steps=steps, guidance=guidance, warm_runs=repeats, prompt=prompt,
                  seed=seed)
    manifest = raw["manifest"]
    flops = stage_flops(manifest, guided=guidance > 1)
    gflops = gemm_peak(gemm_size)
    cold = raw["load_s"] + raw["first"]["e2e"]
    summary = summarize(raw["warm"], [cold], flops, gflops, raw["peak_rss_bytes"])
    return {
        "folder": str(Path(folder)), "backend": raw["backend"], "steps": steps, "guidance": guidance,
        "shapes": Manifest.of(manifest).data["shapes"], "load_s": raw["load_s"], "first_image_s": raw["first"]["e2e"],
        "gemm_peak_gflops": gflops, "gemm_size": gemm_size, "flops": flops, "summary": summary,
        "records": {"first": raw["first"], "warm": raw["warm"]},
    }
