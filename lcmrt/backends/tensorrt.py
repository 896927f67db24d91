"""TensorRT backend: native engines from the folder's `trt/<sm>-<version>/`, run on one CUDA stream, adapters
swapped by refit, and the LCM step captured as a CUDA graph.

- Load: the engine for this GPU's compute capability and this TensorRT version, built from the folder's
  current graph (`engine_keys.select_engine`; anything else is an error naming the rebuild command).
- Buffers: every I/O tensor gets one device buffer at load (CuPy), bound once with `set_tensor_address`,
  as large as its largest shape in any optimization profile (a folder of several sizes has one profile per
  size, each with the UNet's batches of a cfg folder). A run selects the profile its input shapes fall in
  (`set_optimization_profile_async`), sets the shapes, and uses the front of each buffer. `run` copies in,
  `execute_async_v3`, copies out.
- Refit: `trt.Refitter` with the new values of the requested weights; weights the engine additionally
  needs (`get_missing_weights()`, e.g. a partner fused by the builder) get their current value, which is
  the pristine base value stored at build time unless an earlier refit changed it. All arrays are prepared
  before anything is set; a failed refit restores the previous values.
- CUDA graph (`CudaGraphDenoiser`): one LCM step (UNet, classifier-free guidance, the sampler's
  `apply_step` on CuPy arrays, noise from a fixed buffer) is captured once and replayed per step. Per-step
  scalars (timestep, sampler coefficients, guidance scale) live in small device buffers that are refilled
  before each launch, so one graph serves every step but the last (which adds no noise: a second graph).
  Warm-up runs eagerly before capture; if capture fails the step runs eagerly; after a refit, and for another
  latent shape (batch or size), the graphs are captured again (whether a captured graph sees refitted weights
  is not documented).
- Threads: a session's buffers, execution context and CUDA graphs are shared by all its runs, so `run`, the
  denoise loop and `refit` take the session's `_run_lock`: one at a time per session (different sessions,
  e.g. one thread's VAE decode and another's UNet step, still run concurrently).

TensorRT and CuPy are imported only when this backend is created.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendError
from ..manifest import Engine, Manifest, folder_file, verify_files
from .base import Backend, Session, TensorSpec
from .engine_keys import EngineKey, compute_capability, rebuild_command, select_engine

log = logging.getLogger(__name__)

# TensorRT DataType names -> numpy (the types lcmrt graphs exchange; bool/uint8 for completeness).
_TRT_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "INT8": np.int8,
               "UINT8": np.uint8, "BOOL": np.bool_, "DOUBLE": np.float64}
# Sampler coefficients that change per step and so are read from a device buffer inside the captured graph
# (lcmrt.sampler.StepCoefficients fields); clip_range and final are fixed per graph.
DEVICE_COEFFICIENTS = ("x0_from_sample", "x0_from_output", "x0_divisor", "c_skip", "c_out",
                       "sqrt_alpha_next", "sqrt_beta_next")
# `precision=` as `lcmrt generate --precision` passes it: an engine's precision is fixed when it is built
# (fp16 engines come from the fp16 graphs, components without one get an fp32 engine), so "fp16" (or None)
# takes the engines as built (Pipeline.load refuses "fp16" when no engine is fp16) and "fp32" insists on fp32
# engines; TensorRT engines here are never int8.
PRECISIONS = (None, "fp16", "fp32")
INSTALL_HINT = ('Install the GPU extra on the GPU machine: `pip install "lcmrt[gpu]"` (TensorRT, CuPy, '
                "ONNX Runtime GPU); on Jetson use JetPack's TensorRT and a CuPy wheel for its CUDA.")


def numpy_dtype(trt_dtype) -> np.dtype:
    """numpy dtype of a TensorRT DataType (or its name)."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype))
    name = name.rsplit(".", 1)[-1].upper()
    if name not in _TRT_DTYPES:
        raise BackendError(f"TensorRT tensor type {name} has no numpy equivalent lcmrt can exchange.")
    return np.dtype(_TRT_DTYPES[name])


