"""`Pipeline.stream` on a tiny SD1.5 folder built with a stream batch and a tiny VAE: every output frame is the
img2img image of its input frame (the stagger changes throughput, not results), in order, with and without the
tiny VAE and guidance; the similar-frame skip; and the errors. Also the tiny VAE's img2img against diffusers'
StableDiffusionImg2ImgPipeline with the same AutoencoderTiny."""
from __future__ import annotations

import numpy as np
import pytest

from lcmrt import Pipeline
from lcmrt.errors import InputError
from lcmrt.manifest import read_manifest

from tiny_engines import STYLE_WEIGHT, build_tiny_engine, diffusers_edit, edit_draws, edit_image, lcmrt_arrays

PROMPT = "a watercolor fox in the snow"
# A batch-2 UNet call against batch-1 calls: ONNX Runtime's kernels may block the batch differently, so a
# frame can differ from its img2img image by float rounding (measured ~1e-7 on the tiny model)
STAGGER_ATOL = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from lcmrt.export.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("random-model") / "tiny", size="tiny", seed=0, taesd=True)


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    """cfg folder with a stream batch of 2 (UNet batches 1, 2 and 4) and the tiny VAE."""
    return build_tiny_engine(model, tmp_path_factory.mktemp("engines") / "stream", stream_batch=2,
                             tiny_vae=model["taesd"])


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.load(folder)


def frames(count: int) -> list:
    return [edit_image(seed=k).rotate(15 * k) for k in range(count)]


def test_the_folder_records_the_stream_batch_and_the_tiny_vae(folder):
    manifest = read_manifest(folder)
    assert manifest.shapes.stream_batch == 2
    assert manifest.shapes.unet_batch_sizes == (1, 2, 4)
    assert {"tiny_vae_encoder", "tiny_vae_decoder", "vae_encoder"} <= set(manifest.components)
    timestep = {t.name: t for t in manifest.component("unet").inputs}["timestep"]
    assert list(timestep.shape) == ["unet_batch"]  # one timestep per sample
    from click.testing import CliRunner

    from lcmrt.cli import cli

    shown = CliRunner().invoke(cli, ["info", str(folder)]).output
    assert "UNet batches [1, 2, 4] (stream batch 2)" in shown and "tiny_vae_encoder" in shown


@pytest.mark.parametrize("tiny_vae, guidance", [(False, 1.0), (True, 1.0), (False, 1.5)])
def test_stream_frames_equal_img2img_per_frame(pipe, tiny_vae, guidance):
    inputs = frames(5)
    stream = pipe.stream(PROMPT, num_inference_steps=4, strength=0.5, guidance_scale=guidance, seed=7,
                         tiny_vae=tiny_vae, output="np")
    assert stream.batch == 2
    outputs = [stream.push(frame) for frame in inputs]
    assert outputs[0] is None  # the batch fills: frame k leaves with push k + 1
    outputs = outputs[1:] + stream.flush()
    assert len(outputs) == len(inputs)
    worst = 0.0
    for frame, out in zip(inputs, outputs):
        expected = pipe(PROMPT, image=frame, strength=0.5, num_inference_steps=4, guidance_scale=guidance, seed=7,
                        tiny_vae=tiny_vae, output="np")[0]
        worst = max(worst, float(np.abs(out - expected).max()))
    print(f"stream vs img2img (tiny_vae={tiny_vae}, guidance={guidance}): max abs diff {worst:.2e}")
    assert worst <= STAGGER_ATOL
    # different frames give different outputs, well past the bound (the random tiny VAE encoder maps every
    # frame near the same latents: 1.4e-3 apart)
    assert np.abs(outputs[0] - outputs[1]).max() > 10 * STAGGER_ATOL
    assert stream.stats == {**stream.stats, "frames_in": 5, "frames_out": 5, "skipped": 0, "unet_calls": 6}


def test_one_step_streams_need_no_stream_batch(tiny_engine):
    """int(steps * strength) == 1: a batch of one, each push returns its own frame."""
    pipe = Pipeline.load(tiny_engine)
    stream = pipe.stream(PROMPT, num_inference_steps=2, strength=0.5, seed=1, output="np")
    out = [stream.push(frame) for frame in frames(2)]
    expected = pipe(PROMPT, image=frames(2)[1], strength=0.5, num_inference_steps=2, seed=1, output="np")[0]
    np.testing.assert_array_equal(out[1], expected)
    assert stream.flush() == []


def test_frames_yields_every_output_in_order(pipe):
    stream = pipe.stream(PROMPT, seed=0, output="pil")
    out = list(stream.frames(frames(3)))
    assert len(out) == 3 and all(image.size == (128, 128) for image in out)


def test_similar_frames_are_skipped(pipe):
    stream = pipe.stream(PROMPT, seed=0, skip_threshold=0.99, output="np")
    a, b = frames(2)
    stream.push(a)
    first = stream.push(a)  # identical: skipped, returns the last output (none yet)
    assert first is None and stream.stats["skipped"] == 1
    out = stream.push(b)  # different: runs, and frame a leaves
    assert out is not None and stream.stats["unet_calls"] == 2
    assert stream.push(b) is out  # the last output again
    assert stream.stats["skipped"] == 2


def test_stream_errors(pipe, tiny_engine):
    with pytest.raises(InputError, match="--stream-batch 3"):
        pipe.stream(PROMPT, num_inference_steps=4, strength=0.75)
    with pytest.raises(InputError, match="--stream-batch 2"):
        Pipeline.load(tiny_engine).stream(PROMPT, num_inference_steps=4, strength=0.5, guidance_scale=1.5)
    with pytest.raises(InputError, match="skip_threshold"):
        pipe.stream(PROMPT, skip_threshold=2)
    with pytest.raises(InputError, match="seed"):
        pipe.stream(PROMPT, seed=None)
    with pytest.raises(InputError, match="no tiny VAE"):
        Pipeline.load(tiny_engine).stream(PROMPT, tiny_vae=True)
    with pytest.raises(InputError):
        pipe.stream(PROMPT).push("/nonexistent/frame.png")


def test_tiny_vae_img2img_matches_diffusers(pipe, model, monkeypatch):
    """The tiny VAE's encoder is deterministic (diffusers' retrieve_latents takes its `latents`): only the start
    noise and the step noise are drawn."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from lcmrt.export.lora import LoraSpec, fuse_loras

    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        model["model"], torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    ref.vae = diffusers.AutoencoderTiny.from_pretrained(model["taesd"], torch_dtype=torch.float32)
    fuse_loras(ref, [LoraSpec(model["lcm_lora"], weight=1.0, name="lcm", role="lcm"),
                     LoraSpec(model["style_lora"], weight=STYLE_WEIGHT, name="style")])
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    arrays = edit_draws(2, seed=3)
    call = dict(prompt=PROMPT, image=edit_image(), strength=0.5, num_inference_steps=4, guidance_scale=1.0)
    expected = diffusers_edit(ref, monkeypatch, arrays, **call)
    got = pipe(**call, tiny_vae=True, output="np", **lcmrt_arrays(("latents",), arrays))
    assert float(np.abs(got - expected).max()) <= 2e-3
    assert pipe.last_precisions["tiny_vae_encoder"] == pipe.last_precisions["tiny_vae_decoder"] == "fp32"
