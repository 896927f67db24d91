"""CPU stand-in for the GPU APIs lcmrt's GPU backends call (TensorRT, CuPy, ONNX Runtime's CUDA provider),
built over ONNX Runtime (CPU) and numpy, so that CI runs every line of `lcmrt/backends/tensorrt.py`,
`lcmrt/engines/tensorrt.py` and the CUDA binding of `lcmrt/backends/onnxruntime.py` and checks the API
contracts that can be checked without a GPU (listed in each module's docstring; violations raise
`ContractViolation` and are recorded, and the fixture fails a test that left any unconsumed).

Tests only: `install(monkeypatch)` puts the fakes into `sys.modules` as `tensorrt` and `cupy` for one test;
nothing here is importable under those names otherwise. What it cannot check (a real GPU run must): speed,
asynchrony (work runs at once, so a missing synchronize goes unnoticed), fp16/TF32 numerics, TensorRT's own
layer fusions and which weights it can really refit, and driver/capture behaviour of real kernels.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from . import contracts, cupy, onnxruntime_cuda, tensorrt


@dataclass
class Standin:
    trt: object
    cupy: object
    contracts: object

    expect = staticmethod(contracts.expect)

    @property
    def violations(self) -> list[str]:
        return contracts.violations

    def fuse_weights(self, *names: str) -> None:
        """Make the next built engines treat `names` as one fused weight (refit one, the others go missing)."""
        tensorrt.FUSED_WEIGHT_GROUPS.append(set(names))


def install(monkeypatch, trt_version: str | None = None) -> Standin:
    """Put the stand-in TensorRT and CuPy into sys.modules for the duration of `monkeypatch`."""
    contracts.reset()
    cupy.reset()
    tensorrt.reset()
    if trt_version:
        tensorrt.set_version(trt_version)
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cupy.cuda)
    return Standin(tensorrt, cupy, contracts)


def install_ort_cuda(monkeypatch) -> Standin:
    """Make onnxruntime report a CUDA provider whose sessions run on the CPU with device-binding contracts."""
    contracts.reset()
    onnxruntime_cuda.install(monkeypatch)
    return Standin(tensorrt, cupy, contracts)