def parse_cupy_compute_capability(text: str) -> str:
    """CuPy writes compute capability 8.6 as "86" and 10.0 as "100": return "MAJOR.MINOR"."""
    if not text.isdigit() or len(text) < 2:
        raise BackendError(f"Unexpected compute capability {text!r} from CuPy.")
    return compute_capability(int(text[:-1]), int(text[-1]))


def gpu_compute_capability(device_id: int = 0) -> str:
    import cupy

    return parse_cupy_compute_capability(str(cupy.cuda.Device(device_id).compute_capability))


@dataclass(frozen=True)
class BufferPlan:
    """One I/O tensor: its engine shape (-1 where it varies between or within profiles) and the number of
    elements its device buffer holds (its largest shape's)."""

    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: np.dtype
    capacity: int

    @property
    def nbytes(self) -> int:
        return self.capacity * self.dtype.itemsize

    def spec(self) -> TensorSpec:
        shape = tuple(("batch" if i == 0 else f"dim{i}") if d < 0 else d for i, d in enumerate(self.shape))
        return TensorSpec(self.name, shape, self.dtype)


def plan_buffer(name: str, is_input: bool, shape: tuple, dtype, largest: list[tuple] = ()) -> BufferPlan:
    """Buffer for a tensor whose engine shape may hold -1 (varying); `largest` gives its largest shape in each
    optimization profile."""
    shape = tuple(int(d) for d in shape)
    if -1 not in shape:
        return BufferPlan(name, is_input, shape, np.dtype(dtype), int(np.prod(shape)))
    if not largest:
        raise BackendError(f"Tensor {name} varies in shape but the engine gives no largest shape.")
    return BufferPlan(name, is_input, shape, np.dtype(dtype), max(int(np.prod(s)) for s in largest))


def fits(shape: tuple, plan: BufferPlan) -> bool:
    """`shape` has the tensor's rank and fixed dimensions, and fits its buffer (the profiles decide the rest)."""
    return (len(shape) == len(plan.shape) and all(p < 0 or s == p for s, p in zip(shape, plan.shape))
            and 1 <= int(np.prod(shape)) <= plan.capacity)


def profile_index(profiles: list[dict[str, tuple]], shapes: dict[str, tuple]) -> int | None:
    """The first optimization profile ({input: (min, opt, max)}) that admits every input shape, or None."""
    for i, profile in enumerate(profiles):
        if all(all(lo <= d <= hi for lo, d, hi in zip(profile[name][0], shape, profile[name][2]))
               for name, shape in shapes.items()):
            return i
    return None


def coefficient_vector(coeffs) -> np.ndarray:
    """The per-step scalars of a StepCoefficients as the float32 vector the device buffer holds."""
    return np.array([getattr(coeffs, f) for f in DEVICE_COEFFICIENTS], dtype=np.float32)


def device_coefficients(coeffs, vector):
    """StepCoefficients whose per-step scalars are 0-d views of `vector` (numpy or CuPy), so a captured
    graph reads them from memory instead of baking them in as kernel arguments."""
    return coeffs._replace(**{f: vector[i] for i, f in enumerate(DEVICE_COEFFICIENTS)})


def _import_gpu():
    try:
        import cupy
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(f"The tensorrt backend needs TensorRT and CuPy: {e}. {INSTALL_HINT}") from None
    return trt, cupy


class TensorRTBackend(Backend):
    """Native TensorRT engines on GPU `device_id`; `cuda_graphs=False` runs the LCM step eagerly."""

    name = "tensorrt"

    def __init__(self, device_id: int = 0, cuda_graphs: bool = True, verify_plans: bool = True,
                 precision: str | None = None):
        if precision not in PRECISIONS:
            raise BackendError(f"precision must be one of {', '.join(p for p in PRECISIONS if p)} for the tensorrt "
                               f"backend, got {precision!r}.")
        self.precision = precision
        self.trt, self.cupy = _import_gpu()
        try:
            self.cupy.cuda.Device(device_id).use()
            cc = gpu_compute_capability(device_id)
        except Exception as e:  # CuPy raises CUDARuntimeError without a driver or GPU
            raise BackendError(f"No usable CUDA GPU {device_id} for the tensorrt backend: {e}") from e
        self.device_id = device_id
        self.key = EngineKey(cc, self.trt.__version__)
        self.cuda_graphs = cuda_graphs
        self.verify_plans = verify_plans
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)

    @staticmethod
    def installed() -> bool:
        """TensorRT and CuPy importable (without importing them)."""
        return all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "cupy"))

    def load(self, folder: Path, manifest: Manifest | dict, component: str, weights: dict | None = None) -> TrtSession:
        folder = Path(folder)
        entry = select_engine(folder, manifest, component, self.key, check_plan_hash=self.verify_plans)
        if self.precision == "fp32" and entry.precision != "fp32":
            raise BackendError(f"The {component} TensorRT engine in {folder} is {entry.precision}, but precision "
                               f"fp32 was asked for. Rebuild the engines without --fp16 (`{rebuild_command(folder)}`) "
                               "or leave precision unset.")
        session = TrtSession(self, folder, entry, component)
        if weights:  # the engine holds the base weights; a refit is cheap here
            session.refit(weights)
        return session


