"""GPU tests in this folder skip, with a reason, where TensorRT, CuPy or a CUDA GPU is missing."""
import importlib.util

import pytest

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
def tiny_folder(tiny_model, tmp_path_factory):
    """Engine folder of the tiny model at 64x64 with the CFG batch (the UNet batch varies: 1 or 2)."""
    from lcmrt.export.build import BuildRequest, build_engine_folder
    from lcmrt.export.lora import parse_lora_arg

    out = tmp_path_factory.mktemp("engines") / "tiny"
    build_engine_folder(BuildRequest(model=str(tiny_model["model"]), out=out,
                                     lcm_lora=parse_lora_arg(str(tiny_model["lcm_lora"]), role="lcm"),
                                     height=64, width=64, guidance_mode="cfg"))
    return out
