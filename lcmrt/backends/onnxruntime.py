"""ONNX Runtime backend: runs engine-folder graphs on the CPU, CUDA or TensorRT execution provider.

A component is one `InferenceSession`. Refit re-creates the session with the new weights handed to ONNX
Runtime as external initializers (`SessionOptions.add_external_initializers`), which replace the graph's
values before graph optimization, so constant folding sees the new weights: the result is exactly the
graph with those initializer values. ONNX Runtime only replaces initializers the graph file keeps as
external data, and checks nothing by name beforehand, so the initializer table is read from the file
itself (a few fields of the ONNX protobuf, without the `onnx` package) to give clear errors up front.
"""
from __future__ import annotations

import mmap
import threading
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..cpu import cpu_description, int8_accuracy_warning
from ..errors import BackendError, EngineFolderError
from ..manifest import (FP32, GRAPH_PRECISIONS, INT8, PRE_OPTIMIZED, REBUILD, REFIT_FACTORS, REFIT_INPUTS, TRT_CACHE_DIR,
                        Manifest, verify_component, with_size_dims)
from .base import Backend, Session, TensorSpec, describe

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_NAMES = {"cpu": "onnxruntime-cpu", "cuda": "onnxruntime-cuda", "tensorrt": "onnxruntime-trt"}

# onnxruntime's type strings for the element types lcmrt graphs use.
_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint64)": np.uint64, "tensor(uint32)": np.uint32, "tensor(uint16)": np.uint16,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}
# onnx TensorProto.DataType codes (onnx/onnx.proto).
_ONNX_DTYPES = {
    1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
    9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64,
}
PRECISIONS = GRAPH_PRECISIONS
REFIT_MODES = ("auto", "inputs", "session", "background", "factors")
_LISTED = 5  # names shown in an error before "..."


