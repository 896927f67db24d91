"""backend="auto": which backend loads each component of an engine folder.

On a GPU machine: TensorRT where the folder has engines and TensorRT is installed, else ONNX Runtime's CUDA
provider where installed. On a CPU: the backend the build measured fastest for each component
(`lcmrt.engines.backend_choice`, the manifest's `backend_choice`), provided this CPU is of the class it
was measured on and those backends are installed; otherwise ONNX Runtime for every component, with a
warning that says why and how to measure again.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ..cpu import cpu_class
from ..manifest import BackendChoice, Manifest
from . import get_backend
from .base import Backend, Session

CPU_BACKENDS = ("onnxruntime", "openvino")
DEFAULT_CPU_BACKEND = "onnxruntime"
SHARED_OPTIONS = frozenset({"threads"})  # options every CPU backend takes; others are one backend's own


def installed_cpu_backends() -> tuple[str, ...]:
    """The CPU backends this machine can run, ONNX Runtime (the default) first."""
    from ..engines.openvino_ir import openvino_installed

    return CPU_BACKENDS if openvino_installed() else (DEFAULT_CPU_BACKEND,)


class ChosenBackends(Backend):
    """Each component on its own backend (`choice`: component -> backend name; others on ONNX Runtime, the
    backend `default`)."""

    def __init__(self, choice: dict[str, str], default: Backend, **options):
        self.choice = dict(choice)
        self.backends = {DEFAULT_CPU_BACKEND: default, **{name: get_backend(name, **options)
                                                         for name in set(self.choice.values()) - {DEFAULT_CPU_BACKEND}}}
        self.name = "auto(" + ", ".join(f"{c}={b}" for c, b in self.choice.items()) + ")"

    def load(self, folder: Path, manifest, component: str, weights: dict | None = None) -> Session:
        backend = self.backends[self.choice.get(component, DEFAULT_CPU_BACKEND)]
        return backend.load(folder, manifest, component, weights)


def folder_backend(folder: Path, manifest: Manifest, name: str, options: dict) -> Backend:
    """The backend that loads `folder`'s components for the backend `name` ("auto" decides per folder)."""
    if name == "auto" and any(e.backend == "tensorrt" for e in manifest.engines):
        from .tensorrt import TensorRTBackend

        name = "tensorrt" if TensorRTBackend.installed() else name
    engine = get_backend(name, **options)
    if name != "auto" or engine.device != "cpu":
        return engine
    choice = manifest.backend_choice
    if choice is None or set(options) - SHARED_OPTIONS:  # not measured, or options for ONNX Runtime alone
        return engine
    reason = not_followed(folder, choice)
    if reason is not None:
        warnings.warn(reason, stacklevel=3)
        return engine
    chosen = {component: entry.backend for component, entry in choice.components.items()}
    if set(chosen.values()) == {DEFAULT_CPU_BACKEND}:
        return engine
    return ChosenBackends(chosen, engine, **options)


def not_followed(folder: Path, choice: BackendChoice) -> str | None:
    """Why backend "auto" cannot follow the build's choice on this machine, and the fix; None if it can."""
    here = cpu_class()
    if choice.cpu != here:
        return (f"{folder}: its backends were chosen by measuring on another CPU ({describe_cpu(choice.cpu)}; this "
                f"one is {describe_cpu(here)}), so every component runs on ONNX Runtime. `lcmrt build "
                f"--engines-only {folder}` builds this CPU's graphs and measures again.")
    missing = {e.backend for e in choice.components.values()} - set(installed_cpu_backends())
    if missing:
        from .openvino import INSTALL_HINT

        return (f"{folder}: its build chose {', '.join(sorted(missing))} for "
                f"{', '.join(c for c, e in choice.components.items() if e.backend in missing)}, which is not "
                f"installed here, so every component runs on ONNX Runtime. {INSTALL_HINT}")
    return None


def describe_cpu(cpu: dict) -> str:
    isa = cpu.get("isa")
    return (f"{cpu.get('model', '?')}, {cpu.get('machine', '?')}"
            + (f" with {' '.join(isa)}" if isinstance(isa, list) and isa else ""))
