"""GPU tests: TensorRT engines of the tiny model against ONNX Runtime on the CPU, the CUDA-graph LCM loop
against the numpy loop, and refit. Marked `gpu`: skipped (with the reason) without TensorRT, CuPy or a GPU."""
import numpy as np
import pytest

from lcmrt.errors import EngineFolderError
from lcmrt.manifest import load_manifest, read_manifest, write_manifest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
REFIT_WEIGHTS = 4  # UNet weights the test marks refittable


@pytest.fixture(scope="module")
def trt_folder(tiny_folder, tmp_path_factory):
    import shutil

    import onnx

    from lcmrt.engines.fp16 import convert_folder, record_variants
    from lcmrt.engines.tensorrt import build_engines, refit_targets

    folder = tmp_path_factory.mktemp("trt") / "tiny"
    shutil.copytree(tiny_folder, folder)
    record_variants(folder, convert_folder(folder))
    manifest = load_manifest(folder)
    graph = onnx.load(str(folder / manifest["components"]["unet"]["variants"]["fp16"]["file"])).graph
    weights = [t.name for t in graph.initializer if len(t.dims) == 4][:REFIT_WEIGHTS]  # conv kernels
    # the refit map's layout (lcmrt.export.adapters) and an unfused adapter targeting those modules: only
    # targeted weights are marked refittable (engines/tensorrt.py refit_targets)
    modules = {f"unet.module{i}": {"component": "unet", "weight": n, "transpose": False} for i, n in enumerate(weights)}
    manifest["refit_map"] = modules
    manifest["adapters"].append({"name": "test", "weight": 0.0, "fused": False, "targets": sorted(modules)})
    assert refit_targets(manifest, "unet") == sorted(weights)
    write_manifest(folder, manifest)
    build_engines(folder, workspace="1G")
    return folder


def _sessions(folder, backend):
    manifest = load_manifest(folder)
    return {c: backend.load(folder, manifest, c) for c in ("text_encoder", "unet", "vae_decoder")}


def _feeds(folder, component, batch=None):
    from lcmrt.engines.fp16 import _vocab_size, example_inputs

    manifest = read_manifest(folder)
    feeds = example_inputs(manifest, component, vocab_size=_vocab_size(folder, manifest))
    if batch is not None:
        feeds = {k: v[:batch] for k, v in feeds.items()}  # the UNet's inputs, timestep included, are per sample
    return feeds


def test_engines_match_onnxruntime(trt_folder):
    from lcmrt.backends.onnxruntime import OnnxRuntimeBackend
    from lcmrt.backends.tensorrt import TensorRTBackend

    trt_sessions, ort_sessions = _sessions(trt_folder, TensorRTBackend()), _sessions(trt_folder, OnnxRuntimeBackend())
    for component in trt_sessions:
        for batch in ((1, 2) if component == "unet" else (None,)):
            feeds = _feeds(trt_folder, component, batch)
            got, ref = trt_sessions[component].run(feeds), ort_sessions[component].run(feeds)
            for name, value in ref.items():
                scale = max(1.0, float(np.abs(value).max()))
                assert np.all(np.isfinite(got[name])), (component, name)
                assert np.abs(got[name] - value).max() < 2e-2 * scale, (component, name, batch)


def test_mismatch_is_an_error(trt_folder):
    from lcmrt.backends.engine_keys import EngineKey
    from lcmrt.backends.tensorrt import TensorRTBackend

    backend = TensorRTBackend()
    backend.key = EngineKey(backend.key.compute_capability, backend.key.trt_version + "0")
    with pytest.raises(EngineFolderError, match="--engines-only"):
        backend.load(trt_folder, load_manifest(trt_folder), "unet")


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
@pytest.mark.parametrize("use_graphs", [True, False])
def test_cuda_graph_loop_matches_numpy_loop(trt_folder, guidance_scale, use_graphs):
    from lcmrt.backends.tensorrt import CudaGraphDenoiser, TensorRTBackend
    from lcmrt.sampler import LCMSampler

    manifest = load_manifest(trt_folder)
    unet = TensorRTBackend().load(trt_folder, manifest, "unet")
    sampler = LCMSampler.from_config(manifest["scheduler"]["config"])
    sampler.set_timesteps(4)
    rng = np.random.default_rng(0)
    shape = (1, 4, manifest["shapes"]["latent_height"], manifest["shapes"]["latent_width"])
    latents = rng.standard_normal(shape, dtype=np.float32)
    noise = [rng.standard_normal(shape, dtype=np.float32) for _ in range(3)]
    d = load_manifest(trt_folder)["components"]["unet"]["inputs"][2]["shape"][-1]
    cond = rng.standard_normal((1, 77, d), dtype=np.float32)
    guided = guidance_scale > 1
    embeds = np.concatenate([cond * 0.5, cond]) if guided else cond

    x = latents.copy()
    for i, t in enumerate(sampler.timesteps):  # reference: eager TensorRT UNet + numpy sampler
        sample = np.concatenate([x, x]) if guided else x
        pred = unet.run({"sample": sample, "timestep": np.full(len(sample), t, np.float32),
                         "encoder_hidden_states": embeds})["noise_pred"]
        if guided:
            u, c = np.split(pred, 2)
            pred = u + np.float32(guidance_scale) * (c - u)
        x = sampler.step(pred, t, x, noise=noise[i] if i < 3 else None)

    denoiser = CudaGraphDenoiser(unet, latents.shape, use_graphs=use_graphs)
    for _ in range(2):  # the second call replays the captured graphs
        got = denoiser(sampler, latents, noise, {"encoder_hidden_states": embeds}, guidance_scale)
        np.testing.assert_allclose(got, x, atol=1e-4, rtol=1e-4)
    if use_graphs:
        assert denoiser.eager_reason is None, denoiser.eager_reason


def test_refit_from_pristine_weights(trt_folder):
    import onnx
    from onnx import numpy_helper

    from lcmrt.backends.tensorrt import CudaGraphDenoiser, TensorRTBackend

    manifest = load_manifest(trt_folder)
    unet = TensorRTBackend().load(trt_folder, manifest, "unet")
    graph = onnx.load(str(trt_folder / manifest["components"]["unet"]["variants"]["fp16"]["file"])).graph
    names = [e["weight"] for e in manifest["refit_map"].values()]
    base = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in names}
    feeds = _feeds(trt_folder, "unet", 1)
    before = unet.run(feeds)["noise_pred"]
    unet.refit({n: w * 0 for n, w in base.items()})  # "adapter" A
    changed = unet.run(feeds)["noise_pred"]
    assert np.abs(changed - before).max() > 1e-3
    unet.refit({n: w * 2 for n, w in base.items()})  # B, then back to the base: no blend left over
    unet.refit(base)
    np.testing.assert_allclose(unet.run(feeds)["noise_pred"], before, atol=1e-3)
    assert unet.weights_version == 3
    with pytest.raises(Exception, match="not refittable"):
        unet.refit({"no.such.weight": np.zeros(1, np.float32)})
    # a denoiser re-captures after a refit
    denoiser = CudaGraphDenoiser(unet, feeds["sample"].shape)
    assert denoiser is not None
