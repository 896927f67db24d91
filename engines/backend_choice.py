"""The fastest CPU backend per component, measured at build time on this machine.

Which backend runs a graph fastest depends on the component and the CPU: on a 2-core AVX2 EPYC, OpenVINO
ran the full-size UNet and VAE decoder faster than ONNX Runtime, and the text encoder is too small for it
to matter. The build loads each component with every CPU backend installed, exactly as the runtime would
(pre-optimized graph, OpenVINO model, refit inputs), runs it on seeded inputs at the folder's first size
and the batch of an unguided call (one warm-up run, then `RUNS` timed ones), in `ROUNDS` rounds that
alternate the backends' order, and records the median seconds per backend, each backend's largest
difference from ONNX Runtime's output, and the choice in the manifest (`backend_choice`). `backend="auto"` follows it on a CPU of the same class (`lcmrt.backends.chosen`).

One backend's session is loaded at a time, so measuring needs no more memory than running. A backend must
beat ONNX Runtime, the default, by `MARGIN` to be chosen: a difference within a noisy machine's spread is
not worth a second runtime. The choice weighs speed only; the resident memory each backend's session adds
(anonymous and file-backed pages: OpenVINO keeps its model file mapped beside its repacked weights) is
recorded and shown by `lcmrt info`, so the trade-off is visible. Measure on an otherwise idle machine: ONNX
Runtime's spinning thread pool loses more than OpenVINO's when other processes compete for the cores.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from datetime import datetime, timezone

import numpy as np

from ..backends import get_backend
from ..backends.chosen import DEFAULT_CPU_BACKEND, installed_cpu_backends
from ..cpu import cpu_class
from ..manifest import Manifest
from .fp16 import _vocab_size, example_inputs

RUNS = 2  # timed runs per round, after a warm-up run
ROUNDS = 2
SEED = 0
MARGIN = 0.97  # another backend is chosen when its median is below 97% of ONNX Runtime's
# A backend whose outputs differ from ONNX Runtime's by more than this, relative to the output's peak, is not
# chosen: two correct fp32 backends differ by float reassociation only (OpenVINO vs ONNX Runtime: ~1e-6).
MAX_RELATIVE_DIFF = 1e-3


def time_session(session, feeds: dict[str, np.ndarray], runs: int) -> tuple[float, dict[str, np.ndarray]]:
    """The median seconds of `runs` runs after a warm-up run, and the outputs."""
    outputs = session.run(feeds)  # first-run allocations and lazy initialisation are not what is compared
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        outputs = session.run(feeds)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), outputs


def resident_bytes() -> int:
    """This process's resident memory now, anonymous and file-backed pages (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return 0
    return sum(int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile") if key in fields)


def max_abs_diff(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(outputs[name].astype(np.float64) - value))) for name, value in reference.items())


def pick(ratios: dict[str, float], diffs: dict[str, float], peak: float) -> str:
    """The backend to run a component on, from each backend's time over ONNX Runtime's: the fastest whose
    outputs match ONNX Runtime's, if it beats ONNX Runtime by `MARGIN`; else ONNX Runtime."""
    limit = MAX_RELATIVE_DIFF * max(1.0, peak)
    valid = [b for b in ratios if b == DEFAULT_CPU_BACKEND or diffs.get(b, np.inf) <= limit]
    fastest = min(valid, key=lambda b: ratios[b])
    return fastest if ratios[fastest] < MARGIN else DEFAULT_CPU_BACKEND


def measure_component(folder, manifest: Manifest, component: str, backends, runs: int = RUNS,
                      rounds: int = ROUNDS) -> dict:
    """Time `component` on each of `backends` (ONNX Runtime first: the reference) and return its choice entry.
    Every backend's outputs are compared with ONNX Runtime's on the same inputs.
    Rounds alternate the order (A B, B A, ...), so a machine getting busier or quieter favours neither; each
    backend's time is the median over rounds, and its ratio to ONNX Runtime the median of per-round ratios."""
    feeds = example_inputs(manifest, component, SEED, _vocab_size(folder, manifest), smallest_batch=True)
    per_round = {name: [] for name in backends}
    held = dict.fromkeys(backends, 0)  # resident memory a loaded, run session adds, the largest over rounds
    diffs, reference, peak = {}, None, 0.0
    for round_index in range(rounds):
        for name in backends if round_index % 2 == 0 else backends[::-1]:
            before = resident_bytes()
            session = get_backend(name).load(folder, manifest, component)
            seconds, outputs = time_session(session, feeds, runs)
            per_round[name].append(seconds)
            held[name] = max(held[name], resident_bytes() - before)
            del session
            gc.collect()  # the next backend loads into the memory this one held
            if reference is None:  # round 0 starts with ONNX Runtime
                reference = {k: v.astype(np.float64) for k, v in outputs.items()}
                peak = max(float(np.max(np.abs(v))) for v in reference.values())
            elif name != DEFAULT_CPU_BACKEND:
                diffs[name] = max(diffs.get(name, 0.0), max_abs_diff(reference, outputs))
    ratios = {name: statistics.median(t / r for t, r in zip(times, per_round[DEFAULT_CPU_BACKEND]))
              for name, times in per_round.items()}
    return {"backend": pick(ratios, diffs, peak),
            "seconds": {name: statistics.median(times) for name, times in per_round.items()},
            "ratios": ratios, "max_abs_diff": diffs, "resident_bytes": held}


def choose_backends(folder, manifest: Manifest | dict, runs: int = RUNS, rounds: int = ROUNDS, log=None) -> dict:
    """Measure every component of the engine folder on every installed CPU backend; record and return the
    `backend_choice` entry. `log` (print-like) receives one line per component."""
    manifest = Manifest.of(manifest)
    backends = installed_cpu_backends()
    components = {}
    for component in manifest.components:
        components[component] = entry = measure_component(folder, manifest, component, backends, runs, rounds)
        if log is not None:
            figures = ", ".join(f"{b} {s * 1e3:.1f} ms" for b, s in entry["seconds"].items())
            log(f"{component}: {figures} -> {entry['backend']}")
    choice = {
        "cpu": cpu_class(),
        "threads": os.cpu_count(),
        "versions": _versions(backends),
        "runs": runs,
        "rounds": rounds,
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "components": components,
    }
    manifest.set_backend_choice(choice)
    return choice


def _versions(backends) -> dict[str, str]:
    versions = {}
    if "onnxruntime" in backends:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    if "openvino" in backends:
        from ..backends.openvino import openvino_version

        versions["openvino"] = openvino_version()
    return versions


__all__ = ["choose_backends", "measure_component", "pick"]
