"""Where TensorRT engines live in an engine folder, and which one this machine may load.

A TensorRT plan runs only on the GPU architecture and the TensorRT version that built it (TensorRT's
engine-compatibility notes), so engines are stored per key: compute capability and TensorRT version,
`trt/sm<major><minor>-<trt version>/<component>.plan`, with that key's timing cache beside them, and each
engine's manifest entry records the sha256 of the ONNX graph it was built from. On load, a missing engine,
an engine for another GPU or TensorRT version, or an engine built from another graph is an
`EngineFolderError` that names the command to rebuild; nothing here builds or touches TensorRT.

Pure Python: the builder (`lcmrt.engines.tensorrt`) and the runtime's TensorRT backend both use it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngineFolderError
from ..manifest import (PLAN_SUFFIX, REFIT_BASE_SUFFIX, TIMING_CACHE_NAME, TRT_DIR, Engine, Manifest, file_sha256,
                        folder_file)

REBUILD_COMMAND = "lcmrt build --engines-only {folder} --backend tensorrt"


@dataclass(frozen=True)
class EngineKey:
    """What a TensorRT plan is tied to: the GPU's compute capability ("8.6") and TensorRT's version."""

    compute_capability: str
    trt_version: str

    def __post_init__(self):
        if not re.fullmatch(r"\d+\.\d+", self.compute_capability):
            raise ValueError(f"compute capability {self.compute_capability!r} is not MAJOR.MINOR (e.g. '8.6')")
        if not re.fullmatch(r"[0-9A-Za-z.+_-]+", self.trt_version):
            raise ValueError(f"TensorRT version {self.trt_version!r} has characters unfit for a folder name")

    @property
    def sm(self) -> str:
        major, minor = self.compute_capability.split(".")
        return f"sm{major}{minor}"

    @property
    def dirname(self) -> str:
        return f"{TRT_DIR}/{self.sm}-{self.trt_version}"

    def plan_path(self, component: str) -> str:
        return f"{self.dirname}/{component}{PLAN_SUFFIX}"

    def refit_base_path(self, component: str) -> str:
        return f"{self.dirname}/{component}{REFIT_BASE_SUFFIX}"

    @property
    def timing_cache_path(self) -> str:
        return f"{self.dirname}/{TIMING_CACHE_NAME}"

    def describe(self) -> str:
        return f"compute capability {self.compute_capability} ({self.sm}) with TensorRT {self.trt_version}"


def compute_capability(major: int, minor: int) -> str:
    return f"{int(major)}.{int(minor)}"


def rebuild_command(folder: str | Path) -> str:
    return REBUILD_COMMAND.format(folder=folder)


def source_graph(manifest: Manifest | dict, component: str, precision: str) -> tuple[str, str]:
    """(file, sha256) of the ONNX graph an engine of `component` is built from at `precision`."""
    comp = Manifest.of(manifest).component(component)
    graph = comp.graph_fp32 if precision == comp.precision else comp.variants.get(precision)
    if graph is None:
        raise EngineFolderError(
            f"The engine folder has no {precision} graph of {component}. Add it with "
            f"`lcmrt build --engines-only FOLDER --backend tensorrt --fp16`, which converts the fp32 graphs.")
    return graph.file, graph.sha256[graph.file]


def engine_entry(key: EngineKey, component: str, source_file: str, source_sha256: str, plan_sha256: str,
                 precision: str, **extra) -> dict:
    """The manifest's record of one built engine."""
    return {
        "backend": "tensorrt",
        "component": component,
        "file": key.plan_path(component),
        "sha256": plan_sha256,
        "device": {"compute_capability": key.compute_capability, "sm": key.sm},
        "backend_version": key.trt_version,
        "precision": precision,
        "source": {"file": source_file, "sha256": source_sha256},
        **extra,
    }


def replace_engine_entries(engines: list[dict], new: list[dict]) -> list[dict]:
    """`engines` with every entry for the same (component, device, version) as one in `new` replaced."""
    def ident(e):
        return (e.get("backend"), e.get("component"), e.get("device", {}).get("compute_capability"),
                e.get("backend_version"))

    replaced = {ident(e) for e in new}
    return [e for e in engines if ident(e) not in replaced] + list(new)


def select_engine(folder: str | Path, manifest: Manifest | dict, component: str, key: EngineKey,
                  check_plan_hash: bool = True) -> Engine:
    """The manifest entry of the engine for `component` that this GPU and TensorRT may load, or an
    EngineFolderError that says what is there and the command that rebuilds it."""
    folder = Path(folder)
    cmd = rebuild_command(folder)
    built = [e for e in Manifest.of(manifest).engines if e.backend == "tensorrt" and e.component == component]
    if not built:
        raise EngineFolderError(
            f"{folder} has no TensorRT engine for {component}. Build the engines on this GPU with `{cmd}`.")
    matching = [e for e in built if e.compute_capability == key.compute_capability
                and e.backend_version == key.trt_version]
    if not matching:
        there = ", ".join(sorted({f"compute capability {e.compute_capability} with TensorRT {e.backend_version}"
                                  for e in built}))
        raise EngineFolderError(
            f"The TensorRT engines for {component} in {folder} were built for {there}, but this machine has "
            f"{key.describe()}. TensorRT engines only run on the GPU architecture and TensorRT version that "
            f"built them: rebuild them here with `{cmd}`.")
    entry = matching[-1]
    try:
        graph_file, graph_sha = source_graph(manifest, component, entry.precision)
    except EngineFolderError:
        graph_file, graph_sha = entry.source_file, None
    if graph_sha is None or graph_file != entry.source_file or graph_sha != entry.source_sha256:
        raise EngineFolderError(
            f"The TensorRT engine {entry.file} was built from a different {component} graph than the one "
            f"in {folder} ({graph_file}): the graph was rebuilt after the engine. Rebuild the engines with `{cmd}`.")
    built_for = entry.data.get("sizes")  # engines built before sizes were recorded served the one size
    if built_for is not None and built_for != (sizes := [list(s) for s in Manifest.of(manifest).shapes.sizes]):
        raise EngineFolderError(
            f"The TensorRT engine {entry.file} has optimization profiles for the sizes {built_for}, but {folder} "
            f"serves {sizes} ([height, width]). Rebuild the engines with `{cmd}`.")
    plan = folder_file(folder, entry.file)
    if not plan.is_file():
        raise EngineFolderError(f"{plan} is listed in the manifest but missing. Rebuild the engines with `{cmd}`.")
    if check_plan_hash and file_sha256(plan) != entry.sha256:
        raise EngineFolderError(
            f"{plan} does not match the hash recorded when it was built (modified or truncated). "
            f"Rebuild the engines with `{cmd}`.")
    return entry
