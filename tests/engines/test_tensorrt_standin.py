"""The real TensorRT backend (lcmrt/backends/tensorrt.py) and builder (lcmrt/engines/tensorrt.py) on the CPU
stand-in for TensorRT and CuPy (tests/gpu_standin): engine build, Pipeline.load, guided and unguided
generation, adapter refit and the CUDA-graph step, compared with the ONNX Runtime CPU backend. The stand-in
fails a test on any GPU API contract violation (see tests/gpu_standin/__init__.py)."""
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_engines import CROSS_GRAPH_ATOL, STYLE_WEIGHT, assert_swaps_match

from lcmrt import Pipeline
from lcmrt.errors import AdapterError, BackendError, EngineFolderError
from lcmrt.manifest import load_manifest

# The stand-in runs the engine's ONNX graph with ONNX Runtime on the CPU, so an fp32 engine differs from the
# onnxruntime-cpu backend only as two fp32 graphs do (tiny_engines.CROSS_GRAPH_ATOL, measured <= 1.2e-6).
FP32_ENGINE_ATOL = CROSS_GRAPH_ATOL
ARGS = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", num_inference_steps=3, seed=5, output="np")


def _reference(folder, **kwargs):
    return Pipeline.load(folder, backend="onnxruntime-cpu")(**{**ARGS, **kwargs})


def test_build_records_flags_and_refittable_weights(trt_refit_folder):
    manifest = load_manifest(trt_refit_folder)
    engines = {e["component"]: e for e in manifest["engines"]}
    style = next(a for a in manifest["adapters"] if a["name"] == "style")
    for component in ("text_encoder", "unet"):
        targets = {manifest["refit_map"][m]["weight"] for m in style["targets"]
                   if manifest["refit_map"][m]["component"] == component}
        assert engines[component]["build"]["flags"] == ["REFIT_INDIVIDUAL"]
        assert engines[component]["refit"]["marked"] == engines[component]["refit"]["refittable"] == len(targets) > 0
        assert (trt_refit_folder / engines[component]["refit"]["base"]).is_file()
    assert engines["vae_decoder"]["build"]["flags"] == [] and "refit" not in engines["vae_decoder"]
    assert all(e["precision"] == "fp32" and e["build"]["workspace_bytes"] == 256 << 20 for e in engines.values())


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
@pytest.mark.parametrize("num_images", [1, 2])
def test_generation_matches_onnxruntime(gpu_standin_modules, trt_engine_folder, guidance_scale, num_images):
    pipe = Pipeline.load(trt_engine_folder, backend="tensorrt")
    assert pipe.backend == "tensorrt"
    got = pipe(guidance_scale=guidance_scale, num_images=num_images, **ARGS)
    ref = _reference(trt_engine_folder, guidance_scale=guidance_scale, num_images=num_images)
    assert got.shape == ref.shape == (num_images, 128, 128, 3)
    np.testing.assert_allclose(got, ref, atol=FP32_ENGINE_ATOL, rtol=0)
    loop = pipe.sessions["unet"]._loop
    assert loop.eager_reason is None and loop._graphs  # the step ran as replayed graphs
    graphs = [g for g, _, _ in loop._graphs.values()]
    assert sum(g.launches for g in graphs) == ARGS["num_inference_steps"] * num_images