class OnnxRuntimeBackend(Backend):
    """`device` picks the execution provider: "cpu", "cuda" or "tensorrt" (with CUDA and CPU as fallbacks
    for the nodes TensorRT does not take). `threads` sets intra-op threads (default: ONNX Runtime's, one
    per physical core); `fp16` lets the TensorRT provider build FP16 kernels."""

    def __init__(self, device: str = "cpu", *, threads: int | None = None, device_id: int = 0,
                 fp16: bool = False, precision: str = "fp32", cuda_graph: bool = True, refit: str = "auto"):
        if device not in PROVIDERS:
            raise BackendError(f"Unknown ONNX Runtime device {device!r}; choose one of {', '.join(PROVIDERS)}.")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise BackendError(f"threads must be a positive integer, got {threads!r}.")
        installed = ort.get_available_providers()
        if PROVIDERS[device] not in installed:
            raise BackendError(
                f"ONNX Runtime {ort.__version__} here has no {PROVIDERS[device]} (installed: {', '.join(installed)}). "
                'Install the GPU build with `pip install "lcmrt[gpu]"`: onnxruntime-gpu replaces onnxruntime, '
                "so if both end up installed, run `pip uninstall -y onnxruntime onnxruntime-gpu` and then "
                "`pip install onnxruntime-gpu`.")
        self.device = device
        self.name = _NAMES[device]
        self.threads = threads
        self.device_id = device_id
        self.fp16 = fp16
        if precision not in PRECISIONS:
            raise BackendError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
        self.precision = precision  # graphs to load: "fp16" takes a component's fp16 variant where built
        self.cuda_graph = cuda_graph  # CUDA provider: replay each run as a captured CUDA graph
        if refit not in REFIT_MODES:
            raise BackendError(f"refit must be one of {', '.join(REFIT_MODES)}, got {refit!r}.")
        # How adapter weights reach a refittable graph. "inputs": fed with every run (a swap costs only the
        # weight computation; ONNX Runtime cannot pre-pack those weights). "session": baked into a new
        # session (full speed between swaps; a swap costs a session creation). "background" (CPU): as
        # "inputs" at once, and a session with the weights baked in is built in a background thread and
        # takes over when ready. "factors" (CPU): like "background", but runs meanwhile use the refit-factors graph
        # (lcmrt.engines.lowrank_graph), so a swap binds the adapters' own low-rank factors and computes no
        # merged weight; the background thread computes those and builds the session. GPU providers keep
        # weights on the device, so they take "session".
        if refit in ("background", "factors") and device != "cpu":
            raise BackendError(f"refit={refit!r} is for the CPU provider; GPU providers refit by session.")
        self.refit = refit if refit != "auto" else ("inputs" if device == "cpu" else "session")

    @staticmethod
    def available_devices() -> list[str]:
        installed = ort.get_available_providers()
        return [device for device, provider in PROVIDERS.items() if provider in installed]

    def factor_inputs(self, manifest: Manifest | dict, component: str) -> dict:
        variants = Manifest.of(manifest).component(component).variants
        if self.refit == "factors" and self.precision == FP32 and REFIT_FACTORS in variants:
            return variants[REFIT_FACTORS].factors
        return {}

    def load(self, folder: Path, manifest: Manifest | dict, component: str, weights: dict | None = None) -> OrtSession:
        folder, manifest = Path(folder), Manifest.of(manifest)
        variants = manifest.component(component).variants
        if self.precision == FP32 and self.refit == "factors" and {REFIT_INPUTS, REFIT_FACTORS} & set(variants):
            if REFIT_FACTORS not in variants:
                raise EngineFolderError(f"{folder} has no refit-factors graph of its {component}, which refit='factors' "
                                        f"runs. Add it with `lcmrt build --engines-only {folder}`, or load with "
                                        "refit='background'.")
            return self._load_refit_graph(folder, manifest, component, REFIT_FACTORS, weights)
        if self.refit in ("inputs", "background") and REFIT_INPUTS in variants and self.precision == FP32:
            return self._load_refit_graph(folder, manifest, component, REFIT_INPUTS, weights)
        variant = self.precision
        pre_optimized = (self.device == "cpu" and not weights
                         and manifest.component(component).graph(self.precision).precision == FP32
                         and PRE_OPTIMIZED in variants and variants[PRE_OPTIMIZED].key == cpu_graph_key())
        if pre_optimized:  # built on a CPU like this one: skip ONNX Runtime's graph optimizations at load
            variant = PRE_OPTIMIZED
        path = verify_component(folder, manifest, component, variant)
        graph = manifest.component(component).graph(variant)
        check_external_data(path, set(graph.sha256))
        if graph.precision == INT8 and self.device == "cpu":
            if message := int8_accuracy_warning(str(folder), graph.data, cpu_description()["isa"]):
                warnings.warn(message, stacklevel=2)
        session = OrtSession(path, component, self._providers(folder), self.threads, weights, self.device_id,
                             optimize=not pre_optimized)
        session.precision = graph.precision
        return session

    def _load_refit_graph(self, folder: Path, manifest: Manifest, component: str, name: str,
                          weights: dict | None) -> OrtSession:
        """A session of a graph that takes adapters as inputs: weights (refit-inputs) or low-rank factors."""
        variant = manifest.component(component).variants[name]
        path = verify_component(folder, manifest, component, name)
        check_external_data(path, set(variant.sha256))
        fused_graph = None
        if self.refit in ("background", "factors"):  # the plain graph, which the background session bakes weights into
            fused_graph = verify_component(folder, manifest, component, FP32)
            check_external_data(fused_graph, set(manifest.component(component).graph_fp32.sha256))
        inputs = list(variant.weight_inputs) + [n for f in variant.factors.values() for n in (f.down, f.up)]
        refit_map = manifest.refit_map if variant.factors else {}
        session = OrtSession(path, component, self._providers(folder), self.threads, weights, self.device_id,
                             weight_inputs=inputs, fused_graph=fused_graph, factor_inputs=variant.factors,
                             fused_weights=[refit_map[m].weight for m in variant.factors])
        session.precision = variant.precision
        return session

    def _providers(self, folder: Path) -> list:
        cpu = "CPUExecutionProvider"
        # cuda graphs need every node on the CUDA provider and fixed device buffers (see DeviceBinding)
        cuda = ("CUDAExecutionProvider", {"device_id": str(self.device_id),
                                          "enable_cuda_graph": "1" if self.cuda_graph and self.device == "cuda" else "0"})
        if self.device == "cpu":
            return [cpu]
        if self.device == "cuda":
            return [cuda, cpu]
        cache = str(folder / TRT_CACHE_DIR)
        trt = ("TensorrtExecutionProvider", {
            "device_id": str(self.device_id),
            "trt_fp16_enable": "1" if self.fp16 else "0",
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": cache,
        })
        return [trt, cuda, cpu]


