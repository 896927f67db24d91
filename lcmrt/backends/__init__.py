"""Backends by name. Each backend module is imported only when asked for, so `import lcmrt` stays light
and a machine without a GPU stack never touches one."""
from __future__ import annotations

from ..errors import BackendError
from .base import Backend, Session, TensorSpec

# backend name -> ONNX Runtime device
_ONNXRUNTIME = {
    "onnxruntime": "cpu",
    "onnxruntime-cpu": "cpu",
    "onnxruntime-cuda": "cuda",
    "onnxruntime-trt": "tensorrt",
}
BACKEND_NAMES = ("auto", *_ONNXRUNTIME, "openvino", "tensorrt")

__all__ = ["BACKEND_NAMES", "Backend", "Session", "TensorSpec", "get_backend"]


def get_backend(name: str = "auto", **options) -> Backend:
    """The backend called `name`; "auto" picks the best one installed (ONNX Runtime on CUDA where its CUDA
    provider is installed, else on the CPU). `options` go to the backend (e.g. `threads=4`). `Pipeline.load`
    decides "auto" per folder (`lcmrt.backends.chosen`): TensorRT engines, the build's CPU backend choice."""
    if name not in BACKEND_NAMES:
        raise BackendError(f"Unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}.")
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(**options)
    if name == "openvino":
        from .openvino import OpenVinoBackend

        return OpenVinoBackend(**options)
    from .onnxruntime import OnnxRuntimeBackend

    if name == "auto":
        device = "cuda" if "cuda" in OnnxRuntimeBackend.available_devices() else "cpu"
    else:
        device = _ONNXRUNTIME[name]
    return OnnxRuntimeBackend(device, **options)