def test_image_edits_and_streams_match_onnxruntime(gpu_standin_modules, trt_engine_folder):
    """img2img runs the CUDA-graph loop from the noised image latents (the VAE encoder is an engine too);
    inpainting steps on the host (the blend after each step); a stream's staggered batch of 2 takes one
    timestep per sample."""
    from tiny_engines import edit_image, edit_mask

    pipe = Pipeline.load(trt_engine_folder, backend="tensorrt")
    ref = Pipeline.load(trt_engine_folder, backend="onnxruntime-cpu")
    assert "vae_encoder" in {e["component"] for e in load_manifest(trt_engine_folder)["engines"]}
    for edit in (dict(image=edit_image(), strength=0.5), dict(image=edit_image(), mask_image=edit_mask())):
        for guidance_scale in (1.0, 2.0):
            got = pipe(**{**ARGS, "num_inference_steps": 4}, guidance_scale=guidance_scale, **edit)
            np.testing.assert_allclose(got, ref(**{**ARGS, "num_inference_steps": 4}, guidance_scale=guidance_scale,
                                                **edit), atol=FP32_ENGINE_ATOL, rtol=0)
    assert pipe.last_precisions["vae_encoder"] == "fp32"
    frames = [edit_image(seed=k) for k in range(3)]
    outputs = [list(p.stream("a lighthouse at dusk", seed=1, output="np").frames(frames)) for p in (pipe, ref)]
    np.testing.assert_allclose(np.stack(outputs[0]), np.stack(outputs[1]), atol=FP32_ENGINE_ATOL, rtol=0)


def test_eager_step_and_repeat(gpu_standin_modules, trt_engine_folder):
    """cuda_graphs=False runs the same step eagerly; a second call replays the captured graphs again."""
    eager = Pipeline.load(trt_engine_folder, backend="tensorrt", cuda_graphs=False)
    graphs = Pipeline.load(trt_engine_folder, backend="tensorrt")
    a, b = eager(guidance_scale=2.0, **ARGS), graphs(guidance_scale=2.0, **ARGS)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(graphs(guidance_scale=2.0, **ARGS), b)
    assert not eager.sessions["unet"]._loop._graphs


def test_set_adapters_by_refit(gpu_standin_modules, trt_refit_folder):
    pipe = Pipeline.load(trt_refit_folder, backend="tensorrt")
    ref = Pipeline.load(trt_refit_folder, backend="onnxruntime-cpu")
    first = assert_swaps_match(pipe, ref, (0.0, 1.5), FP32_ENGINE_ATOL, **ARGS)
    pipe.set_adapters({"style": STYLE_WEIGHT})
    np.testing.assert_array_equal(pipe(**ARGS), first)  # refit from the pristine base: no drift
    assert pipe.sessions["unet"].weights_version == 4  # the load (style at 0.8), then three swaps
    with pytest.raises(AdapterError, match="fused"):
        pipe.set_adapters({"lcm": 0.0})


def test_denoise_loop_is_a_method(gpu_standin_modules, trt_engine_folder):
    """Issue 10: denoise_loop was a property taking an argument (TypeError on the first generation)."""
    from lcmrt.backends.tensorrt import CudaGraphDenoiser, TensorRTBackend

    backend = TensorRTBackend()
    manifest = load_manifest(trt_engine_folder)
    unet = backend.load(trt_engine_folder, manifest, "unet")
    shape = (1, 4, manifest["shapes"]["latent_height"], manifest["shapes"]["latent_width"])
    loop = unet.denoise_loop(shape)
    assert isinstance(loop, CudaGraphDenoiser) and loop.n == 1 and unet.denoise_loop(shape) is loop
    assert backend.load(trt_engine_folder, manifest, "text_encoder").denoise_loop(shape) is None


def test_refit_needs_a_refittable_engine(gpu_standin_modules, trt_engine_folder):
    """Issue 10: `if not self.refittable:` tested the bound method, so this guard never fired."""
    from lcmrt.backends.tensorrt import TensorRTBackend

    unet = TensorRTBackend().load(trt_engine_folder, load_manifest(trt_engine_folder), "unet")
    assert not unet.refittable()
    with pytest.raises(BackendError, match="built without refittable weights"):
        unet.refit({"w": np.zeros(1, np.float32)})