class OrtSession(Session):
    def __init__(self, path: Path, component: str, providers: list, threads: int | None,
                 weights: dict[str, np.ndarray] | None = None, device_id: int = 0, optimize: bool = True,
                 weight_inputs: list[str] | None = None, prepack: bool = True, fused_graph: Path | None = None,
                 factor_inputs: dict | None = None, fused_weights: list[str] = ()):
        self.path = Path(path)
        self.component = component
        self._providers = providers
        self.provider = providers[0] if isinstance(providers[0], str) else providers[0][0]
        self._threads = threads
        self._optimize = optimize  # False for graphs ONNX Runtime already optimized at build time
        # False: weights in an external data file stay memory-mapped (file-backed pages the kernel can drop)
        # instead of being copied into pre-packed buffers; with optimize=False, the session holds no copy
        self._prepack = prepack
        # Arrays handed to ONNX Runtime as initializers: it may read them in place, so they must outlive the session.
        self._initializers: dict[str, tuple[TensorSpec, str | None]] | None = None  # read on first refit
        # Refit by inputs: these graph inputs are weights (their initializers are the defaults), or the low-rank
        # factors of `factor_inputs` (module -> FactorInputs; no defaults), fed from _weight_feeds with every run;
        # otherwise refit re-creates the session with external initializers.
        self._weight_inputs = set(weight_inputs or ())
        self.factor_inputs = dict(factor_inputs or {})
        self._weight_feeds: dict[str, np.ndarray] = {}
        self._weight_version = 0  # bumped when _weight_feeds change, so device bindings copy them in again
        self._weights = self._checked(weights) if weights and not self._weight_inputs else {}
        self._session = self._create(self._weights)
        # refit="background": the plain graph, a session of it with the weight feeds baked in once built
        # (version, session), and the thread building it
        self._fused_graph = None if fused_graph is None else Path(fused_graph)
        self._fused: tuple[int, ort.InferenceSession] | None = None
        self._bake = dict  # () -> the weights the background session bakes in (initializer name -> array)
        self._fuser: threading.Thread | None = None
        self._stale: list = []  # baked sessions a refit made stale, which the thread frees (not the refit)
        self._fuse_error: Exception | None = None
        self._fuse_lock = threading.Condition()
        if self._fused_graph is not None:
            # the weights the background session bakes in: the weight inputs, or the factored modules' weights
            self._check_fusable(weight_inputs if not self.factor_inputs else fused_weights)
        # ONNX Runtime lists initializers that are also graph inputs apart from the inputs, as overridable
        self._weight_specs = {arg.name: self._spec(arg) for arg in [*self._session.get_overridable_initializers(),
                                                                    *self._session.get_inputs()]
                              if arg.name in self._weight_inputs}
        self.inputs = {arg.name: self._spec(arg) for arg in self._session.get_inputs()
                       if arg.name not in self._weight_inputs}
        if self.factor_inputs:  # all zeros: every branch off, the base model
            self._weight_feeds = {name: np.zeros(spec.shape, spec.dtype) for name, spec in self._weight_specs.items()}
        if weights and self._weight_inputs:
            self.refit(weights)
        self.outputs = {arg.name: self._spec(arg) for arg in self._session.get_outputs()}
        self._device_id = device_id
        self._binding = self._new_binding()
        if self._fused_graph is not None and not weights:
            self._fuse_in_background()  # with weights, refit() above started it
        # A device binding's buffers are shared by all runs (a concurrent run would overwrite this one's inputs
        # and outputs), so GPU runs take this lock; CPU runs need none (InferenceSession.run is thread safe).
        self._run_lock = threading.Lock()

    def _new_binding(self) -> "DeviceBinding | None":
        """GPU providers exchange data through fixed device buffers (I/O binding), bound once per shape."""
        return None if self.provider == "CPUExecutionProvider" else DeviceBinding(self, "cuda", self._device_id)

    def _create(self, weights: dict[str, np.ndarray], path: Path | None = None) -> ort.InferenceSession:
        """A session of this graph (or of `path`, the plain graph a background session bakes weights into)."""
        path = path or self.path
        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if self._optimize or path != self.path
                                            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        if self._threads is not None:
            options.intra_op_num_threads = self._threads
        if self.provider == "CPUExecutionProvider":
            # No arena: it keeps every run's activations, and grows again on a session's second run (its
            # planned memory pattern); off, a full-size 1024x1024 generation peaks ~6 GB lower for a UNet
            # step within noise and a VAE decode ~4% slower (FIELD-NOTES.md).
            options.enable_cpu_mem_arena = False
        if not self._prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if self._weight_inputs and path == self.path:
            options.log_severity_level = 3  # not one warning per weight input: they are inputs on purpose
        if weights:
            options.add_external_initializers(
                list(weights), [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()])
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=self._providers)
        except Exception as e:  # onnxruntime's own exception types do not share a useful base class
            raise BackendError(
                f"ONNX Runtime could not load the {self.component} graph {path}: {e}. "
                "If the file is damaged, rebuild the folder with `lcmrt build`.") from e
        if self.provider not in session.get_providers():
            # ONNX Runtime falls back to the CPU with only a log line when a GPU provider fails to start.
            raise BackendError(
                f"{self.provider} is installed but did not start for {self.path.name} (running on "
                f"{', '.join(session.get_providers())}): check the CUDA, cuDNN and TensorRT libraries that "
                f"onnxruntime-gpu {ort.__version__} needs, or use backend 'onnxruntime-cpu'.")
        return session

    def _spec(self, arg) -> TensorSpec:
        dtype = _ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise BackendError(
                f"{self.path.name}: {arg.name!r} has type {arg.type}, which lcmrt cannot exchange as a numpy "
                "array. Rebuild the folder with `lcmrt build`.")
        # a dimension with neither a size nor a name varies too
        shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
        return TensorSpec(arg.name, shape, np.dtype(dtype))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        try:
            if self._binding is not None:
                with self._run_lock:
                    return self._binding.run(feeds)
            fused = self._fused
            if fused is not None and fused[0] == self._weight_version:
                values = fused[1].run(list(self.outputs), feeds)
            else:
                values = self._session.run(list(self.outputs), {**feeds, **self._weight_feeds})
        except Exception as e:
            raise BackendError(f"ONNX Runtime failed to run {self.component} ({self.path.name}): {e}") from e
        return dict(zip(self.outputs, values))

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        """Swap in new initializer values (graph initializer name -> array); the other weights stay as they
        are. All or nothing: the new session is built before the old one is dropped. The arrays are not
        copied (ONNX Runtime may read them in place): do not modify them afterwards."""
        if self.provider == "TensorrtExecutionProvider":
            # Its engine cache is keyed by the graph's file and tensor names, not by weight values, so a
            # re-created session would load the engine built with the old weights.
            raise BackendError(
                "The onnxruntime-trt backend cannot refit weights: its engine cache would keep the old "
                "weights. Use the tensorrt backend (native refit) or onnxruntime-cuda for adapter swaps.")
        if self._weight_inputs:
            feeds = {**self._weight_feeds, **self._checked_inputs(weights)}
            self._swap_feeds(feeds, lambda: feeds)
            return
        arrays = self._checked(weights)
        merged = {**self._weights, **arrays}
        session = self._create(merged)
        self._session, self._weights = session, merged
        self._binding = self._new_binding()  # buffers and captured graphs belong to the old session

    def refit_factors(self, factors: dict[str, np.ndarray], merged) -> None:
        """refit="factors": bind the low-rank factors of a new adapter set (all or nothing: checked first), and
        have the background thread bake `merged()` (that set's merged weights) into a session of the plain graph.
        The arrays are not copied: do not modify them afterwards."""
        if not self.factor_inputs:
            raise BackendError(f"{self.path.name} has no low-rank factor inputs; load the folder with refit='factors'.")
        missing = sorted(set(self._weight_specs) - set(factors))
        if missing:
            raise BackendError(f"{len(missing)} factor input(s) of {self.path.name} were not given: {_some(missing)}. "
                               "Pass every module's factors (lcmrt.adapters.AdapterBank.factors_for).")
        self._swap_feeds(self._checked_inputs(factors), merged)

    def _swap_feeds(self, feeds: dict[str, np.ndarray], bake) -> None:
        """Runs take `feeds` from now on; the background session (refit="background" or "factors") is rebuilt
        with `bake()`."""
        with self._fuse_lock:
            if self._fused is not None:  # freeing its gigabytes of weights took ~0.3 s of a full-size swap
                self._stale.append(self._fused)
            self._weight_feeds, self._bake, self._fused = feeds, bake, None
            self._weight_version += 1
        if self._fused_graph is not None:
            self._fuse_in_background()

    def settle(self, timeout: float | None = None) -> bool:
        """refit="background" or "factors": wait until the session with the current weights baked in runs (True), or
        `timeout` seconds pass (False). A failed background build raises its BackendError here."""
        with self._fuse_lock:
            done = self._fuse_lock.wait_for(lambda: self._fused_graph is None or self._fuse_error is not None
                                            or (self._fused is not None and self._fused[0] == self._weight_version),
                                            timeout)
            if self._fuse_error is not None:
                raise BackendError(f"Building the {self.component} session with the adapter weights baked in "
                                   f"failed ({self._fuse_error}); runs go on with the weights as inputs. Load with "
                                   "refit='inputs' to skip it.") from self._fuse_error
            return done

    def _check_fusable(self, names) -> None:
        """Every weight the background session bakes in must be an initializer the plain graph keeps as external
        data, so ONNX Runtime can replace it (`add_external_initializers`): check once, not in a background thread."""
        table = read_initializers(self._fused_graph)
        bad = [name for name in names if name not in table or table[name][1] is None]
        if bad:
            raise BackendError(f"{self._fused_graph.name} cannot take {len(bad)} weight input(s) of {self.path.name} "
                               f"as external initializers ({_some(bad)}). Rebuild the folder with `lcmrt build "
                               "--refittable`, or load with refit='inputs'.")

    def _fuse_in_background(self) -> None:
        with self._fuse_lock:
            if self._fuser is None:
                self._fuse_error = None
                self._fuser = threading.Thread(target=self._fuse, name=f"lcmrt-fuse-{self.component}", daemon=True)
                self._fuser.start()

    def _fuse(self) -> None:
        """Build sessions with the weight feeds baked in until one matches the current weights, then stop;
        a refit meanwhile makes the session being built stale, and the loop builds again."""
        while True:
            with self._fuse_lock:
                version, bake, stale = self._weight_version, self._bake, self._stale
                self._stale = []
            stale.clear()  # frees them in this thread, outside the lock
            try:
                session = self._create(bake(), self._fused_graph)
            except Exception as e:
                with self._fuse_lock:
                    self._fuse_error, self._fuser = e, None
                    self._fuse_lock.notify_all()
                return
            with self._fuse_lock:
                if version == self._weight_version:
                    self._fused, self._fuser = (version, session), None
                    self._fuse_lock.notify_all()
                    return
            del session

    def _checked_inputs(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Weights for the graph's weight inputs, checked against their names, shapes and dtypes."""
        unknown = [name for name in weights if name not in self._weight_specs]
        if unknown:
            raise BackendError(
                f"{len(unknown)} weight(s) are not refittable inputs of {self.path.name}: {_some(unknown)}. "
                "An adapter added after the build targets them: run `lcmrt adapter add` again, or load with "
                "refit='session'.")
        arrays = {}
        for name, value in weights.items():
            spec, value = self._weight_specs[name], np.asarray(value)
            if value.dtype != spec.dtype or value.shape != spec.shape:
                raise BackendError(f"weight {name!r} of {self.path.name}: expected {describe(spec.dtype, spec.shape)}, "
                                   f"got {describe(value.dtype, value.shape)}.")
            arrays[name] = np.require(value, requirements="C")
        return arrays

    def _checked(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Weights as C-contiguous arrays, after checking names, storage and shapes against the graph."""
        table = self._initializer_table()
        unknown = [name for name in weights if name not in table]
        if unknown:
            raise BackendError(
                f"{len(unknown)} weight(s) are not initializers of {self.path.name}: {_some(unknown)}. "
                "The folder's refit map does not match its graph; rebuild the folder with `lcmrt build`.")
        inline = [name for name in weights if table[name][1] is None]
        if inline:
            raise BackendError(
                f"{self.path.name} keeps {len(inline)} of these weights inside the graph file ({_some(inline)}); "
                "ONNX Runtime can only replace weights stored as external data. Rebuild the folder with "
                "`lcmrt build`, which stores refittable weights as external data.")
        arrays = {}
        for name, value in weights.items():
            spec = table[name][0]
            value = np.asarray(value)
            if value.dtype != spec.dtype or value.shape != spec.shape:
                raise BackendError(
                    f"weight {name!r} of {self.path.name}: expected {describe(spec.dtype, spec.shape)}, "
                    f"got {describe(value.dtype, value.shape)}.")
            arrays[name] = np.require(value, requirements="C")
        return arrays

    def _initializer_table(self) -> dict[str, tuple[TensorSpec, str | None]]:
        if self._initializers is None:
            self._initializers = read_initializers(self.path)
        return self._initializers


def cpu_graph_key() -> dict:
    """What a pre-optimized CPU graph depends on: ONNX Runtime's version and the CPU's instruction set."""
    return {"onnxruntime": ort.__version__, **cpu_description()}


class DeviceBinding:
    """Inputs and outputs of a GPU session in fixed device buffers, one I/O binding per set of input shapes.

    With the CUDA provider's `enable_cuda_graph`, the first run of each binding captures a CUDA graph and
    later runs replay it, so buffers must keep their addresses: new values are copied in place
    (`update_inplace`), and each shape set runs under its own `gpu_graph_id` (the UNet of a cfg folder has
    two batch sizes). Graph ids start at 1: 0 is the provider's default graph."""

    def __init__(self, session: OrtSession, device: str, device_id: int):
        self.session, self.device, self.device_id = session, device, device_id
        self._bindings: dict[tuple, tuple] = {}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        weights = self.session._weight_feeds  # refit="inputs": adapter weights are graph inputs too
        # a new set of weight names needs its own binding (and graph id): a captured graph keeps its buffers
        key = (tuple((name, feeds[name].shape) for name in self.session.inputs), tuple(sorted(weights)))
        if key not in self._bindings:
            self._bindings[key] = [*self._bind({**feeds, **weights}, graph_id=len(self._bindings) + 1), -1]
        binding = self._bindings[key]
        io, inputs, outputs, run_options, version = binding
        for name in self.session.inputs:
            inputs[name].update_inplace(np.ascontiguousarray(feeds[name]))
        if version != self.session._weight_version:  # weights change on refit only: copy them then, not per run
            for name, value in weights.items():
                inputs[name].update_inplace(value)
            binding[4] = self.session._weight_version
        self.session._session.run_with_iobinding(io, run_options)
        return {name: value.numpy() for name, value in outputs.items()}

    def _bind(self, feeds: dict[str, np.ndarray], graph_id: int) -> tuple:
        sizes = {}  # symbolic dimension -> size, from the fed inputs (an image's size follows its latents')
        for name, spec in self.session.inputs.items():
            sizes.update({d: n for d, n in zip(spec.shape, feeds[name].shape) if isinstance(d, str)})
        sizes = with_size_dims(sizes)
        io = self.session._session.io_binding()
        inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, self.device_id)
                  for name, value in feeds.items()}
        for name, value in inputs.items():
            io.bind_ortvalue_input(name, value)
        outputs = {}
        for name, spec in self.session.outputs.items():
            shape = [sizes[d] if isinstance(d, str) else d for d in spec.shape]
            outputs[name] = ort.OrtValue.ortvalue_from_shape_and_type(shape, spec.dtype, self.device, self.device_id)
            io.bind_ortvalue_output(name, outputs[name])
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return io, inputs, outputs, run_options


