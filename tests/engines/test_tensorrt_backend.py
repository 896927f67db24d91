"""lcmrt.backends.tensorrt: the parts that need no GPU (dtype mapping, buffer plans, the sampler's
coefficients read from arrays as the CUDA graph reads them from device memory)."""
import importlib.util

import numpy as np
import pytest

from lcmrt.backends.tensorrt import (DEVICE_COEFFICIENTS, TensorRTBackend, coefficient_vector,
                                     device_coefficients, fits, numpy_dtype, parse_cupy_compute_capability,
                                     plan_buffer, profile_index)
from lcmrt.errors import BackendError
from lcmrt.families import SD15_SCHEDULER
from lcmrt.sampler import LCMSampler, StepCoefficients, apply_step


class _FakeDataType:  # stands for a tensorrt.DataType enum member
    def __init__(self, name):
        self.name = name


def test_dtypes():
    assert numpy_dtype(_FakeDataType("HALF")) == np.float16
    assert numpy_dtype("DataType.FLOAT") == np.float32
    assert numpy_dtype(_FakeDataType("INT64")) == np.int64
    with pytest.raises(BackendError):
        numpy_dtype(_FakeDataType("FP8"))


def test_compute_capability():
    assert parse_cupy_compute_capability("86") == "8.6"
    assert parse_cupy_compute_capability("100") == "10.0"
    assert parse_cupy_compute_capability("121") == "12.1"
    with pytest.raises(BackendError):
        parse_cupy_compute_capability("x")


def test_buffer_plans():
    static = plan_buffer("latents", True, (1, 4, 8, 8), np.float32)
    assert static.capacity == 4 * 64 and static.nbytes == 4 * 4 * 64 and static.spec().shape == (1, 4, 8, 8)
    cfg = plan_buffer("sample", True, (-1, 4, 8, 8), np.float32, [(2, 4, 8, 8)])
    assert cfg.capacity == 2 * 4 * 64 and cfg.spec().shape == ("batch", 4, 8, 8)
    assert fits((1, 4, 8, 8), cfg) and fits((2, 4, 8, 8), cfg) and not fits((3, 4, 8, 8), cfg)
    assert not fits((1, 4, 8, 8, 1), cfg) and not fits((2, 4, 8, 8), static) and not fits((1, 4, 8, 9), cfg)
    # several sizes: the buffer holds the largest shape of any profile, whichever axes vary
    sizes = plan_buffer("sample", True, (-1, 4, -1, -1), np.float32, [(2, 4, 16, 16), (2, 4, 12, 20)])
    assert sizes.capacity == 2 * 4 * 256 and sizes.spec().shape == ("batch", 4, "dim2", "dim3")
    assert fits((2, 4, 12, 20), sizes) and fits((1, 4, 16, 16), sizes) and not fits((2, 4, 16, 20), sizes)
    with pytest.raises(BackendError, match="no largest shape"):
        plan_buffer("x", True, (-1, 4), np.float32)


def test_profile_index():
    profiles = [{"sample": ((1, 4, 16, 16), (2, 4, 16, 16), (2, 4, 16, 16))},
                {"sample": ((1, 4, 12, 20), (2, 4, 12, 20), (2, 4, 12, 20))}]
    assert profile_index(profiles, {"sample": (2, 4, 16, 16)}) == 0
    assert profile_index(profiles, {"sample": (1, 4, 12, 20)}) == 1
    assert profile_index(profiles, {"sample": (1, 4, 12, 16)}) is None
    assert profile_index(profiles, {"sample": (3, 4, 16, 16)}) is None
    assert profile_index([{}], {}) == 0


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_step_with_coefficients_from_memory(steps):
    """The graph's step reads its scalars from a float32 buffer: same numbers as python floats, bit for bit."""
    sampler = LCMSampler.from_config(SD15_SCHEDULER)
    sampler.set_timesteps(steps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    buffer = np.zeros(len(DEVICE_COEFFICIENTS), np.float32)  # stands for the device buffer
    x_ref, x_mem = x.copy(), x.copy()
    for i in range(steps):
        coeffs = sampler.step_coefficients(i)
        eps = rng.standard_normal(x.shape, dtype=np.float32)
        noise = rng.standard_normal(x.shape, dtype=np.float32)
        buffer[...] = coefficient_vector(coeffs)
        step = device_coefficients(coeffs, buffer)
        assert isinstance(step, StepCoefficients) and step.final == coeffs.final
        x_ref = apply_step(coeffs, eps, x_ref, None if coeffs.final else noise)
        x_mem = apply_step(step, eps, x_mem, None if coeffs.final else noise)
        assert x_mem.dtype == np.float32
        np.testing.assert_array_equal(x_mem, x_ref)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_backend_without_tensorrt():
    assert not TensorRTBackend.installed()
    with pytest.raises(BackendError, match=r"lcmrt\[gpu\]"):
        TensorRTBackend()
