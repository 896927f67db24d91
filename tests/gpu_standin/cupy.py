"""CPU stand-in for the subset of CuPy that lcmrt's TensorRT backend uses: device arrays over numpy, streams,
memory pools and CUDA-graph capture. Tests only (installed as `cupy` by the `gpu_standin` fixture).

Model: every "device" allocation is a 256-byte-aligned numpy byte buffer whose address is its `.data.ptr`;
the stand-in TensorRT resolves addresses back to these buffers. Work outside a capture runs at once (the
CPU stream is synchronous, so missing synchronisation cannot be detected); work on a capturing stream is
recorded, not run, and `Graph.launch()` replays it on the same buffers, as a CUDA graph does.

Contracts enforced (ContractViolation): no host synchronisation inside a capture (`Stream.synchronize`,
`ndarray.get`, `asnumpy`, host->device `set` from pageable memory: "operation not permitted when stream is
capturing"); inside a capture every allocation comes from a non-default allocator (`using_allocator`) and is
served from blocks that pool already holds (no cudaMalloc while capturing; a temporary of the default pool
would be reused after capture while the graph still writes to it); numpy arrays are never mixed into device
arithmetic and device arrays never turn into numpy implicitly (CuPy raises TypeError for both); `set` only
from an array of the same shape and dtype into a C-contiguous array; nested or unmatched captures.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import sys
import threading
import weakref

import numpy as np

from .contracts import violate

ALIGNMENT = 256  # cudaMalloc returns 256-byte-aligned memory; TensorRT requires it of tensor addresses
COMPUTE_CAPABILITY = "90"  # what Device.compute_capability returns (a string, as in CuPy)
DEVICE_NAME = b"lcmrt CPU stand-in (onnxruntime + numpy)"

_state = threading.local()
_live: dict[int, weakref.ref] = {}  # ptr -> _Memory, for address resolution
_streams: dict[int, weakref.ref] = {}
_stream_ids = itertools.count(0x5000)


class _Memory:
    """One device allocation: `host` is its (aligned) backing store; returns to `pool` when freed."""

    def __init__(self, nbytes: int, pool: "MemoryPool | None" = None, block: np.ndarray | None = None):
        size = max(int(nbytes), 1)
        if block is None:
            raw = np.empty(size + ALIGNMENT, np.uint8)
            start = (-raw.ctypes.data) % ALIGNMENT
            block = raw[start:start + size]
        self.host, self.nbytes, self.pool, self.dtype = block, size, pool, None
        self.ptr = block.ctypes.data
        _live[self.ptr] = weakref.ref(self)

    def __del__(self):
        ref = _live.get(self.ptr)
        if ref is not None and ref() is None:  # (a block reused from a pool registers a new owner)
            _live.pop(self.ptr, None)
        if self.pool is not None:
            self.pool._free.setdefault(self.nbytes, []).append(self.host)


def resolve(ptr: int) -> "_Memory | None":
    """The live allocation containing address `ptr`, or None (never allocated, or freed)."""
    for start, ref in list(_live.items()):
        mem = ref()
        if mem is not None and start <= ptr < start + mem.nbytes:
            return mem
    return None


class MemoryPool:
    """Caching allocator: freed blocks are kept per size (rounded to 512 bytes, as CuPy does) and reused."""

    def __init__(self):
        self._free: dict[int, list[np.ndarray]] = {}
        self.mallocs = 0  # blocks obtained from the "device" (cudaMalloc), not from the cache

    def malloc(self, nbytes: int) -> _Memory:
        size = max(512, -(-int(nbytes) // 512) * 512)
        if self._free.get(size):
            return _Memory(size, self, self._free[size].pop())
        capturing = _capturing_stream()
        if capturing is not None:
            raise violate(f"cudaMalloc of {size} bytes while stream {capturing.ptr:#x} is capturing: the pool has no "
                          "cached block of that size. Run the captured work once before the capture (warm-up) with "
                          "the same allocator, so every temporary is cached.")
        self.mallocs += 1
        return _Memory(size, self)

    def free_bytes(self) -> int:
        return sum(size * len(blocks) for size, blocks in self._free.items())


def _allocate(nbytes: int) -> _Memory:
    allocator = getattr(_state, "allocator", None)
    if allocator is not None:
        return allocator(nbytes)
    capturing = _capturing_stream()
    if capturing is not None:
        raise violate(f"allocation of {nbytes} bytes from the default memory pool while stream {capturing.ptr:#x} "
                      "is capturing: its blocks go back to the shared pool after capture and get reused while the "
                      "graph still writes to them. Capture under `cupy.cuda.using_allocator(private_pool.malloc)`.")
    return _Memory(nbytes)


@contextlib.contextmanager
def using_allocator(allocator=None):
    previous = getattr(_state, "allocator", None)
    _state.allocator = allocator
    try:
        yield
    finally:
        _state.allocator = previous


# --- streams and graphs ---------------------------------------------------------------------------------
class Stream:
    null: "Stream"

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False):
        self.ptr = 0 if null else next(_stream_ids)
        self.non_blocking = non_blocking
        self._capture: list | None = None
        self.capture_failed: str | None = None
        self.pending: set = set()  # engines with enqueued work since the last synchronize
        _streams[self.ptr] = weakref.ref(self)

    def __enter__(self):
        stack = getattr(_state, "streams", None)
        if stack is None:
            stack = _state.streams = []
        stack.append(self)
        return self

    def __exit__(self, *exc):
        _state.streams.pop()

    def synchronize(self) -> None:
        if self._capture is not None:
            raise violate(f"Stream.synchronize() while stream {self.ptr:#x} is capturing (a host synchronisation "
                          "invalidates the capture).")
        self.pending.clear()

    def is_capturing(self) -> bool:
        return self._capture is not None

    def begin_capture(self, mode=None) -> None:
        if self.ptr == 0:
            raise violate("begin_capture() on the default (null) stream: CUDA cannot capture it.")
        if self._capture is not None or _capturing_stream() is not None:
            raise violate("begin_capture() while a capture is already in progress.")
        self._capture, self.capture_failed = [], None

    def end_capture(self) -> "Graph":
        if self._capture is None:
            raise violate("end_capture() without begin_capture().")
        ops, self._capture = self._capture, None
        if self.capture_failed:
            raise runtime.CUDARuntimeError(f"cudaErrorStreamCaptureInvalidated: {self.capture_failed}")
        return Graph(ops)

    def enqueue(self, op, engines=()) -> None:
        """Run `op` now, or record it if this stream is capturing."""
        if self._capture is not None:
            self._capture.append(op)
        else:
            op()
            self.pending.update(engines)


Stream.null = Stream(null=True)


def stream_from_handle(handle: int) -> "Stream | None":
    ref = _streams.get(int(handle))
    return ref() if ref is not None else None


def get_current_stream() -> Stream:
    stack = getattr(_state, "streams", None)
    return stack[-1] if stack else Stream.null


def _capturing_stream() -> "Stream | None":
    for ref in list(_streams.values()):
        stream = ref()
        if stream is not None and stream._capture is not None:
            return stream
    return None


class Graph:
    """A captured CUDA graph: replays the recorded operations in order."""

    def __init__(self, ops: list):
        self.ops, self.uploaded, self.launches = ops, False, 0

    def upload(self, stream: Stream | None = None) -> None:
        self.uploaded = True

    def launch(self, stream: Stream | None = None) -> None:
        stream = stream or get_current_stream()
        self.launches += 1
        for op in self.ops:
            stream.enqueue(op, getattr(op, "engines", ()))


# --- arrays -----------------------------------------------------------------------------------------------
class _MemoryPointer:
    def __init__(self, mem: _Memory, ptr: int):
        self.mem, self.ptr = mem, ptr


class ndarray:
    """A device array: a numpy view into a `_Memory` block, reached only through CuPy-style operations."""

    def __init__(self, mem: _Memory, view: np.ndarray):
        self._mem, self._np = mem, view
        if mem.dtype is None:
            mem.dtype = view.dtype

    @classmethod
    def _new(cls, shape, dtype) -> "ndarray":
        shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        mem = _allocate(int(np.prod(shape)) * dtype.itemsize)
        return cls(mem, np.ndarray(shape, dtype, buffer=mem.host.data))

    shape = property(lambda self: self._np.shape)
    dtype = property(lambda self: self._np.dtype)
    ndim = property(lambda self: self._np.ndim)
    size = property(lambda self: self._np.size)
    nbytes = property(lambda self: self._np.nbytes)
    data = property(lambda self: _MemoryPointer(self._mem, self._np.ctypes.data))

    def __len__(self):
        return len(self._np)

    def __array_namespace__(self, api_version=None):
        return sys.modules[__name__]

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
                        "NumPy array explicitly.")

    def __getitem__(self, index) -> "ndarray":
        index = index if isinstance(index, tuple) else (index,)
        view = self._np[index if Ellipsis in index else (*index, Ellipsis)]  # integers give 0-d views, as in CuPy
        if not isinstance(view, np.ndarray) or not np.shares_memory(view, self._np):
            raise NotImplementedError("the stand-in supports basic (view) indexing only")
        return ndarray(self._mem, view)

    def __setitem__(self, index, value) -> None:
        target = self._np[index]
        src = _value(_operand(value))  # ops hold buffers, never the arrays: temporaries free as in a real capture
        get_current_stream().enqueue(lambda: np.copyto(target, src))

    def reshape(self, *shape) -> "ndarray":
        view = self._np.reshape(*shape)
        if not np.shares_memory(view, self._np):
            raise NotImplementedError("the stand-in reshapes views only (a contiguous array)")
        return ndarray(self._mem, view)

    def set(self, arr: np.ndarray, stream: Stream | None = None) -> None:
        stream = stream or get_current_stream()
        if stream.is_capturing():
            raise violate("ndarray.set() (host->device copy from pageable memory) while the stream is capturing.")
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, not {type(arr).__name__}")
        if arr.dtype != self.dtype or arr.shape != self.shape:
            raise violate(f"ndarray.set(): {arr.dtype}{list(arr.shape)} into {self.dtype}{list(self.shape)} "
                          "(CuPy requires the same shape and dtype).")
        if not self._np.flags.c_contiguous:
            raise violate("ndarray.set() into a non-contiguous array (CuPy raises RuntimeError).")
        value = np.array(arr, copy=True)  # pageable host memory is staged at once
        stream.enqueue(lambda: np.copyto(self._np, value))

    def get(self, stream: Stream | None = None, order="C", out=None) -> np.ndarray:
        stream = stream or get_current_stream()
        if stream.is_capturing() or _capturing_stream() is not None:
            raise violate("ndarray.get() (device->host copy, a synchronisation) while a stream is capturing.")
        return self._np.copy()

    def copy(self) -> "ndarray":
        out = ndarray._new(self.shape, self.dtype)
        copyto(out, self)
        return out

    # arithmetic: the output is allocated now (as CuPy does), its values are computed when the op runs
    def _binary(self, other, fn, reverse=False):
        return _elementwise(fn, (other, self) if reverse else (self, other))

    __add__ = lambda self, o: self._binary(o, np.add)
    __radd__ = lambda self, o: self._binary(o, np.add, True)
    __sub__ = lambda self, o: self._binary(o, np.subtract)
    __rsub__ = lambda self, o: self._binary(o, np.subtract, True)
    __mul__ = lambda self, o: self._binary(o, np.multiply)
    __rmul__ = lambda self, o: self._binary(o, np.multiply, True)
    __truediv__ = lambda self, o: self._binary(o, np.divide)
    __rtruediv__ = lambda self, o: self._binary(o, np.divide, True)

    def __neg__(self):
        return _elementwise(np.negative, (self,))

    def __repr__(self):
        return f"<stand-in cupy.ndarray {self.dtype}{list(self.shape)} at {self.data.ptr:#x}>"


def _operand(value):
    if isinstance(value, ndarray):
        return value
    if isinstance(value, (int, float, bool, np.generic)):
        return value
    raise TypeError(f"Unsupported type {type(value)} (the stand-in, like CuPy, does not mix host arrays into "
                    "device operations: copy them with cupy.asarray first)")


def _value(operand):
    return operand._np if isinstance(operand, ndarray) else operand


def _elementwise(fn, operands, **kwargs) -> ndarray:
    ops = [_operand(o) for o in operands]
    probe = [o._np if isinstance(o, ndarray) else o for o in ops]
    shape = np.broadcast_shapes(*[np.shape(p) for p in probe])
    dtype = np.result_type(*probe)
    out = ndarray._new(shape, dtype)
    target, values = out._np, [_value(o) for o in ops]  # buffers only, so temporaries return to the pool
    get_current_stream().enqueue(lambda: fn(*values, out=target, **kwargs))
    return out


# --- module functions --------------------------------------------------------------------------------------
def empty(shape, dtype=np.float32) -> ndarray:
    return ndarray._new(shape, dtype)


def zeros(shape, dtype=np.float32) -> ndarray:
    out = ndarray._new(shape, dtype)
    target = out._np
    get_current_stream().enqueue(lambda: target.fill(0))
    return out


def asarray(a, dtype=None) -> ndarray:
    if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    host = np.ascontiguousarray(a, dtype=dtype)
    out = ndarray._new(host.shape, host.dtype)
    out.set(host)
    return out


def asnumpy(a, stream=None) -> np.ndarray:
    if _capturing_stream() is not None:
        raise violate("cupy.asnumpy() (device->host copy) while a stream is capturing.")
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def copyto(dst: ndarray, src, casting="same_kind") -> None:
    if not isinstance(dst, ndarray):
        raise TypeError("copyto: the destination must be a cupy.ndarray")
    src, target = _value(_operand(src)), dst._np
    get_current_stream().enqueue(lambda: np.copyto(target, src, casting=casting))


def clip(a, a_min, a_max) -> ndarray:
    return _elementwise(lambda x, out: np.clip(x, a_min, a_max, out=out), (a,))


float32, float16, int64, int32 = np.float32, np.float16, np.int64, np.int32
inf = math.inf


# --- cupy.cuda -----------------------------------------------------------------------------------------------
class _CUDARuntimeError(RuntimeError):
    pass


class _Runtime:
    CUDARuntimeError = _CUDARuntimeError
    device_count = 1

    def getDeviceCount(self) -> int:  # noqa: N802 (CuPy's name)
        return self.device_count

    def getDeviceProperties(self, device: int) -> dict:  # noqa: N802
        _check_device(device)
        cc = COMPUTE_CAPABILITY
        return {"name": DEVICE_NAME, "major": int(cc[:-1]), "minor": int(cc[-1]), "totalGlobalMem": 16 << 30}


runtime = _Runtime()


def _check_device(device_id: int) -> None:
    if not 0 <= int(device_id) < runtime.device_count:
        raise _CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")


class Device:
    def __init__(self, device: int = 0):
        _check_device(device)
        self.id = int(device)
        self.compute_capability = COMPUTE_CAPABILITY

    def use(self) -> None:
        _state.device = self.id


class _CudaNamespace:
    """`cupy.cuda`: the attributes the backend reaches through it."""

    Device, Stream, Graph, MemoryPool = Device, Stream, Graph, MemoryPool
    using_allocator = staticmethod(using_allocator)
    get_current_stream = staticmethod(get_current_stream)
    runtime = runtime


cuda = _CudaNamespace()


def reset() -> None:
    """Forget streams and captures left by an earlier test (allocations free themselves)."""
    for ref in list(_streams.values()):
        stream = ref()
        if stream is not None:
            stream._capture, stream.pending = None, set()
    _state.streams, _state.allocator = [], None
    runtime.device_count = 1
