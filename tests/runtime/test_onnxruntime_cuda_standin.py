"""The ONNX Runtime CUDA backend's device binding (DeviceBinding in lcmrt/backends/onnxruntime.py) on the
CPU stand-in for the CUDA provider (tests/gpu_standin/onnxruntime_cuda.py): fixed device buffers, one
graph id per shape set, refit by new session and by weight inputs, compared with the CPU backend."""
import numpy as np
import pytest
from tiny_engines import CROSS_GRAPH_ATOL, assert_swaps_match

from lcmrt import Pipeline

ARGS = dict(prompt="a red bicycle", negative_prompt="", num_inference_steps=3, seed=11, output="np")


def test_cuda_binding_matches_cpu(ort_cuda_standin, tiny_engine):
    from gpu_standin.onnxruntime_cuda import CudaSession

    cpu = Pipeline.load(tiny_engine, backend="onnxruntime-cpu")
    cuda = Pipeline.load(tiny_engine, backend="onnxruntime-cuda")
    assert cuda.backend == "onnxruntime-cuda"
    for guidance in (1.0, 3.0):
        np.testing.assert_allclose(cuda(guidance_scale=guidance, **ARGS), cpu(guidance_scale=guidance, **ARGS),
                                   atol=CROSS_GRAPH_ATOL, rtol=0)
    unet = cuda.sessions["unet"]._session
    assert unet.cuda_graph and sorted(unet.captured) == ["1", "2"]  # batch 1 and the CFG batch 2
    assert CudaSession.runs > 0


@pytest.mark.parametrize("refit", ["session", "inputs"])
def test_cuda_refit_matches_cpu(ort_cuda_standin, tiny_refit_engine, refit):
    """Issue 10: with refit="inputs" the device binding skipped the weight feeds (base weights, silently)."""
    cpu = Pipeline.load(tiny_refit_engine, backend="onnxruntime-cpu")
    cuda = Pipeline.load(tiny_refit_engine, backend="onnxruntime-cuda", refit=refit)
    assert_swaps_match(cuda, cpu, (0.0, 1.3), CROSS_GRAPH_ATOL, **ARGS)
