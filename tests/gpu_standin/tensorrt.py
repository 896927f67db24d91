"""CPU stand-in for the subset of the TensorRT Python API (10.x/11.x names) that lcmrt uses: builder, ONNX
parser, config flags, runtime, engine, execution context and refitter. Tests only (installed as `tensorrt`
by the `gpu_standin` fixture, with the stand-in CuPy).

The "plan" is a header (JSON: version, flags, marked/refittable weights, optimization profiles, workspace)
followed by the ONNX graph with its weights inline; the engine runs it with ONNX Runtime on the CPU, reading
and writing the stand-in CuPy buffers its tensor addresses point to.

Contracts enforced (ContractViolation; TensorRT's Python API documentation and NvInferRuntime.h):
- build: REFIT together with REFIT_INDIVIDUAL or REFIT_IDENTICAL; precision flags (FP16) on a strongly typed
  network; a graph with a varying dimension and no optimization profile, or a profile that does not cover it;
  the timing cache set on the config must come from that config.
- profiles: `set_optimization_profile_async` takes an existing index and a created stream, and forgets the
  input shapes set before (they must be set again); `set_input_shape` must fall in the active profile.
- run: `execute_async_v3` only with every input of a varying shape set (`set_input_shape`) and every I/O
  tensor address set, each pointing into a live device allocation (256-byte aligned) of the tensor's dtype
  with room for its current shape; never on the default stream; under capture only after one eager run of
  the context (warm-up; NVIDIA/TensorRT#2603); a captured execution replayed after a refit of its engine is
  an error (whether a graph sees refitted weights is undocumented: re-capture).
- refit: `set_named_weights` only for weights the engine has as refittable (REFIT: all; REFIT_INDIVIDUAL: the
  marked ones), with the prototype's dtype and count, from C-contiguous arrays; `refit_cuda_engine` only
  with `get_missing_weights()` empty and no unsynchronised work of the engine on any stream.
"""
from __future__ import annotations

import enum
import json
import struct

import numpy as np

from . import cupy as _cp
from .contracts import violate

__version__ = "10.9.0.34"
MAGIC = b"LCMRT-TRT-STANDIN\n"
# Groups of weights the "builder" fused into one layer: refitting one makes the others missing
# (`get_missing_weights`), as TensorRT does for e.g. fused Q/K/V projections. Tests add groups via the fixture.
FUSED_WEIGHT_GROUPS: list[set[str]] = []
built_configs: list[dict] = []  # header of every plan built, for tests to assert flags on


class Logger:
    VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = range(5)

    def __init__(self, min_severity=WARNING):
        self.min_severity = min_severity
        self.messages: list[str] = []

    def log(self, severity, message):
        self.messages.append(message)


class DataType(enum.Enum):
    FLOAT, HALF, INT8, INT32, BOOL, UINT8, INT64, DOUBLE = range(8)


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64, DataType.DOUBLE: np.float64}
_FROM_NP = {np.dtype(v): k for k, v in _NP.items()}


def nptype(dtype: DataType):
    return _NP[dtype]


class TensorIOMode(enum.Enum):
    NONE, INPUT, OUTPUT = range(3)


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class TensorLocation(enum.Enum):
    DEVICE, HOST = range(2)


def _builder_flags(version: str):
    names = ["REFIT", "REFIT_IDENTICAL", "REFIT_INDIVIDUAL", "STRIP_PLAN", "VERSION_COMPATIBLE", "GPU_FALLBACK"]
    if int(version.split(".")[0]) < 11:  # removed in TensorRT 11 (its release notes)
        names += ["FP16", "INT8", "BF16", "OBEY_PRECISION_CONSTRAINTS"]
    return enum.Enum("BuilderFlag", names)


BuilderFlag = _builder_flags(__version__)
PRECISION_FLAGS = ("FP16", "INT8", "BF16")


def set_version(version: str) -> None:
    """Which TensorRT the stand-in is (its BuilderFlag enum follows)."""
    global __version__, BuilderFlag
    __version__, BuilderFlag = version, _builder_flags(version)


