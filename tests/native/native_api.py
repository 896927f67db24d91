"""lcmrt.h through ctypes, for the parity tests: the C API as any FFI user sees it."""
import ctypes
from pathlib import Path

import numpy as np

c_float_p = ctypes.POINTER(ctypes.c_float)


class Request(ctypes.Structure):
    _fields_ = [("prompt", ctypes.c_char_p), ("negative_prompt", ctypes.c_char_p), ("steps", ctypes.c_int),
                ("guidance_scale", ctypes.c_double), ("seed", ctypes.c_uint64), ("num_images", ctypes.c_int),
                ("height", ctypes.c_int), ("width", ctypes.c_int), ("latents", c_float_p), ("step_noise", c_float_p)]


class LoadOptions(ctypes.Structure):
    _fields_ = [("threads", ctypes.c_int)]


class NativeError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"status {status}: {message}")
        self.status, self.message = status, message


class NativeLibrary:
    """liblcmrt.so of a native build, with argument types declared."""

    def __init__(self, build: Path):
        lib = self.lib = ctypes.CDLL(str(build / "liblcmrt.so"))
        handle = ctypes.c_void_p
        lib.lcmrt_last_error.restype = ctypes.c_char_p
        lib.lcmrt_version.restype = ctypes.c_char_p
        lib.lcmrt_pipeline_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(LoadOptions), ctypes.POINTER(handle)]
        lib.lcmrt_pipeline_free.argtypes = [handle]
        lib.lcmrt_request_init.argtypes = [ctypes.POINTER(Request)]
        lib.lcmrt_generate.argtypes = [handle, ctypes.POINTER(Request), ctypes.POINTER(handle)]
        for name in ("count", "height", "width"):
            getattr(lib, f"lcmrt_images_{name}").argtypes = [handle]
        lib.lcmrt_images_pixels.argtypes = [handle, ctypes.c_int]
        lib.lcmrt_images_pixels.restype = c_float_p
        lib.lcmrt_images_save_png.argtypes = [handle, ctypes.c_int, ctypes.c_char_p]
        lib.lcmrt_images_warnings.argtypes = [handle]
        lib.lcmrt_images_warnings.restype = ctypes.c_char_p
        lib.lcmrt_images_free.argtypes = [handle]
        lib.lcmrt_set_adapters.argtypes = [handle, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_double),
                                           ctypes.c_size_t]
        lib.lcmrt_adapter_count.argtypes = [handle]
        lib.lcmrt_adapter_count.restype = ctypes.c_size_t
        lib.lcmrt_adapter_at.argtypes = [handle, ctypes.c_size_t, ctypes.POINTER(ctypes.c_char_p),
                                         ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_int)]

    def check(self, status: int) -> None:
        if status != 0:
            raise NativeError(status, self.lib.lcmrt_last_error().decode())

    def load(self, folder, threads: int = 0) -> "NativePipeline":
        handle = ctypes.c_void_p()
        self.check(self.lib.lcmrt_pipeline_load(str(folder).encode(), LoadOptions(threads), ctypes.byref(handle)))
        return NativePipeline(self, handle)


class NativePipeline:
    def __init__(self, runtime: NativeLibrary, handle):
        self.runtime, self.lib, self.handle = runtime, runtime.lib, handle

    def close(self):
        if self.handle:
            self.lib.lcmrt_pipeline_free(self.handle)
            self.handle = None

    def __del__(self):
        self.close()

    def generate(self, prompt, negative_prompt=None, steps=4, guidance_scale=1.0, seed=0, num_images=1, latents=None,
                 step_noise=None, png=None, height=0, width=0) -> np.ndarray:
        """Images as Python's output="np" gives them: [N, H, W, 3] float32 in [0, 1]."""
        request = Request()
        self.lib.lcmrt_request_init(ctypes.byref(request))
        request.prompt = prompt.encode()
        request.negative_prompt = None if negative_prompt is None else negative_prompt.encode()
        request.steps, request.guidance_scale, request.seed, request.num_images = steps, guidance_scale, seed, num_images
        request.height, request.width = height, width
        keep = []
        if latents is not None:
            keep = [np.ascontiguousarray(latents, np.float32), np.ascontiguousarray(np.stack(step_noise), np.float32)]
            request.latents, request.step_noise = (a.ctypes.data_as(c_float_p) for a in keep)
        images = ctypes.c_void_p()
        self.runtime.check(self.lib.lcmrt_generate(self.handle, ctypes.byref(request), ctypes.byref(images)))
        try:
            n, h, w = (getattr(self.lib, f"lcmrt_images_{k}")(images) for k in ("count", "height", "width"))
            out = np.stack([np.ctypeslib.as_array(self.lib.lcmrt_images_pixels(images, i), (h, w, 3)).copy()
                            for i in range(n)])
            if png is not None:
                self.runtime.check(self.lib.lcmrt_images_save_png(images, 0, str(png).encode()))
            self.warnings = self.lib.lcmrt_images_warnings(images).decode()
        finally:
            self.lib.lcmrt_images_free(images)
        return out

    def set_adapters(self, adapters: dict) -> None:
        names = (ctypes.c_char_p * len(adapters))(*(n.encode() for n in adapters))
        weights = (ctypes.c_double * len(adapters))(*adapters.values())
        self.runtime.check(self.lib.lcmrt_set_adapters(self.handle, names, weights, len(adapters)))

    def adapters(self) -> dict:
        out = {}
        for i in range(self.lib.lcmrt_adapter_count(self.handle)):
            name, weight, refittable = ctypes.c_char_p(), ctypes.c_double(), ctypes.c_int()
            self.runtime.check(self.lib.lcmrt_adapter_at(self.handle, i, ctypes.byref(name), ctypes.byref(weight),
                                                         ctypes.byref(refittable)))
            out[name.value.decode()] = (weight.value, bool(refittable.value))
        return out
