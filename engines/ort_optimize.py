"""Pre-optimized ONNX Runtime CPU graphs: run ONNX Runtime's graph optimizations once at build time.

At ORT_ENABLE_ALL, ONNX Runtime rewrites the UNet (fusions, NCHWc convolution layouts, constant folding)
for 10-25 s at every session creation on a 2-core CPU. The rewritten graph is saved here
(`<component>.ort-cpu.onnx`, weights in `.data` beside it) and the runtime loads it with optimizations
off. Layout choices depend on the CPU's instruction set, so the graph is keyed by ONNX Runtime version,
machine and ISA; the runtime uses it only where the key matches. Components whose weights are refit at
run time keep the plain graph: the optimized one folds weights under new names.
"""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..backends.onnxruntime import cpu_graph_key
from ..folder_update import fresh_graph_name
from ..manifest import PRE_OPTIMIZED, Manifest, file_sha256


def optimize_component(folder: Path, manifest: Manifest | dict, component: str) -> dict:
    """Write `<component>.ort-cpu.onnx` (+ `.data`) and return its variant entry."""
    entry = Manifest.of(manifest).component(component).graph_fp32
    graph = fresh_graph_name(folder, Manifest.of(manifest), component, PRE_OPTIMIZED)  # the old one stays until the commit
    data = f"{graph}.data"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / graph)
    options.log_severity_level = 3  # its "hardware specific" warning is what the key below handles
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(folder / entry.file), sess_options=options, providers=["CPUExecutionProvider"])
    files = [name for name in (graph, data) if (folder / name).is_file()]
    return {"file": graph, "sha256": {name: file_sha256(folder / name) for name in files},
            "precision": entry.precision, "key": cpu_graph_key()}


def optimize_folder(folder: Path, manifest: Manifest | dict) -> dict[str, dict]:
    """Pre-optimize every component that is not refit at run time (any adapter added later may target
    them); record them as manifest variants."""
    manifest = Manifest.of(manifest)
    skip = manifest.refit_components
    variants = {}
    for component in manifest.components:
        if component not in skip:
            variants[component] = optimize_component(folder, manifest, component)
            manifest.set_variant(component, PRE_OPTIMIZED, variants[component])
    return variants