def test_precision_option(gpu_standin_modules, trt_engine_folder):
    """Issue 10: `lcmrt generate --precision` reaches TensorRTBackend, which had no such parameter."""
    for precision in (None, "fp32"):
        pipe = Pipeline.load(trt_engine_folder, backend="tensorrt", precision=precision)
        assert pipe.sessions["unet"].precision == "fp32"
    with pytest.raises(EngineFolderError, match="has no fp16 graphs"):  # the folder's engines are all fp32
        Pipeline.load(trt_engine_folder, backend="tensorrt", precision="fp16")
    with pytest.raises(BackendError, match="precision"):
        Pipeline.load(trt_engine_folder, backend="tensorrt", precision="int8")


def test_missing_weights_come_from_the_pristine_base(gpu_standin_modules, tiny_refit_engine, tmp_path):
    """A weight fused by the builder with a refitted one is missing: it gets its current (base) value."""
    from lcmrt.backends.tensorrt import TensorRTBackend
    from lcmrt.engines.tensorrt import build_engines, refit_targets

    folder = tmp_path / "fused"
    shutil.copytree(tiny_refit_engine, folder)
    names = refit_targets(load_manifest(folder), "unet")
    gpu_standin_modules.fuse_weights(names[0], names[1])
    build_engines(folder, components=("unet",), log=lambda *a: None)
    unet = TensorRTBackend().load(folder, load_manifest(folder), "unet")
    feeds = {"sample": np.ones((1, 4, 16, 16), np.float32), "timestep": np.array([500], np.float32),
             "encoder_hidden_states": np.ones((1, 77, 32), np.float32)}
    before = unet.run(feeds)["noise_pred"]
    base = load_file(folder / unet.entry.refit_base)[names[0]]
    unet.refit({names[0]: base * 0})
    assert names[1] in unet._pristine and names[1] not in unet._values  # supplied from the base, not changed
    assert np.abs(unet.run(feeds)["noise_pred"] - before).max() > 1e-4
    unet.refit({names[0]: base})
    np.testing.assert_array_equal(unet.run(feeds)["noise_pred"], before)


def test_failed_refit_keeps_previous_weights(gpu_standin_modules, trt_refit_folder, monkeypatch):
    from lcmrt.backends.tensorrt import TensorRTBackend

    unet = TensorRTBackend().load(trt_refit_folder, load_manifest(trt_refit_folder), "unet")
    name = sorted(unet.engine.header["refittable"])[0]
    feeds = {"sample": np.ones((1, 4, 16, 16), np.float32), "timestep": np.array([10], np.float32),
             "encoder_hidden_states": np.ones((1, 77, 32), np.float32)}
    before = unet.run(feeds)["noise_pred"]
    calls = []
    real = gpu_standin_modules.trt.Refitter.refit_cuda_engine
    monkeypatch.setattr(gpu_standin_modules.trt.Refitter, "refit_cuda_engine",
                        lambda self: bool(calls.append(1)) if len(calls) == 0 else real(self))
    with pytest.raises(BackendError, match="failed to refit"):
        unet.refit({name: load_file(trt_refit_folder / unet.entry.refit_base)[name] * 3})
    np.testing.assert_array_equal(unet.run(feeds)["noise_pred"], before)
    with pytest.raises(BackendError, match="not refittable"):
        unet.refit({"no.such.weight": np.zeros(1, np.float32)})
    with pytest.raises(BackendError, match="holds"):
        unet.refit({name: np.zeros(3, np.float32)})


def test_refit_whose_restore_fails_too_says_so(gpu_standin_modules, trt_refit_folder, monkeypatch, caplog):
    """Both the refit and putting the previous weights back fail: the error is raised and the failed restore
    is logged (the session's weights are then unknown)."""
    from lcmrt.backends.tensorrt import TensorRTBackend

    unet = TensorRTBackend().load(trt_refit_folder, load_manifest(trt_refit_folder), "unet")
    name = sorted(unet.engine.header["refittable"])[0]
    monkeypatch.setattr(gpu_standin_modules.trt.Refitter, "refit_cuda_engine", lambda self: False)
    with pytest.raises(BackendError, match="failed to refit"):
        unet.refit({name: load_file(trt_refit_folder / unet.entry.refit_base)[name] * 3})
    assert "restoring the previous unet weights after a failed refit also failed" in caplog.text


