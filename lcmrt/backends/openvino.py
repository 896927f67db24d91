"""OpenVINO backend: runs engine-folder graphs with OpenVINO's CPU plugin.

A component is read from the OpenVINO model the build saved beside its ONNX graph (`<component>.openvino.xml`,
its weights memory-mapped from the `.bin` beside it), or from the fp32 ONNX graph in a folder built without
one; with precision "int8", from its int8-weight model (`<component>.openvino-int8.xml`, made by
`lcmrt.engines.openvino_int8`) where the build made one. Models are compiled to compute in fp32: the CPU
plugin would otherwise run bf16 on CPUs that have it. Compiled models go to OpenVINO's model cache, so a
second load reads the compiled blob instead of compiling again.

Adapters: a compiled model holds its weights in the plugin's own layout and has no call that replaces them,
so the weights adapters target (the folder's refit-inputs list, `lcmrt.export.adapters`) become model
inputs before compiling. Every infer request is bound to those arrays without a copy: the pristine base
weights, memory-mapped from the graphs' data file, or the arrays an adapter set computed. A swap binds new
arrays (instant); as with ONNX Runtime's refit by inputs, the plugin cannot pre-pack weights it is fed.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..adapters import map_base
from ..errors import BackendError
from ..mapped_files import files_or_under, release_pages, releasing
from ..manifest import FP32, INT8, OPENVINO, OPENVINO_INT8, REFIT_INPUTS, VERIFIED_CACHE, Manifest, verify_component
from .base import Backend, Session, TensorSpec, describe

INSTALL_HINT = 'Install it with `pip install "lcmrt[openvino]"`.'
# precision -> the variant holding that precision's OpenVINO model (components without one run fp32)
MODELS = {FP32: OPENVINO, INT8: OPENVINO_INT8}
CACHE_DIR = VERIFIED_CACHE.parent / "openvino"  # compiled models, keyed by OpenVINO from model and device
_LISTED = 5


def _openvino():
    try:
        import openvino
    except ImportError as e:
        raise BackendError(f"The openvino backend needs OpenVINO, which is not installed here ({e}). "
                           f"{INSTALL_HINT}") from None
    return openvino


def openvino_version() -> str:
    """OpenVINO's release ("2026.4.1"), without its build suffix."""
    return _openvino().__version__.split("-")[0]


class OpenVinoBackend(Backend):
    """`threads` sets the CPU plugin's inference threads (default: OpenVINO's, one per physical core);
    `cache=False` compiles every load afresh instead of using OpenVINO's model cache (`CACHE_DIR`)."""

    name = "openvino"

    def __init__(self, *, threads: int | None = None, precision: str = FP32, cache: bool = True,
                 cache_dir: str | Path | None = None):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise BackendError(f"threads must be a positive integer, got {threads!r}.")
        if precision not in MODELS:
            raise BackendError(f"The openvino backend runs {' or '.join(MODELS)} models; precision {precision!r} is "
                               "an ONNX Runtime option. Load with one of those, or with backend 'onnxruntime'.")
        self.precision = precision  # "int8": a component's int8-weight model where built, else its fp32 one
        self.ov = _openvino()
        self.core = self.ov.Core()
        self.config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            self.config["INFERENCE_NUM_THREADS"] = threads
        if cache:
            self.config["CACHE_DIR"] = str(Path(cache_dir) if cache_dir is not None else CACHE_DIR)

    def load(self, folder: Path, manifest: Manifest | dict, component: str, weights: dict | None = None) -> "OvSession":
        folder, manifest = Path(folder), Manifest.of(manifest)
        entry = manifest.component(component)
        variant = next((v for v in (MODELS[self.precision], OPENVINO) if v in entry.variants), FP32)
        if variant != FP32:
            path = verify_component(folder, manifest, component, variant)
            files = entry.variants[variant].sha256
        else:  # a folder built without OpenVINO installed: OpenVINO reads the ONNX graph itself
            from .onnxruntime import check_external_data

            path = verify_component(folder, manifest, component, FP32)
            files = entry.graph_fp32.sha256
            check_external_data(path, set(files))
        if path.suffix == ".xml" and path.with_suffix(".bin").name not in files:
            # OpenVINO reads the .bin next to the .xml: only a hashed one
            raise BackendError(f"{path} has no hashed weight file {path.with_suffix('.bin').name}. Rebuild the "
                               "folder with `lcmrt build`.")
        names = entry.variants[REFIT_INPUTS].weight_inputs if REFIT_INPUTS in entry.variants else ()
        base = {e.weight: e for e in manifest.refit_map.values() if e.component == component and e.weight in names}
        if base:  # weights to turn into inputs: edit the model in memory
            model = self._read(path, component)
            refittable = _weights_to_inputs(self.ov, model, set(base))
        else:  # compiled from the file: a cached compiled model is found without reading (and hashing) the weights
            model, refittable = str(path), {}
        # what it reads the weights from: the saved model's .bin, or the compiled blob in the model cache (never
        # another backend's files: ONNX Runtime reads its mapped weights at every run)
        mapped = files_or_under([path.with_suffix(".bin")] if path.suffix == ".xml" else [],
                                [self.config["CACHE_DIR"]] if "CACHE_DIR" in self.config else [])
        try:
            with releasing(mapped):  # the pages it has read while it imports or repacks the weights
                compiled = self.core.compile_model(model, "CPU", self.config)
        except Exception as e:  # OpenVINO raises RuntimeError with its own message
            raise BackendError(f"OpenVINO could not compile the {component} graph {path.name}: {e}. If the file is "
                               "damaged, rebuild the folder with `lcmrt build`.") from e
        session = OvSession(self.ov, compiled, component, path, entry,
                            {name: map_base(folder, base[name], mode="c") for name in refittable}, mapped)
        session.precision = entry.graph(variant).precision
        if weights:
            session.refit(weights)
        return session

    def _read(self, path: Path, component: str):
        try:
            if path.suffix == ".xml":
                return self.core.read_model(str(path), str(path.with_suffix(".bin")))
            return self.core.read_model(str(path))
        except Exception as e:
            raise BackendError(f"OpenVINO could not read the {component} graph {path}: {e}. If the file is damaged, "
                               "rebuild the folder with `lcmrt build`.") from e


