"""Pytest fixtures of the GPU stand-in (imported by tests/conftest.py): `gpu_standin` installs the fake
TensorRT + CuPy for one test and fails it if a contract violation was recorded and not expected;
`ort_cuda_standin` does the same for ONNX Runtime's CUDA provider; `trt_engine_folder` and
`trt_refit_folder` are copies of the tiny engine folders with stand-in TensorRT engines built by the real
`lcmrt.engines.tensorrt.build_engines`."""
import shutil

import pytest

import gpu_standin


def _checked(standin):
    """Yield the installed stand-in; afterwards, fail the test if a contract violation was left recorded."""
    yield standin
    left = list(standin.violations)
    standin.contracts.reset()
    assert not left, f"GPU API contract violations: {left}"


@pytest.fixture
def gpu_standin_modules(monkeypatch):
    yield from _checked(gpu_standin.install(monkeypatch))


@pytest.fixture
def ort_cuda_standin(monkeypatch):
    yield from _checked(gpu_standin.install_ort_cuda(monkeypatch))


def _built(folder, tmp_path_factory, name):
    from lcmrt.engines.tensorrt import build_engines

    out = tmp_path_factory.mktemp("trt-standin") / name
    shutil.copytree(folder, out)
    with pytest.MonkeyPatch.context() as mp:
        gpu_standin.install(mp)
        build_engines(out, workspace="256M", log=lambda *a: None)
        assert not gpu_standin.contracts.violations, gpu_standin.contracts.violations
    return out


@pytest.fixture(scope="session")
def trt_engine_folder(tiny_engine, tmp_path_factory):
    """tiny_engine (cfg, fused adapters) with stand-in TensorRT engines. Read-only."""
    return _built(tiny_engine, tmp_path_factory, "tiny-cfg")


@pytest.fixture(scope="session")
def trt_refit_folder(tiny_refit_engine, tmp_path_factory):
    """tiny_refit_engine (style LoRA refittable) with stand-in TensorRT engines. Read-only."""
    return _built(tiny_refit_engine, tmp_path_factory, "tiny-refit")
