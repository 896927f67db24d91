"""INT8 graphs: quantize an engine folder's fp32 graphs to `<component>.int8.onnx`, and measure them.

ONNX Runtime's dynamic quantization (`onnxruntime.quantization.quantize_dynamic`): the weights of MatMul and
Gemm nodes with a constant B are stored as int8 with one scale per output channel; activations are quantized
to uint8 per tensor at run time (DynamicQuantizeLinear), and at session creation ONNX Runtime fuses the
products into DynamicQuantizeMatMul / MatMulIntegerToFloat kernels (VNNI int8 dot products where present).
No calibration data is needed, which suits random and real weights alike. Weights use 7 bits of the int8
range (`reduce_range`): on x86 CPUs without VNNI the u8s8 products saturate with full-range weights
(`lcmrt/cpu.py` says why), and 7 bits keep one int8 graph accurate on every x86 CPU. Attention score products
(Q @ K^T, both activations) stay fp32, and so do convolutions (see `INT8_OP_TYPES`). On the full SD1.5 UNet
the quantized products are 233 of 803 GFLOP per step (convolutions 444, attention scores 126).

This is an opt-in, lossy option: fidelity is measured in ONNX Runtime, int8 graph against fp32 graph on the
same seeded inputs, and recorded in the manifest next to the variant with the CPU it was measured on
(`measured_on`: ONNX Runtime version, machine, instruction-set flags). Graph inputs and outputs stay float32,
so the runtime feeds both precisions the same arrays. Components whose weights are refit at run time are
refused: quantization replaces the weights the refit map names.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..backends.onnxruntime import cpu_graph_key
from ..errors import ExportError
from ..folder_update import fresh_graph_name
from ..manifest import INT8, INT8_SUFFIX, Manifest, file_sha256
from .fp16 import FIDELITY_SEED, IMAGE_OUTPUTS, _vocab_size, example_inputs
from .graphs import EXTERNAL_DATA_THRESHOLD, compare_graphs

# MatMul/Gemm only. Full SD1.5 UNet step, AVX-512 VNNI CPU, ONNX Runtime 1.31, 2 threads: fp32 5.9 s, these
# int8 4.9 s; with Conv too (ConvInteger) 14.5 s and 4x the error (README.md, "Trading fidelity for speed").
INT8_OP_TYPES = ("MatMul", "Gemm")
# One weight scale per output channel, the usual choice for weights (per tensor measured the same on the tiny model).
INT8_PER_CHANNEL = True
# 7-bit weights: ONNX Runtime's remedy for u8s8 saturation on AVX2 / AVX-512 without VNNI. Tiny UNet, max abs
# diff vs fp32 relative to its peak, 3 seeded inputs, ONNX Runtime 1.32: full range 0.56-0.67% on AVX-512
# VNNI but 5.4-6.5% on AVX2 (saturated); 7-bit 0.59-0.70% on both. Same kernels, so the same speed.
INT8_REDUCE_RANGE = True
DEFAULT_INT8_COMPONENTS = ("unet",)


def quantize_component(folder: Path, manifest: Manifest | dict, component: str,
                       op_types: tuple[str, ...] = INT8_OP_TYPES, per_channel: bool = INT8_PER_CHANNEL,
                       reduce_range: bool = INT8_REDUCE_RANGE) -> dict:
    """Write `<component>.int8.onnx` (+ `.data` for graphs over 2 GB; under a name the manifest does not use
    yet) and return its variant entry."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    entry = Manifest.of(manifest).component(component).graph_fp32
    source = folder / entry.file
    graph = fresh_graph_name(folder, Manifest.of(manifest), component, INT8)  # the old one stays until the commit
    large = sum((folder / name).stat().st_size for name in entry.sha256) > EXTERNAL_DATA_THRESHOLD
    # it logs "consider pre-processing" on the root logger at every call: advice for static quantization
    silenced = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(source, folder / graph, op_types_to_quantize=list(op_types), per_channel=per_channel,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8,
                         use_external_data_format=large)
    except Exception as e:  # the quantizer raises many types; name the component
        raise ExportError(f"Quantizing {component} to int8 failed: {type(e).__name__}: {e}") from e
    finally:
        logging.disable(silenced)
        (folder / f"{source.stem}-inferred.onnx").unlink(missing_ok=True)  # its shape-inferred copy
    model = onnx.load(str(folder / graph), load_external_data=False)
    quantized = sum(n.op_type in ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul") for n in model.graph.node)
    if not quantized:
        raise ExportError(f"{component} has no {'/'.join(op_types)} node with constant weights to quantize.")
    files = [name for name in (graph, f"{graph}.data") if (folder / name).is_file()]
    return {
        "file": graph,
        "sha256": {name: file_sha256(folder / name) for name in files},
        "precision": INT8,
        "io_dtype": "float32",
        "quantization": {"method": "onnxruntime-dynamic", "op_types": list(op_types),
                         "weights": "int8 (7-bit range)" if reduce_range else "int8",
                         "reduce_range": reduce_range,
                         "activations": "uint8 (per tensor, at run time)", "per_channel": per_channel,
                         "quantized_nodes": quantized},
        "source_sha256": entry.sha256[entry.file],
    }


def quantize_folder(folder: str | Path, manifest: Manifest | dict, components: tuple[str, ...] = DEFAULT_INT8_COMPONENTS,
                    seed: int = FIDELITY_SEED, op_types: tuple[str, ...] = INT8_OP_TYPES,
                    per_channel: bool = INT8_PER_CHANNEL, reduce_range: bool = INT8_REDUCE_RANGE) -> dict[str, dict]:
    """Write int8 graphs for `components`, measure each against its fp32 graph, and record them in `manifest`
    as `components[c]["variants"]["int8"]`; return component -> variant entry. The caller writes the manifest."""
    folder, manifest = Path(folder), Manifest.of(manifest)
    check_int8_components(folder, manifest, components)
    entries = {}
    for component in components:
        entry = quantize_component(folder, manifest, component, op_types, per_channel, reduce_range)
        entry["fidelity"] = int8_fidelity(folder, manifest, component, entry, seed)
        manifest.set_variant(component, INT8, entry)
        entries[component] = entry
    return entries


def check_int8_components(folder: Path, manifest: Manifest, components: tuple[str, ...]) -> None:
    """Refuse components the folder lacks, and those whose weights are refit at run time (int8 replaces the
    weights the refit map names)."""
    refit, graphs = manifest.refit_components, manifest.components
    for component in components:
        if component not in graphs:
            raise ExportError(f"{folder} has no {component!r} component to quantize "
                              f"(it has {', '.join(graphs)}).")
        if component in refit:
            raise ExportError(
                f"{folder}: {component} is refit at run time (built with --refittable), and int8 quantization "
                "replaces the weights its refit map names. Build without --refittable to quantize it.")


def fidelity_inputs(folder: Path, manifest: Manifest | dict, component: str, seed: int) -> dict:
    """The seeded inputs every int8 variant of `component` is measured on against fp32."""
    return example_inputs(manifest, component, seed, _vocab_size(folder, manifest))


def int8_fidelity(folder: Path, manifest: Manifest | dict, component: str, variant: dict,
                  seed: int = FIDELITY_SEED) -> dict:
    """An int8 variant's outputs against its fp32 graph on seeded inputs, run on this CPU (which it records:
    the error depends on the instruction set, see INT8_REDUCE_RANGE)."""
    fp32 = Manifest.of(manifest).component(component)
    fidelity = compare_graphs(folder / fp32.file, folder / variant["file"], fidelity_inputs(folder, manifest, component, seed),
                              IMAGE_OUTPUTS.get(component, ()))
    return {**fidelity, "seed": seed, "measured_on": cpu_graph_key()}


__all__ = ["DEFAULT_INT8_COMPONENTS", "INT8_OP_TYPES", "INT8_REDUCE_RANGE", "INT8_SUFFIX",
           "check_int8_components", "fidelity_inputs", "int8_fidelity", "quantize_component", "quantize_folder"]