def _weights_to_inputs(ov, model, names: set[str]) -> dict[str, tuple]:
    """Replace the constants that hold `names` (graph initializer names, kept by OpenVINO as tensor names) by
    model inputs of the same type and shape; return name -> (shape, dtype) of those inputs."""
    found = {}
    if not names:
        return found
    parameters = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant":
            continue
        hit = names & set(op.output(0).get_names())
        if hit:
            name = hit.pop()
            parameter = ov.opset13.parameter(op.get_output_partial_shape(0), op.get_output_element_type(0), name=name)
            parameter.output(0).set_names({name})
            op.output(0).replace(parameter.output(0))
            parameters.append(parameter)
            found[name] = (tuple(op.get_output_shape(0)), np.dtype(op.get_output_element_type(0).to_dtype()))
    missing = sorted(names - set(found))
    if missing:
        raise BackendError(f"OpenVINO's model lacks {len(missing)} refittable weight(s), e.g. "
                           f"{', '.join(missing[:_LISTED])}. Rebuild the folder with `lcmrt build`.")
    model.add_parameters(parameters)
    return found


class OvSession(Session):
    def __init__(self, ov, compiled, component: str, path: Path, entry, base: dict[str, np.ndarray], mapped=None):
        self.ov, self.compiled, self.component, self.path = ov, compiled, component, Path(path)
        self._mapped = mapped  # after the first run: release the pages of the files OpenVINO read its weights from
        # the graph's own inputs and outputs, as the manifest records them (dimension names included)
        self.inputs = {t.name: TensorSpec(t.name, t.shape, np.dtype(t.dtype)) for t in entry.inputs}
        self.outputs = {t.name: TensorSpec(t.name, t.shape, np.dtype(t.dtype)) for t in entry.outputs}
        self._weight_specs = {name: (value.shape, value.dtype) for name, value in base.items()}
        # name -> array bound to every request. OpenVINO reads these arrays in place: they must outlive it.
        self._weights = dict(base)
        self._version = 0  # bumped by refit; a request binds the weights again when its version is older
        self._idle: list[list] = []  # [request, version] not running now; concurrent runs each take their own
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        slot = self._take()
        try:
            request = slot[0]
            for name, value in feeds.items():
                request.set_tensor(name, self.ov.Tensor(np.ascontiguousarray(value)))  # a copy: feeds may be read-only
            request.infer()
            outputs = {name: request.get_tensor(name).data.copy() for name in self.outputs}
        except Exception as e:
            raise BackendError(f"OpenVINO failed to run {self.component} ({self.path.name}): {e}") from e
        finally:
            with self._lock:
                self._idle.append(slot)
        if self._mapped is not None:  # its weights are repacked by now: drop the file pages it read them from
            mapped, self._mapped = self._mapped, None
            release_pages(mapped)
        return outputs

    def _take(self) -> list:
        with self._lock:
            slot = self._idle.pop() if self._idle else [self.compiled.create_infer_request(), -1]
            version, weights = self._version, self._weights
        if slot[1] != version:
            for name, value in weights.items():
                slot[0].set_tensor(name, self.ov.Tensor(value, shared_memory=True))
            slot[1] = version
        return slot

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        """Bind new values of refittable weights (graph initializer name -> array); the others stay as they are.
        All or nothing: every array is checked before any is bound. The arrays are read in place, not copied:
        do not modify them afterwards."""
        unknown = [name for name in weights if name not in self._weight_specs]
        if unknown:
            raise BackendError(
                f"{len(unknown)} weight(s) are not refittable weights of the {self.component} graph: "
                f"{', '.join(unknown[:_LISTED])}{', ...' if len(unknown) > _LISTED else ''}. An adapter added "
                "after the build targets them: run `lcmrt adapter add` again.")
        arrays = {}
        for name, value in weights.items():
            shape, dtype = self._weight_specs[name]
            value = np.asarray(value)
            if value.dtype != dtype or value.shape != shape:
                raise BackendError(f"weight {name!r} of the {self.component} graph: expected {describe(dtype, shape)}, "
                                   f"got {describe(value.dtype, value.shape)}.")
            arrays[name] = np.require(value, requirements=("C", "W"))  # OpenVINO binds only writeable arrays
        with self._lock:
            self._weights = {**self._weights, **arrays}
            self._version += 1
