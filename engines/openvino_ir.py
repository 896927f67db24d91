"""OpenVINO models of an engine folder's components, saved at build time beside the ONNX graphs.

Each component's fp32 ONNX graph is read by OpenVINO's ONNX frontend and saved in OpenVINO's own format
(`<component>.openvino.xml`, weights in `.bin`, kept fp32), so the openvino backend skips the ONNX import at
every load and memory-maps the weights. `ov.convert_model` is not used: its transformations rename the
weight constants, and the backend finds refittable weights by their ONNX initializer names, which the
frontend keeps as tensor names. The format does not depend on the CPU, so one model serves every machine.
"""
from __future__ import annotations

from pathlib import Path

from ..backends.openvino import _openvino, openvino_version
from ..folder_update import fresh_graph_name
from ..manifest import OPENVINO, Manifest, file_sha256


def openvino_installed() -> bool:
    try:
        _openvino()
    except Exception:
        return False
    return True


def read_fp32(folder: Path, manifest: Manifest | dict, component: str):
    """`component`'s fp32 ONNX graph as an OpenVINO model (read by OpenVINO's ONNX frontend)."""
    return _openvino().Core().read_model(str(folder / Manifest.of(manifest).component(component).file))


def save_model(model, folder: Path, xml: str) -> dict[str, str]:
    """Write `model` as `xml` (+ its `.bin`), weights as they are; return file name -> sha256."""
    _openvino().save_model(model, str(folder / xml), compress_to_fp16=False)
    return {name: file_sha256(folder / name) for name in (xml, Path(xml).with_suffix(".bin").name)}


def save_component(folder: Path, manifest: Manifest | dict, component: str) -> dict:
    """Write `<component>.openvino.xml` (+ `.bin`) and return its variant entry."""
    entry = Manifest.of(manifest).component(component).graph_fp32
    xml = fresh_graph_name(folder, Manifest.of(manifest), component, OPENVINO)  # the old one stays until the commit
    return {"file": xml, "sha256": save_model(read_fp32(folder, manifest, component), folder, xml),
            "precision": entry.precision, "key": {"openvino": openvino_version()}}


def save_folder(folder: Path, manifest: Manifest | dict) -> dict[str, dict]:
    """Save every component's OpenVINO model and record them as manifest variants."""
    manifest = Manifest.of(manifest)
    variants = {}
    for component in manifest.components:
        variants[component] = save_component(folder, manifest, component)
        manifest.set_variant(component, OPENVINO, variants[component])
    return variants