def _some(names: list[str]) -> str:
    return ", ".join(names[:_LISTED]) + (", ..." if len(names) > _LISTED else "")


# --- the initializer table of an .onnx file, read straight from the protobuf wire format -----------------
# Why by hand: the runtime does not depend on the `onnx` package (DESIGN.md: the runtime's imports), and
# `onnx.load(..., load_external_data=False)` would still parse every inline weight into memory (hundreds of
# MB for a text encoder) to read a few names and shapes; ONNX Runtime exposes no initializer list.
# ModelProto.graph = 7; GraphProto.initializer = 5; TensorProto: dims = 1, data_type = 2, name = 8,
# external_data = 13 (StringStringEntryProto: key = 1, value = 2), data_location = 14 (1 = EXTERNAL).
# Large inline tensors are skipped over, never copied (mmap).

def read_initializers(path: Path) -> dict[str, tuple[TensorSpec, str | None]]:
    """Initializer name -> (spec, the file it is stored in as external data, or None if inline) for the main
    graph of an .onnx file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        graph = [span for field, span in _fields(buf, 0, len(buf)) if field == 7]
        if not graph:
            raise BackendError(f"{path} has no graph. Rebuild the folder with `lcmrt build`.")
        table = {}
        for field, span in _fields(buf, *graph[-1]):
            if field == 5:
                spec, external = _tensor_header(buf, *span)
                table[spec.name] = (spec, external)
        return table


def _tensor_header(buf, start: int, end: int) -> tuple[TensorSpec, str | None]:
    dims, dtype, name, external, location = [], None, "", False, None
    for field, value in _fields(buf, start, end):
        if field == 1:
            if isinstance(value, tuple):  # packed repeated int64
                pos, stop = value
                while pos < stop:
                    dim, pos = _varint(buf, pos)
                    dims.append(dim)
            else:
                dims.append(value)
        elif field == 2:
            dtype = _ONNX_DTYPES.get(value)
        elif field == 8:
            name = buf[value[0]:value[1]].decode()
        elif field == 13:
            entry = dict(_fields(buf, *value))
            if 1 in entry and 2 in entry and buf[slice(*entry[1])] == b"location":
                location = buf[slice(*entry[2])].decode(errors="replace")
        elif field == 14:
            external = value == 1
    return TensorSpec(name, tuple(dims), np.dtype(dtype) if dtype else None), (location or "") if external else None


def check_external_data(path: Path, hashed: set[str]) -> None:
    """Refuse a graph that reads external data from a file the manifest does not hash (ONNX Runtime would
    open whatever path the graph names)."""
    unlisted = sorted({location for _, location in read_initializers(path).values()
                       if location is not None and location not in hashed})
    if unlisted:
        raise EngineFolderError(f"{path} reads its weights from {_some(unlisted)}, which the manifest does not "
                                f"list with a hash: lcmrt loads only files it can verify. {REBUILD}")


def _fields(buf, start: int, end: int):
    """(field number, value) of one message: an int for varints, a (start, end) span for everything else."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = (pos, pos + size), pos + size
        elif wire in (1, 5):  # fixed64, fixed32
            size = 8 if wire == 1 else 4
            value, pos = (pos, pos + size), pos + size
        else:
            raise BackendError(f"Unexpected protobuf wire type {wire} at byte {pos}: not an ONNX file.")
        yield key >> 3, value


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
