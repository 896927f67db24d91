"""CPU stand-in for ONNX Runtime's CUDA execution provider, as far as lcmrt's `DeviceBinding` uses it: the
provider list, sessions created with ("CUDAExecutionProvider", options), OrtValues on device "cuda", I/O
binding and `run_with_iobinding` with `gpu_graph_id`. Sessions run on the CPU provider. Tests only.

Contracts enforced (ONNX Runtime's CUDA provider documentation, CUDA graphs): with `enable_cuda_graph`,
`run()` without I/O binding is an error; every bound value must be a "cuda" OrtValue; `gpu_graph_id` 0 is the
user's to avoid (and "-1" disables capture); the first run of a graph id captures it, and later runs of that id
must bind the same OrtValues with the same shapes (a replay reads the buffers captured); `update_inplace`
keeps shape and dtype (the address cannot change); every graph input without a default is bound.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .contracts import violate

CUDA = "CUDAExecutionProvider"


class CudaOrtValue:
    """An OrtValue on device "cuda": its buffer is fixed at creation."""

    def __init__(self, array: np.ndarray, device_id: int):
        self._array, self.device_id = array, device_id

    def update_inplace(self, array: np.ndarray) -> None:
        if array.shape != self._array.shape or array.dtype != self._array.dtype:
            raise violate(f"update_inplace: {array.dtype}{list(array.shape)} into a {self._array.dtype}"
                          f"{list(self._array.shape)} OrtValue (its device buffer cannot change).")
        np.copyto(self._array, array)

    def numpy(self) -> np.ndarray:
        return self._array.copy()

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def device_name(self) -> str:
        return "cuda"


class OrtValue:
    """`onnxruntime.OrtValue` with "cuda" values faked; CPU values are real (sessions take them as initializers)."""

    _real = ort.OrtValue

    @staticmethod
    def ortvalue_from_numpy(array, device_type: str = "cpu", device_id: int = 0):
        if device_type == "cpu":
            return OrtValue._real.ortvalue_from_numpy(array)
        return CudaOrtValue(np.array(array, copy=True), device_id)

    @staticmethod
    def ortvalue_from_shape_and_type(shape, element_type, device_type: str = "cpu", device_id: int = 0):
        if device_type == "cpu":
            return OrtValue._real.ortvalue_from_shape_and_type(shape, element_type)
        return CudaOrtValue(np.zeros(tuple(shape), element_type), device_id)


class IOBinding:
    def __init__(self):
        self.inputs: dict[str, CudaOrtValue] = {}
        self.outputs: dict[str, CudaOrtValue] = {}

    def bind_ortvalue_input(self, name, value) -> None:
        self.inputs[name] = value

    def bind_ortvalue_output(self, name, value) -> None:
        self.outputs[name] = value


class CudaSession:
    """An InferenceSession that reports the CUDA provider and runs on the CPU one."""

    runs = 0  # run_with_iobinding calls, all sessions (tests assert the binding path ran)

    def __init__(self, path, sess_options=None, providers=None, **kwargs):
        names = [p if isinstance(p, str) else p[0] for p in providers or []]
        self.cuda_options = next((dict(p[1]) for p in providers or [] if not isinstance(p, str) and p[0] == CUDA), {})
        self.cuda = CUDA in names
        self._session = _RealSession(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)
        self.cuda_graph = self.cuda and self.cuda_options.get("enable_cuda_graph") == "1"
        self.captured: dict[str, dict] = {}  # graph id -> {name: (value, shape)} bound at capture

    def __getattr__(self, name):
        return getattr(self._session, name)

    def get_providers(self) -> list[str]:
        return [CUDA, "CPUExecutionProvider"] if self.cuda else self._session.get_providers()

    def run(self, output_names, feeds, run_options=None):
        if self.cuda_graph:
            raise violate("InferenceSession.run() with enable_cuda_graph: CUDA graphs need I/O binding.")
        return self._session.run(output_names, feeds, run_options)

    def io_binding(self) -> IOBinding:
        return IOBinding()

    def run_with_iobinding(self, io: IOBinding, run_options=None) -> None:
        CudaSession.runs += 1
        bound = {**io.inputs, **io.outputs}
        if self.cuda_graph:
            wrong = [n for n, v in bound.items() if not isinstance(v, CudaOrtValue)]
            if wrong:
                raise violate(f"CUDA graph run with host values bound: {wrong}.")
            graph_id = run_options.get_run_config_entry("gpu_graph_id") if run_options is not None else "0"
            if graph_id == "0":
                raise violate("gpu_graph_id 0 is the provider's default graph; lcmrt must use ids from 1.")
            state = {n: (id(v), tuple(v.shape())) for n, v in bound.items()}
            if graph_id != "-1":
                if graph_id in self.captured and self.captured[graph_id] != state:
                    raise violate(f"graph {graph_id} replayed with other buffers or shapes than it captured "
                                  f"({sorted(set(state) ^ set(self.captured[graph_id])) or 'same names'}).")
                self.captured.setdefault(graph_id, state)
        defaults = {a.name for a in self._session.get_overridable_initializers()}
        unbound = [a.name for a in self._session.get_inputs() if a.name not in io.inputs and a.name not in defaults]
        if unbound:
            raise violate(f"run_with_iobinding: inputs {unbound} are not bound.")
        names = list(io.outputs)
        results = self._session.run(names, {n: v.numpy() for n, v in io.inputs.items()})
        for name, value in zip(names, results):
            io.outputs[name].update_inplace(value)


_RealSession = ort.InferenceSession


def install(monkeypatch) -> None:
    providers = [CUDA, *ort.get_available_providers()]
    monkeypatch.setattr(ort, "get_available_providers", lambda: providers)
    monkeypatch.setattr(ort, "InferenceSession", CudaSession)
    monkeypatch.setattr(ort, "OrtValue", OrtValue)
    CudaSession.runs = 0