def test_capture_failure_falls_back_to_eager(gpu_standin_modules, trt_engine_folder, monkeypatch):
    cupy = gpu_standin_modules.cupy

    def refuse(self, mode=None):
        raise cupy.runtime.CUDARuntimeError("cudaErrorStreamCaptureUnsupported")

    monkeypatch.setattr(cupy.Stream, "begin_capture", refuse)
    pipe = Pipeline.load(trt_engine_folder, backend="tensorrt")
    np.testing.assert_allclose(pipe(**ARGS), _reference(trt_engine_folder), atol=FP32_ENGINE_ATOL, rtol=0)
    assert "CaptureUnsupported" in pipe.sessions["unet"]._loop.eager_reason


def test_engine_for_another_trt_version(gpu_standin_modules, trt_engine_folder):
    gpu_standin_modules.trt.set_version("11.4.0.106")
    with pytest.raises(EngineFolderError, match="--engines-only"):
        Pipeline.load(trt_engine_folder, backend="tensorrt")


def test_feeds_are_checked(gpu_standin_modules, trt_engine_folder):
    from lcmrt.backends.tensorrt import TensorRTBackend

    vae = TensorRTBackend().load(trt_engine_folder, load_manifest(trt_engine_folder), "vae_decoder")
    with pytest.raises(BackendError, match="expected float32"):
        vae.run({"latents": np.zeros((1, 4, 16, 16), np.float64)})
    with pytest.raises(BackendError, match="takes inputs"):
        vae.run({"x": np.zeros(1, np.float32)})


def test_no_gpu_is_a_clear_error(gpu_standin_modules):
    from lcmrt.backends.tensorrt import TensorRTBackend

    with pytest.raises(BackendError, match="No usable CUDA GPU 3"):
        TensorRTBackend(device_id=3)


def test_fp16_engines_and_precision(gpu_standin_modules, tiny_engine, tmp_path):
    """fp16 engines built from the fp16 graphs run with precision fp16 (or unset) and are refused for fp32."""
    from lcmrt.engines.build import EngineRequest, add_engines

    folder = tmp_path / "fp16"
    shutil.copytree(tiny_engine, folder)
    add_engines(folder, EngineRequest(backend="tensorrt", ort_cpu_graphs=False, workspace="256M"))
    fp16 = Pipeline.load(folder, backend="tensorrt", precision="fp16")
    assert fp16.sessions["unet"].precision == "fp16" and fp16.sessions["vae_decoder"].precision == "fp32"
    ref = Pipeline.load(folder, backend="onnxruntime-cpu")
    image = fp16(**ARGS)
    assert np.isfinite(image).all() and 0 < np.abs(image - ref(**ARGS)).max() < 0.05  # fp16 storage, not fp32
    with pytest.raises(BackendError, match="precision fp32 was asked for.*--engines-only"):
        Pipeline.load(folder, backend="tensorrt", precision="fp32")


def test_unloadable_plan_names_the_rebuild(gpu_standin_modules, trt_engine_folder, tmp_path):
    """A plan TensorRT cannot deserialize (hash checks off, so it reaches TensorRT) is a BackendError naming the
    file and the rebuild command."""
    from lcmrt.backends.tensorrt import TensorRTBackend

    folder = tmp_path / "engine"
    shutil.copytree(trt_engine_folder, folder)
    manifest = load_manifest(folder)
    plan = next(folder / e["file"] for e in manifest["engines"] if e["component"] == "unet")
    plan.write_bytes(b"not a plan")
    with pytest.raises(BackendError, match=rf"could not load {plan.relative_to(folder)}.*--engines-only"):
        TensorRTBackend(verify_plans=False).load(folder, manifest, "unet")
