"""INT8-weight OpenVINO models: an engine folder's OpenVINO UNet with int8 weights, `<component>.openvino-int8.xml`,
and its fidelity against the fp32 OpenVINO model.

OpenVINO's own tool for this, NNCF's weight compression (`nncf.compress_weights`, mode INT8_ASYM): each weight
of the compressed op types is stored as uint8 with a zero point and a scale per output channel, and the model
computes `(Convert(w) - zero_point) * scale` in front of the op. Activations stay float32: the CPU plugin
decompresses the weights inside its MatMul kernels. No calibration data is needed. Unlike ONNX Runtime's
dynamic quantization (`lcmrt.engines.quantize`) no integer dot products run, so the error does not come from
the instruction set (no u8s8 saturation): it is the weights' rounding.

An opt-in, lossy option like ONNX Runtime's int8 graph, and recorded the same way: a manifest variant with its
fidelity measured on the same seeded inputs, by the openvino backend on this CPU (`measured_on`). Components
whose weights are refit at run time are refused.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from ..backends.openvino import OpenVinoBackend, _openvino, openvino_version
from ..cpu import cpu_description
from ..errors import ExportError
from ..folder_update import fresh_graph_name
from ..manifest import FP32, INT8, OPENVINO_INT8, Manifest
from .fp16 import FIDELITY_SEED, IMAGE_OUTPUTS
from .graphs import compare_outputs
from .openvino_ir import read_fp32, save_model
from .quantize import DEFAULT_INT8_COMPONENTS, check_int8_components, fidelity_inputs

INSTALL_HINT = 'Install NNCF with `pip install "lcmrt[openvino]"`, or build with --no-openvino.'
# The ops whose weights NNCF compresses in an OpenVINO model; those not in the op types asked for are ignored.
NNCF_WEIGHTED_TYPES = ("MatMul", "Convolution", "Gather")
# MatMul only, as for ONNX Runtime's int8 graph. Full SD1.5 UNet at 512x512 (seeded inputs, one run, 2-core
# AVX-512 VNNI EPYC, OpenVINO 2026.4.1, NNCF 3.4.0): max abs diff vs fp32 0.37% of the output's peak, with
# Convolution too 1.68%, at the same step time (5.5-6.7 s against fp32 7.7-9.2 s, on a busy machine).
OPENVINO_INT8_OP_TYPES = ("MatMul",)
# What stands between a compressed weight constant and the op that reads it.
_DECOMPRESSION = ("Convert", "Subtract", "Multiply", "Reshape")


def nncf_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("nncf") is not None


@contextmanager
def _quiet_nncf():
    """NNCF logs a table of its choices at INFO and draws a progress bar on stdout at every call: lcmrt shows its
    own stages and summary."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
            yield
    finally:
        logger.setLevel(level)


def compressed_nodes(model, op_types: tuple[str, ...]) -> int:
    """How many `op_types` nodes of an OpenVINO model read an int8/uint8 weight constant (through its
    decompression)."""
    ov = _openvino()
    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() not in op_types or op.get_input_size() < 2:
            continue
        node = op.input_value(1).get_node()
        while node.get_type_name() in _DECOMPRESSION:
            node = node.input_value(0).get_node()
        count += node.get_type_name() == "Constant" and node.get_output_element_type(0) in (ov.Type.u8, ov.Type.i8)
    return count


def compress_component(folder: Path, manifest: Manifest | dict, component: str,
                       op_types: tuple[str, ...] = OPENVINO_INT8_OP_TYPES) -> dict:
    """Write `<component>.openvino-int8.xml` (+ `.bin`, under a name the manifest does not use yet) and return its
    variant entry."""
    import nncf

    manifest = Manifest.of(manifest)
    fp32 = manifest.component(component).graph_fp32
    xml = fresh_graph_name(folder, manifest, component, OPENVINO_INT8)  # the old one stays until the commit
    ignored = nncf.IgnoredScope(types=[t for t in NNCF_WEIGHTED_TYPES if t not in op_types], validate=False)
    try:
        with _quiet_nncf():
            model = nncf.compress_weights(read_fp32(folder, manifest, component),
                                          mode=nncf.CompressWeightsMode.INT8_ASYM, ignored_scope=ignored)
    except Exception as e:  # NNCF raises many types; name the component
        raise ExportError(f"Compressing the OpenVINO {component} model to int8 weights failed: "
                          f"{type(e).__name__}: {e}") from e
    compressed = compressed_nodes(model, op_types)
    if not compressed:
        raise ExportError(f"{component} has no {'/'.join(op_types)} node with constant weights to compress.")
    return {
        "file": xml,
        "sha256": save_model(model, folder, xml),
        "precision": INT8,
        "io_dtype": "float32",
        "quantization": {"method": "nncf-compress-weights", "mode": "int8_asym", "op_types": list(op_types),
                         "weights": "uint8 with a zero point (per output channel)",
                         "activations": "float32", "per_channel": True, "compressed_nodes": compressed,
                         "nncf": nncf.__version__},
        "source_sha256": fp32.sha256[fp32.file],
        "key": {"openvino": openvino_version()},
    }


def compress_folder(folder: str | Path, manifest: Manifest | dict, components: tuple[str, ...] = DEFAULT_INT8_COMPONENTS,
                    seed: int = FIDELITY_SEED, op_types: tuple[str, ...] = OPENVINO_INT8_OP_TYPES) -> dict[str, dict]:
    """Write int8-weight OpenVINO models for `components`, record them in `manifest` as
    `components[c]["variants"]["openvino-int8"]` and measure each against its fp32 OpenVINO model; return
    component -> variant entry. The caller writes the manifest."""
    folder, manifest = Path(folder), Manifest.of(manifest)
    check_int8_components(folder, manifest, components)
    entries = {}
    for component in components:
        entry = compress_component(folder, manifest, component, op_types)
        manifest.set_variant(component, OPENVINO_INT8, entry)  # the backend measures what the manifest names
        entry["fidelity"] = openvino_int8_fidelity(folder, manifest, component, seed)
        entries[component] = entry
    return entries


def openvino_int8_fidelity(folder: Path, manifest: Manifest | dict, component: str, seed: int = FIDELITY_SEED) -> dict:
    """The folder's OpenVINO int8 model of `component` against its fp32 OpenVINO model, both run by the openvino
    backend on this CPU, on the seeded inputs ONNX Runtime's int8 graph is measured on."""
    folder, manifest = Path(folder), Manifest.of(manifest)
    if OPENVINO_INT8 not in manifest.component(component).variants:
        raise ExportError(f"{folder} has no OpenVINO int8 {component} model to measure. Add it with "
                          f"`lcmrt build --engines-only {folder} --int8`.")
    feeds = fidelity_inputs(folder, manifest, component, seed)
    # one model at a time (two full-size UNets would double the memory), compiled afresh (no model cache)
    runs = [OpenVinoBackend(precision=p, cache=False).load(folder, manifest, component).run(feeds) for p in (FP32, INT8)]
    fidelity = compare_outputs(*runs, IMAGE_OUTPUTS.get(component, ()), "openvino-cpu")
    return {**fidelity, "seed": seed, "measured_on": {"openvino": openvino_version(), **cpu_description()}}


__all__ = ["INSTALL_HINT", "OPENVINO_INT8_OP_TYPES", "compress_component", "compress_folder", "compressed_nodes",
           "nncf_installed", "openvino_int8_fidelity"]
