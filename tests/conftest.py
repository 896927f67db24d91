"""Shared fixtures: small generated models, built once per test session. Tests marked `gpu` skip, with the
reason, where TensorRT, CuPy or a CUDA GPU is missing."""
import importlib.util
import os
import tempfile

import pytest

# the runtime's cache of verified files goes to a throwaway folder, not the user's ~/.cache
os.environ.setdefault("LCMRT_CACHE_DIR", tempfile.mkdtemp(prefix="lcmrt-test-cache-"))

from tiny_engines import build_tiny_engine, peft_copy  # noqa: E402

_GPU = None


def gpu_unavailable() -> str | None:
    """Why GPU tests cannot run here, or None when they can."""
    global _GPU
    if _GPU is None:
        missing = [m for m in ("tensorrt", "cupy") if importlib.util.find_spec(m) is None]
        if missing:
            _GPU = f"needs {' and '.join(missing)} (pip install 'lcmrt[gpu]') and an NVIDIA GPU"
        else:
            try:
                import cupy

                _GPU = "" if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA GPU visible"
            except Exception as e:  # no driver
                _GPU = f"no usable CUDA GPU ({type(e).__name__}: {e})"
    return _GPU or None


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None:
        reason = gpu_unavailable()
        if reason:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """{"model", "lcm_lora", "style_lora"} paths of the tiny random SD1.5 model, seed 0."""
    from lcmrt.export.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("random-model") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model, tmp_path_factory):
    """Engine folder of the tiny model, 128x128, batch 1, guidance mode cfg. Treat it as read-only."""
    return build_tiny_engine(tiny_model, tmp_path_factory.mktemp("engines") / "tiny-cfg")


@pytest.fixture(scope="session")
def tiny_refit_engine(tiny_model, tmp_path_factory):
    """Like tiny_engine, but the style LoRA (0.8) is refittable: LCM fused, refit map, adapters/style.
    Treat it as read-only; copy it to add adapters."""
    return build_tiny_engine(tiny_model, tmp_path_factory.mktemp("engines") / "tiny-refit", refittable=True)


# CPU stand-in for TensorRT / CuPy / ONNX Runtime CUDA (tests/gpu_standin): fixtures gpu_standin_modules,
# ort_cuda_standin, trt_engine_folder, trt_refit_folder
from gpu_standin.fixtures import (gpu_standin_modules, ort_cuda_standin, trt_engine_folder,  # noqa: E402,F401
                                  trt_refit_folder)


@pytest.fixture(scope="session")
def two_adapter_folder(tiny_refit_engine, tiny_model, tmp_path_factory):
    """The refit folder plus `lcm2` (the kohya LCM-LoRA file, UNet only) and `style2` (a peft file on the UNet
    and the text encoder), added with add_adapter. Treat it as read-only."""
    import shutil

    from lcmrt.export.adapters import add_adapter
    from lcmrt.export.lora import LoraSpec

    folder = tmp_path_factory.mktemp("adapter-folders") / "two"
    shutil.copytree(tiny_refit_engine, folder)
    add_adapter(folder, LoraSpec(tiny_model["lcm_lora"], weight=0.0, name="lcm2"))
    add_adapter(folder, LoraSpec(peft_copy(tiny_model, tmp_path_factory, "style2"), weight=0.0))
    return folder