# --- build ---------------------------------------------------------------------------------------------
class Weights:
    def __init__(self, a, ptr=None, count=None):
        if isinstance(a, DataType):  # Weights(dtype, ptr, count): device/host memory by address
            mem = _cp.resolve(int(ptr))
            if mem is None:
                raise violate(f"Weights({a.name}, {ptr:#x}, {count}): no live allocation at that address.")
            offset = int(ptr) - mem.ptr
            self.array = np.frombuffer(mem.host.data, _NP[a], int(count), offset)
        else:
            if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
                raise violate("trt.Weights(array) needs a C-contiguous numpy array (it is read in place).")
            self.array = a
        self.dtype = _FROM_NP[self.array.dtype]
        self.size = int(self.array.size)


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.logger, self.errors = network, logger, []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=True)  # resolves external data next to the graph
        except Exception as e:  # noqa: BLE001 - the parser reports errors, it does not raise
            self.errors.append(f"{type(e).__name__}: {e}")
            return False
        self.network.model = model
        return True


class Network:
    def __init__(self, flags: int):
        self.flags, self.model, self.marked = int(flags), None, []

    @property
    def strongly_typed(self) -> bool:
        return bool(self.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))

    def mark_weights_refittable(self, name: str) -> bool:
        if self.model is None or name not in {t.name for t in self.model.graph.initializer}:
            return False
        self.marked.append(name)
        return True

    def are_weights_marked_refittable(self, name: str) -> bool:
        return name in self.marked


class OptimizationProfile:
    def __init__(self):
        self.shapes: dict[str, tuple] = {}
        self.extra_memory_target = 1.0  # TensorRT's default: up to the weights' size again for this profile

    def set_shape(self, name, lo, opt, hi) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class TimingCache:
    def __init__(self, owner, data: bytes):
        self.owner, self.builds = owner, (json.loads(data[len(b"TC"):]) if data.startswith(b"TC") else 0)

    def serialize(self) -> bytes:
        return b"TC" + json.dumps(self.builds).encode()


class BuilderConfig:
    def __init__(self):
        self.flags: set[str] = set()
        self.pool_limits: dict = {}
        self.builder_optimization_level = 3
        self.profiles: list[OptimizationProfile] = []
        self._cache: TimingCache | None = None

    def set_flag(self, flag) -> None:
        self.flags.add(flag.name)

    def get_flag(self, flag) -> bool:
        return flag.name in self.flags

    def set_memory_pool_limit(self, pool, nbytes: int) -> None:
        self.pool_limits[pool.name] = int(nbytes)

    def add_optimization_profile(self, profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> TimingCache:
        return TimingCache(self, bytes(data))

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        if cache.owner is not self:
            raise violate("set_timing_cache() with a cache created by another builder config.")
        self._cache = cache
        return True

    def get_timing_cache(self) -> TimingCache | None:
        return self._cache


def _io_specs(model) -> list[dict]:
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    specs = []
    for mode, values in (("INPUT", [v for v in model.graph.input if v.name not in inits]), ("OUTPUT", model.graph.output)):
        for v in values:
            dims = v.type.tensor_type.shape.dim
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
            # the names of varying dimensions stand for TensorRT's shape inference of the outputs
            names = [d.dim_param if d.HasField("dim_param") else None for d in dims]
            specs.append({"name": v.name, "mode": mode, "shape": shape, "dims": names, "dtype": _FROM_NP[dtype].name})
    return specs


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags: int = 0) -> Network:
        return Network(flags)

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: Network, config: BuilderConfig):
        flags = config.flags
        if "REFIT" in flags and ({"REFIT_INDIVIDUAL", "REFIT_IDENTICAL"} & flags):
            raise violate(f"builder flags {sorted(flags)}: REFIT_INDIVIDUAL/REFIT_IDENTICAL cannot be combined "
                          "with REFIT.")
        if network.strongly_typed and flags & set(PRECISION_FLAGS):
            raise violate(f"precision flags {sorted(flags & set(PRECISION_FLAGS))} on a strongly typed network.")
        if network.model is None:
            raise violate("build_serialized_network() before the parser filled the network.")
        specs = _io_specs(network.model)
        if any(not 0.0 <= p.extra_memory_target <= 1.0 for p in config.profiles):
            raise violate("extra_memory_target must be in [0, 1].")
        profiles = [p.shapes for p in config.profiles]
        for spec in specs:
            if spec["mode"] == "INPUT" and -1 in spec["shape"]:
                for profile in profiles or [{}]:
                    if spec["name"] not in profile:
                        raise violate(f"input {spec['name']} has a varying dimension but an optimization profile "
                                      "does not give its shapes (add_optimization_profile is required).")
                    lo, opt, hi = profile[spec["name"]]
                    for dims in (lo, opt, hi):
                        if len(dims) != len(spec["shape"]) or any(s not in (-1, d) for s, d in zip(spec["shape"], dims)):
                            raise violate(f"profile shapes {profile[spec['name']]} of {spec['name']} do not fit "
                                          f"{spec['shape']}.")
                    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                        raise violate(f"profile shapes {profile[spec['name']]} of {spec['name']}: min <= opt <= max "
                                      "does not hold.")
        inits = [t.name for t in network.model.graph.initializer]
        if "REFIT_INDIVIDUAL" in flags:
            refittable = sorted(set(network.marked))
        elif "REFIT" in flags or "REFIT_IDENTICAL" in flags:
            refittable = sorted(inits)
        else:
            refittable = []
        groups = [sorted(g & set(refittable)) for g in FUSED_WEIGHT_GROUPS if len(g & set(refittable)) > 1]
        header = {"version": __version__, "flags": sorted(flags), "strongly_typed": network.strongly_typed,
                  "marked": list(network.marked), "refittable": refittable, "fused_groups": groups,
                  "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles], "io": specs,
                  "extra_memory_targets": [p.extra_memory_target for p in config.profiles],
                  "pool_limits": config.pool_limits, "optimization_level": config.builder_optimization_level}
        built_configs.append(header)
        if config._cache is not None:
            config._cache.builds += 1
        raw = json.dumps(header).encode()
        return MAGIC + struct.pack("<Q", len(raw)) + raw + network.model.SerializeToString()