class TrtSession(Session):
    def __init__(self, backend: TensorRTBackend, folder: Path, entry: Engine, component: str):
        trt, cp = backend.trt, backend.cupy
        self.trt, self.cp, self.component, self.folder = trt, cp, component, folder
        self.entry = entry
        self.precision = entry.precision
        self.logger = backend.logger
        self.engine = backend.runtime.deserialize_cuda_engine(folder_file(folder, entry.file).read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not load {entry.file} (see its log above). Rebuild it with "
                               f"`{rebuild_command(folder)}`.")
        self.context = self.engine.create_execution_context()
        # runs share the bound buffers: a second run would overwrite the first one's inputs and outputs
        self._run_lock = threading.Lock()
        self.cuda_graphs = backend.cuda_graphs
        self._loop: CudaGraphDenoiser | None = None
        self.stream = cp.cuda.Stream(non_blocking=True)  # never the default stream
        self._profile, self._shapes = 0, {}  # the context's profile and the varying input shapes set in it
        self.profiles = self._read_profiles()
        self.plans = self._plan_buffers()
        self.buffers = {}
        for plan in self.plans.values():
            self.buffers[plan.name] = cp.empty((plan.capacity,), dtype=plan.dtype)
            if not self.context.set_tensor_address(plan.name, self.buffers[plan.name].data.ptr):
                raise BackendError(f"TensorRT refused the device buffer of {plan.name} ({component}).")
        self.inputs = {p.name: p.spec() for p in self.plans.values() if p.is_input}
        self.outputs = {p.name: p.spec() for p in self.plans.values() if not p.is_input}
        self.weights_version = 0  # bumped by refit, so captured graphs know to re-capture
        self._refitter = None
        self._values: dict[str, np.ndarray] = {}  # weights changed by refit, in the engine's dtype
        self._pristine: dict[str, np.ndarray] | None = None

    def _names(self, mode) -> list[str]:
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        return [n for n in names if (engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT) == (mode == "input")]

    def _read_profiles(self) -> list[dict[str, tuple]]:
        """{varying input: (min, opt, max) shapes} of each optimization profile ([{}] for a static engine)."""
        varying = [n for n in self._names("input") if -1 in tuple(self.engine.get_tensor_shape(n))]
        if not varying:
            return [{}]
        return [{n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, p)) for n in varying}
                for p in range(self.engine.num_optimization_profiles)]

    def _plan_buffers(self) -> dict[str, BufferPlan]:
        """Each tensor's buffer holds its largest shape over the profiles: an input's profile maximum, an
        output's shape at its profile's maximum inputs (asked of the context, which infers it)."""
        engine, plans = self.engine, {}
        largest = {n: [] for n in self._names("input") + self._names("output")}
        for profile in self.profiles:
            if profile:
                self.set_shapes({n: hi for n, (_, _, hi) in profile.items()})
            for name in largest:
                largest[name].append(tuple(self.context.get_tensor_shape(name)))
        for name, shapes in largest.items():
            plans[name] = plan_buffer(name, engine.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT,
                                      tuple(engine.get_tensor_shape(name)), numpy_dtype(engine.get_tensor_dtype(name)),
                                      shapes)
        return plans

    # --- eager runs -------------------------------------------------------------------------------------
    def set_shapes(self, shapes: dict[str, tuple]) -> None:
        """Select the profile admitting the varying inputs' `shapes` and set them (no-op where unchanged)."""
        shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        if shapes == self._shapes:
            return
        index = profile_index(self.profiles, shapes)
        if index is None:
            raise BackendError(f"{self.component}: input shapes {shapes} are outside the engine's optimization "
                               f"profiles. Rebuild the engines for the folder's sizes with "
                               f"`{rebuild_command(self.folder)}`.")
        if index != self._profile:
            if not self.context.set_optimization_profile_async(index, self.stream.ptr):
                raise BackendError(f"TensorRT refused optimization profile {index} of {self.component}.")
            self._profile, self._shapes = index, {}  # a new profile forgets the input shapes
        for name, shape in shapes.items():
            if self._shapes.get(name) != shape and not self.context.set_input_shape(name, shape):
                raise BackendError(f"{self.component}: TensorRT refused the shape {list(shape)} of {name}.")
        self._shapes = shapes

    def execute(self) -> None:
        """Enqueue the engine on the session's stream with the bound buffers."""
        if not self.context.execute_async_v3(self.stream.ptr):
            raise BackendError(f"TensorRT failed to enqueue {self.component} (see its log above).")

    def view(self, name: str):
        """The front of a tensor's buffer, in its current shape (set_shapes first where it varies)."""
        plan, buf = self.plans[name], self.buffers[name]
        shape = plan.shape if -1 not in plan.shape else tuple(int(d) for d in self.context.get_tensor_shape(name))
        return buf[:int(np.prod(shape))].reshape(shape)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_feeds(feeds)
        with self._run_lock:
            self.set_shapes({n: feeds[n].shape for n in self.profiles[0]})
            for name in self.inputs:
                self.view(name).set(np.ascontiguousarray(feeds[name]), stream=self.stream)
            self.execute()
            outs = {name: self.view(name).get(stream=self.stream) for name in self.outputs}
            self.stream.synchronize()
        return outs

    def _check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        if set(feeds) != set(self.inputs):
            raise BackendError(f"{self.component} takes inputs {', '.join(self.inputs)}; got {', '.join(feeds)}.")
        for name in self.inputs:
            plan, value = self.plans[name], feeds[name]
            if not isinstance(value, np.ndarray) or value.dtype != plan.dtype or not fits(value.shape, plan):
                got = f"{value.dtype}{list(value.shape)}" if isinstance(value, np.ndarray) else type(value).__name__
                raise BackendError(f"{self.component} input {name!r}: expected {plan.dtype}{list(plan.shape)} "
                                   f"(-1: varies), got {got}.")

    def denoise_loop(self, shape: tuple[int, ...]) -> "CudaGraphDenoiser | None":
        """The LCM loop on the device for latents of `shape`, one CUDA-graph launch per step (UNet only)."""
        if "sample" not in self.plans:
            return None
        shape = tuple(int(d) for d in shape)
        with self._run_lock:
            if self._loop is None or self._loop.shape != shape:
                self._loop = CudaGraphDenoiser(self, shape, use_graphs=self.cuda_graphs)
            return self._loop

    # --- refit ------------------------------------------------------------------------------------------
    def refittable(self) -> bool:
        return self.entry.refit_base is not None

    def refit(self, weights: dict[str, np.ndarray]) -> None:
        """Set graph weights (initializer name -> full new value) in the engine. All or nothing."""
        if not self.refittable():
            raise BackendError(
                f"The {self.component} engine was built without refittable weights (the folder had no refit map "
                f"for it). Rebuild it with `{rebuild_command(self.folder)}` after adding adapters.")
        trt = self.trt
        if self._refitter is None:
            self._refitter = trt.Refitter(self.engine, self.logger)
            self._refittable = set(self._refitter.get_all_weights())
        refitter = self._refitter
        unknown = sorted(n for n in weights if n not in self._refittable)
        if unknown:
            raise BackendError(
                f"{len(unknown)} weight(s) are not refittable in the {self.component} engine: "
                f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}. Rebuild the engines with "
                f"`{rebuild_command(self.folder)}` so the refit map's weights are marked refittable.")
        new = {name: self._engine_array(refitter, name, value) for name, value in weights.items()}
        previous = {name: self._current(name) for name in new}
        with self._run_lock:  # no run of this session in flight while its engine changes
            self.stream.synchronize()  # refitting with work in flight is undefined behaviour
            try:
                self._apply(refitter, new)
            except BackendError:
                try:
                    self._apply(refitter, previous)
                except BackendError as e:
                    log.error("restoring the previous %s weights after a failed refit also failed: %s",
                              self.component, e)
                raise
            self._values.update(new)
            self.weights_version += 1

    def _engine_array(self, refitter, name: str, value) -> np.ndarray:
        proto = refitter.get_weights_prototype(name)
        array = np.ascontiguousarray(np.asarray(value), dtype=numpy_dtype(proto.dtype))
        if array.size != proto.size:
            raise BackendError(f"weight {name!r} of the {self.component} engine holds {proto.size} values; "
                               f"got {array.size} (shape {list(np.shape(value))}).")
        return array

    def _current(self, name: str) -> np.ndarray:
        if name in self._values:
            return self._values[name]
        if self._pristine is None:
            from safetensors.numpy import load_file

            verify_files(self.folder, {self.entry.refit_base: self.entry.refit_base_sha256})
            self._pristine = load_file(str(folder_file(self.folder, self.entry.refit_base)))
        if name not in self._pristine:
            raise BackendError(f"The {self.component} engine needs weight {name!r} to refit, but its base value "
                               f"was not stored at build time. Rebuild with `{rebuild_command(self.folder)}`.")
        return self._engine_array(self._refitter, name, self._pristine[name])

    def _apply(self, refitter, arrays: dict[str, np.ndarray]) -> None:
        trt, keep = self.trt, dict(arrays)  # Weights point into the arrays: keep them alive until refit ends
        for name, array in arrays.items():
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise BackendError(f"TensorRT rejected the new value of {name!r} ({self.component}).")
        missing = list(refitter.get_missing_weights())
        for name in missing:  # weights tied to the changed ones (e.g. fused by the builder): current values
            keep[name] = self._current(name)
            refitter.set_named_weights(name, trt.Weights(keep[name]))
        still = list(refitter.get_missing_weights())
        if still:
            raise BackendError(f"TensorRT still needs {len(still)} weight(s) to refit {self.component}: "
                               f"{', '.join(still[:5])}. Nothing was changed.")
        if not refitter.refit_cuda_engine():
            raise BackendError(f"TensorRT failed to refit the {self.component} engine (see its log above).")
        del keep


class CudaGraphDenoiser:
    """The LCM denoising loop on the GPU for a TensorRT UNet session: latents, noise and the sampler update
    stay on the device, and each step is one CUDA-graph launch (or an eager run where capture fails)."""

    def __init__(self, unet: TrtSession, shape: tuple[int, ...], use_graphs: bool = True):
        self.unet, self.cp, self.shape, self.n, self.use_graphs = unet, unet.cp, shape, shape[0], use_graphs
        cp = self.cp  # latents: [N, 4, H/8, W/8]
        with unet.stream:
            self.x = cp.zeros(shape, dtype=np.float32)
            self.noise = cp.zeros(shape, dtype=np.float32)
            self.coef = cp.zeros(len(DEVICE_COEFFICIENTS), dtype=np.float32)
            self.guidance = cp.zeros((), dtype=np.float32)
        self._graphs: dict = {}  # (guided, final, clip_range) -> (graph, pool, weights_version)
        self.eager_reason: str | None = None

    def _step(self, coeffs, guided: bool) -> None:
        """One LCM step on the session's stream, reading only fixed buffers (so it can be captured)."""
        from ..sampler import apply_step

        cp, n, unet = self.cp, self.n, self.unet
        sample = unet.view("sample")  # [b, 4, H/8, W/8]: _run set the shapes
        if guided:  # CFG batch: (negative, prompt) halves of the same latents
            sample[:n] = self.x
            sample[n:] = self.x
        else:
            sample[...] = self.x
        unet.execute()
        pred = unet.view("noise_pred")
        if guided:
            uncond, cond = pred[:n], pred[n:]
            pred = uncond + self.guidance * (cond - uncond)
        step = device_coefficients(coeffs, self.coef)
        new = apply_step(step, pred, self.x, None if coeffs.final else self.noise)
        cp.copyto(self.x, new)

    def _graph(self, coeffs, guided: bool):
        key = (guided, coeffs.final, coeffs.clip_range)
        cached = self._graphs.get(key)
        if cached and cached[2] == self.unet.weights_version:
            return cached[0]
        cp, stream = self.cp, self.unet.stream
        pool = cp.cuda.MemoryPool()  # private: temporaries captured in the graph keep their addresses
        self.coef.set(coefficient_vector(coeffs), stream=stream)  # finite values for the warm-up run
        try:
            with cp.cuda.using_allocator(pool.malloc), stream:
                self._step(coeffs, guided)  # warm-up: kernels compiled and TensorRT initialized outside capture
                stream.synchronize()
                stream.begin_capture()
                try:
                    self._step(coeffs, guided)
                finally:
                    graph = stream.end_capture()
                graph.upload(stream)
                stream.synchronize()
        except Exception as e:  # capture unsupported by some layer/plugin, or by the driver
            self.eager_reason = f"{type(e).__name__}: {e}"
            log.warning("CUDA graph capture of the LCM step failed (%s); running the step eagerly.", self.eager_reason)
            return None
        self._graphs[key] = (graph, pool, self.unet.weights_version)
        return graph

    def __call__(self, sampler, latents: np.ndarray, step_noise: list[np.ndarray], conditioning: dict[str, np.ndarray],
                 guidance_scale: float, timings: dict | None = None) -> np.ndarray:
        """Run every step of `sampler`'s timesteps; returns the final latents (host, float32). `conditioning`:
        the UNet's other inputs (encoder_hidden_states, and text_embeds, time_ids for SDXL) at the step batch."""
        with self.unet._run_lock:  # the loop's buffers and graphs, and the UNet's, serve one loop at a time
            return self._run(sampler, latents, step_noise, conditioning, guidance_scale, timings)

    def _run(self, sampler, latents, step_noise, conditioning, guidance_scale, timings) -> np.ndarray:
        cp, unet, stream = self.cp, self.unet, self.unet.stream
        guided = guidance_scale > 1
        b = 2 * self.n if guided else self.n
        step_inputs = {"sample": (b, *self.shape[1:]), "timestep": (b,)}
        unet.set_shapes({name: step_inputs[name] if name in step_inputs else conditioning[name].shape
                         for name in unet.profiles[0]})
        steps = len(sampler.timesteps)
        graphs = {}
        if self.use_graphs and self.eager_reason is None:
            # capture before the inputs are copied in: warm-up runs write to the buffers
            for i in {0, steps - 1}:
                graphs[sampler.step_coefficients(i).final] = self._graph(sampler.step_coefficients(i), guided)
        with stream:
            for name, value in conditioning.items():
                unet.view(name).set(np.ascontiguousarray(value), stream=stream)
            self.x.set(np.ascontiguousarray(latents, dtype=np.float32), stream=stream)
            self.guidance.set(np.asarray(guidance_scale, dtype=np.float32), stream=stream)
            noise_all = cp.asarray(np.stack(step_noise).astype(np.float32)) if step_noise else None
            for i, t in enumerate(sampler.timesteps):
                start = time.perf_counter()
                coeffs = sampler.step_coefficients(i)
                timestep = unet.view("timestep")  # [b] (one per sample), or [1] in a format-1 folder
                timestep.set(np.full(timestep.shape, t, dtype=np.float32), stream=stream)
                self.coef.set(coefficient_vector(coeffs), stream=stream)
                if not coeffs.final:
                    cp.copyto(self.noise, noise_all[i])
                graph = graphs.get(coeffs.final)
                if graph is not None:
                    graph.launch(stream)
                else:
                    self._step(coeffs, guided)
                stream.synchronize()
                if timings is not None:
                    timings.setdefault("unet_steps", []).append(time.perf_counter() - start)
            out = self.x.get(stream=stream)
            stream.synchronize()
        return out


__all__ = ["CudaGraphDenoiser", "TensorRTBackend", "TrtSession", "coefficient_vector", "device_coefficients",
           "gpu_compute_capability", "numpy_dtype", "parse_cupy_compute_capability", "plan_buffer", "profile_index"]