def read_plan_header(plan: bytes) -> dict:
    """The JSON header of a stand-in plan (for tests)."""
    (size,) = struct.unpack("<Q", plan[len(MAGIC):len(MAGIC) + 8])
    return json.loads(plan[len(MAGIC) + 8:len(MAGIC) + 8 + size])


# --- runtime ---------------------------------------------------------------------------------------------
class Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, plan) -> "ICudaEngine | None":
        plan = bytes(plan)
        if not plan.startswith(MAGIC):
            self.logger.log(Logger.ERROR, "deserialize: not a plan (magic mismatch)")
            return None
        header = read_plan_header(plan)
        (size,) = struct.unpack("<Q", plan[len(MAGIC):len(MAGIC) + 8])
        if header["version"] != __version__:  # plans run only with the TensorRT version that built them
            self.logger.log(Logger.ERROR, f"plan built by TensorRT {header['version']}, this is {__version__}")
            return None
        return ICudaEngine(header, plan[len(MAGIC) + 8 + size:])


class ICudaEngine:
    def __init__(self, header: dict, model_bytes: bytes):
        self.header, self._model_bytes = header, model_bytes
        self._io = {s["name"]: s for s in header["io"]}
        self.values: dict[str, np.ndarray] = {}  # refitted weights
        self.weights_version = 0
        self._session = None

    num_io_tensors = property(lambda self: len(self._io))
    num_optimization_profiles = property(lambda self: max(1, len(self.header["profiles"])))
    refittable = property(lambda self: bool(self.header["refittable"]))

    def get_tensor_name(self, i: int) -> str:
        return self.header["io"][i]["name"]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode[self._io[name]["mode"]] if name in self._io else TensorIOMode.NONE

    def get_tensor_shape(self, name: str) -> tuple:
        return tuple(self._io[name]["shape"])

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType[self._io[name]["dtype"]]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list:
        profiles = self.header["profiles"]
        if not 0 <= profile_index < len(profiles) or name not in profiles[profile_index]:
            raise violate(f"get_tensor_profile_shape({name!r}, {profile_index}): not an input with shapes in that "
                          "profile.")
        return [tuple(s) for s in profiles[profile_index][name]]

    def create_execution_context(self) -> "IExecutionContext":
        return IExecutionContext(self)

    def session(self):
        """ONNX Runtime (CPU) session of the graph with the current weights."""
        if self._session is None:
            import onnx
            import onnxruntime as ort
            from onnx import numpy_helper

            model = onnx.load_from_string(self._model_bytes)
            for tensor in model.graph.initializer:
                if tensor.name in self.values:
                    tensor.CopyFrom(numpy_helper.from_array(self.values[tensor.name].reshape(tuple(tensor.dims)),
                                                            tensor.name))
            self._session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return self._session


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.eager_runs = 0
        self.profile = 0
        self.profile_switches = 0

    def set_optimization_profile_async(self, index: int, stream_handle: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            return False
        if int(stream_handle) == 0 or _cp.stream_from_handle(stream_handle) is None:
            raise violate("set_optimization_profile_async needs a created, live stream.")
        self.profile, self.shapes = index, {}  # the shapes of the previous profile no longer hold
        self.profile_switches += 1
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        """An input's set shape (-1 where unset and varying); an output's as the inputs' named dimensions give it."""
        spec = self.engine._io[name]
        if spec["mode"] == "INPUT":
            return self.shapes.get(name, tuple(spec["shape"]))
        from lcmrt.manifest import with_size_dims

        named = {}
        for n, shape in self.shapes.items():
            named.update({d: v for d, v in zip(self.engine._io[n]["dims"], shape) if d})
        named = with_size_dims(named)
        return tuple(s if s != -1 else named.get(d, -1) for s, d in zip(spec["shape"], spec["dims"]))

    def set_input_shape(self, name: str, shape) -> bool:
        spec = self.engine._io.get(name)
        if spec is None or spec["mode"] != "INPUT":
            return False
        shape = tuple(int(d) for d in shape)
        static = spec["shape"]
        if len(shape) != len(static) or any(s != -1 and s != d for s, d in zip(static, shape)):
            return False
        if -1 in static:
            lo, _, hi = self.engine.header["profiles"][self.profile][name]
            if any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
                return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.engine._io:
            return False
        self.addresses[name] = int(ptr)
        return True

    def _shape(self, name: str) -> tuple:
        spec = self.engine._io[name]
        if -1 not in spec["shape"]:
            return tuple(spec["shape"])
        if spec["mode"] == "INPUT":
            if name not in self.shapes:
                raise violate(f"execute_async_v3: input {name!r} has a varying shape {spec['shape']} and "
                              "set_input_shape was not called for it.")
            return self.shapes[name]
        shape = self.get_tensor_shape(name)
        if -1 in shape:
            raise violate(f"execute_async_v3: the shape of output {name!r} is not determined by the inputs set.")
        return shape

    def _view(self, name: str) -> np.ndarray:
        spec = self.engine._io[name]
        if name not in self.addresses:
            raise violate(f"execute_async_v3: no address set for tensor {name!r} (set_tensor_address).")
        ptr, dtype, shape = self.addresses[name], np.dtype(_NP[DataType[spec["dtype"]]]), self._shape(name)
        if ptr % _cp.ALIGNMENT:
            raise violate(f"tensor {name!r}: address {ptr:#x} is not {_cp.ALIGNMENT}-byte aligned.")
        mem = _cp.resolve(ptr)
        if mem is None:
            raise violate(f"tensor {name!r}: address {ptr:#x} is not in a live device allocation (freed?).")
        if mem.dtype != dtype:
            raise violate(f"tensor {name!r} is {dtype}, its buffer at {ptr:#x} holds {mem.dtype}.")
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if ptr + nbytes > mem.ptr + mem.nbytes:
            raise violate(f"tensor {name!r} {list(shape)} needs {nbytes} bytes at {ptr:#x}; the buffer has "
                          f"{mem.ptr + mem.nbytes - ptr}.")
        return np.ndarray(shape, dtype, buffer=mem.host.data, offset=ptr - mem.ptr)

    def execute_async_v3(self, stream_handle: int) -> bool:
        if int(stream_handle) == 0:
            raise violate("execute_async_v3 on the default stream (0): use a created stream.")
        stream = _cp.stream_from_handle(stream_handle)
        if stream is None:
            raise violate(f"execute_async_v3: {stream_handle:#x} is not a live stream.")
        views = {name: self._view(name) for name in self.engine._io}  # addresses are read at enqueue/capture
        engine = self.engine
        if stream.is_capturing() and self.eager_runs == 0:
            stream.capture_failed = "TensorRT enqueue captured before any eager run (no warm-up)"
            raise violate("execute_async_v3 captured before one eager run of the context: TensorRT initializes "
                          "on the first enqueue, which a capture forbids (warm up first; NVIDIA/TensorRT#2603).")
        version = engine.weights_version
        capturing = stream.is_capturing()

        def run():
            if capturing and engine.weights_version != version:
                raise violate("a CUDA graph captured before a refit of its engine was replayed: re-capture after "
                              "refitting (TensorRT does not document whether captured graphs see refitted weights).")
            session = engine.session()
            feeds = {n: views[n].copy() for n, s in engine._io.items() if s["mode"] == "INPUT"}
            names = [n for n, s in engine._io.items() if s["mode"] == "OUTPUT"]
            for name, value in zip(names, session.run(names, feeds)):
                if value.shape != views[name].shape:
                    raise violate(f"output {name!r} is {list(value.shape)}, its bound region {list(views[name].shape)}.")
                np.copyto(views[name], value)

        run.engines = (engine,)
        stream.enqueue(run, run.engines)
        if not capturing:
            self.eager_runs += 1
        return True


class Refitter:
    def __init__(self, engine: ICudaEngine, logger):
        self.engine, self.logger = engine, logger
        self._set: dict[str, Weights] = {}

    def get_all_weights(self) -> list[str]:
        return list(self.engine.header["refittable"])

    def get_weights_prototype(self, name: str):
        if name not in self.engine.header["refittable"]:
            return _Prototype(DataType.FLOAT, -1)
        import onnx
        from onnx import helper

        if not hasattr(self.engine, "_shapes"):
            model = onnx.load_from_string(self.engine._model_bytes)
            self.engine._shapes = {t.name: (int(np.prod(t.dims)), helper.tensor_dtype_to_np_dtype(t.data_type))
                                   for t in model.graph.initializer}
        size, dtype = self.engine._shapes[name]
        return _Prototype(_FROM_NP[np.dtype(dtype)], size)

    def set_named_weights(self, name: str, weights: Weights, location=None) -> bool:
        proto = self.get_weights_prototype(name)
        if proto.size < 0:
            violate(f"set_named_weights({name!r}): not a refittable weight of this engine.")
            return False
        if weights.dtype != proto.dtype or weights.size != proto.size:
            violate(f"set_named_weights({name!r}): {weights.dtype.name}x{weights.size}, the engine holds "
                    f"{proto.dtype.name}x{proto.size}.")
            return False
        self._set[name] = weights
        return True

    def get_missing_weights(self) -> list[str]:
        missing = set()
        for group in self.engine.header["fused_groups"]:
            if set(group) & set(self._set):
                missing |= set(group) - set(self._set)
        return sorted(missing)

    def refit_cuda_engine(self) -> bool:
        missing = self.get_missing_weights()
        if missing:
            violate(f"refit_cuda_engine() with weights still missing: {missing} (get_missing_weights() must be "
                    "empty first).")
            return False
        busy = [s for s in _cp._streams.values() if s() is not None and self.engine in s().pending]
        if busy:
            raise violate("refit_cuda_engine() while the engine has unsynchronised work on a stream (undefined "
                          "behaviour: synchronize first).")
        for name, weights in self._set.items():
            self.engine.values[name] = np.array(weights.array, copy=True)  # read at refit time, as TensorRT does
        self._set = {}
        self.engine.weights_version += 1
        self.engine._session = None
        return True


class _Prototype:
    def __init__(self, dtype: DataType, size: int):
        self.dtype, self.size = dtype, size


def reset() -> None:
    FUSED_WEIGHT_GROUPS.clear()
    built_configs.clear()
    set_version("10.9.0.34")
