"""img2img and inpainting on the tiny SD1.5 folders against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (regular and 9-channel inpainting UNet) with LCMScheduler, on the same weights,
image, mask and noise: one shared list of standard-normal arrays replaces diffusers' draws in the order it makes
them (the VAE encoder's sample, the start noise, the masked image's sample, the step noise), which is the order
lcmrt documents, so equal images also check that order."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lcmrt import Pipeline
from lcmrt.errors import GenerationError, InputError

from tiny_engines import (STYLE_WEIGHT, TINY_HEIGHT, TINY_WIDTH, build_tiny_engine, diffusers_edit, edit_draws,
                          edit_image, edit_mask, lcmrt_arrays)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

MAX_ABS_DIFF = 2e-3  # on the [0, 1] image, as the txt2img parity tests
PROMPT = "a watercolor fox in the snow"
NEGATIVE = "blurry, low quality"
LATENT = (4, TINY_HEIGHT // 8, TINY_WIDTH // 8)
# (steps, strength) pairs that leave no step: int(steps * strength) == 0
NO_STEP = [(1, 0.3), (1, 0.5), (2, 0.3)]
RUNS = [(1, 1.0), (2, 0.5), (2, 1.0), (4, 0.3), (4, 0.5), (4, 1.0)]


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine)


def _reference(model_path, pipeline_class, lcm_lora, style_lora):
    from lcmrt.export.lora import LoraSpec, fuse_loras

    ref = pipeline_class.from_pretrained(model_path, torch_dtype=torch.float32, safety_checker=None,
                                         requires_safety_checker=False)
    fuse_loras(ref, [LoraSpec(lcm_lora, weight=1.0, name="lcm", role="lcm"),
                     LoraSpec(style_lora, weight=STYLE_WEIGHT, name="style")])
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def img2img_reference(tiny_model):
    return _reference(tiny_model["model"], diffusers.StableDiffusionImg2ImgPipeline, tiny_model["lcm_lora"],
                      tiny_model["style_lora"])


@pytest.fixture(scope="module")
def inpaint_reference(img2img_reference):
    return diffusers.StableDiffusionInpaintPipeline.from_pipe(img2img_reference)


def steps_run(steps, strength):
    return min(int(steps * strength), steps)


@pytest.mark.parametrize("steps, strength", RUNS)
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_img2img_matches_diffusers(pipe, img2img_reference, monkeypatch, steps, strength, guidance):
    runs = steps_run(steps, strength)
    arrays = edit_draws(2 + runs - 1, seed=steps * 10 + int(strength * 10))
    call = dict(prompt=PROMPT, image=edit_image(), strength=strength, num_inference_steps=steps,
                guidance_scale=guidance, **({"negative_prompt": NEGATIVE} if guidance > 1 else {}))
    expected = diffusers_edit(img2img_reference, monkeypatch, arrays, **call)
    got = pipe(**call, output="np", **lcmrt_arrays(("image_noise", "latents"), arrays))
    diff = float(np.abs(got - expected).max())
    print(f"img2img steps={steps} strength={strength} guidance={guidance}: max abs diff {diff:.2e}")
    assert diff <= MAX_ABS_DIFF


def test_img2img_resizes_like_diffusers(pipe, img2img_reference, monkeypatch):
    """An image of another size is resized (Lanczos) to the output size, as diffusers' processor does."""
    arrays = edit_draws(3, seed=5)
    call = dict(prompt=PROMPT, strength=0.5, num_inference_steps=4, guidance_scale=1.0)  # diffusers' default: 7.5
    # diffusers' img2img pipeline keeps an image's own size: resize it first as its VaeImageProcessor would
    resized = edit_image(96, 160).resize((TINY_WIDTH, TINY_HEIGHT), Image.LANCZOS)
    expected = diffusers_edit(img2img_reference, monkeypatch, arrays, image=resized, **call)
    got = pipe(**call, image=edit_image(96, 160), output="np", **lcmrt_arrays(("image_noise", "latents"), arrays))
    assert got.shape == (1, TINY_HEIGHT, TINY_WIDTH, 3)
    assert float(np.abs(got - expected).max()) <= MAX_ABS_DIFF


def test_img2img_keeps_the_image_and_strength_matters(pipe):
    """The parity test can fail: the image, the strength and the noise each move the result past its bound, and
    low strength keeps more of the input image than high strength: two input images give results further apart.
    (Closeness to the input's pixels says nothing here: the tiny random VAE does not reconstruct images.)"""
    image, other_image = edit_image(), edit_image(seed=1).rotate(90)

    def run(img=image, strength=0.5, seed=0):
        return pipe(PROMPT, image=img, strength=strength, num_inference_steps=4, seed=seed, output="np")[0]

    base = run()
    for other in (run(img=other_image), run(strength=0.75), run(seed=1)):
        assert np.abs(base - other).max() > 5 * MAX_ABS_DIFF
    apart = {s: np.abs(run(strength=s) - run(img=other_image, strength=s)).mean() for s in (0.25, 1.0)}
    assert apart[0.25] > 10 * apart[1.0]


@pytest.mark.parametrize("steps, strength", NO_STEP)
def test_strengths_that_leave_no_step_are_refused(pipe, img2img_reference, steps, strength):
    with pytest.raises(GenerationError, match=r"runs int\(.*\) = 0 steps"):
        pipe(PROMPT, image=edit_image(), strength=strength, num_inference_steps=steps)
    with pytest.raises((ValueError, RuntimeError)):  # diffusers' img2img fails deep in its UNet on no timestep
        img2img_reference(PROMPT, image=edit_image(), strength=strength, num_inference_steps=steps)


@pytest.mark.parametrize("strength", [0, -0.5, 1.5, float("nan"), "0.5", True])
def test_bad_strengths(pipe, strength):
    with pytest.raises(GenerationError, match=r"strength=.* must be a number in \(0, 1\]"):
        pipe(PROMPT, image=edit_image(), strength=strength)


def test_edit_argument_errors(pipe):
    with pytest.raises(InputError, match="pass image="):
        pipe(PROMPT, strength=0.5)
    with pytest.raises(InputError, match="pass image= as well"):
        pipe(PROMPT, mask_image=edit_mask())
    with pytest.raises(InputError, match="mask_blur"):
        pipe(PROMPT, image=edit_image(), mask_blur=4)
    with pytest.raises(InputError, match="masked_image_noise is not used"):
        pipe(PROMPT, image=edit_image(), masked_image_noise=np.zeros((1, *LATENT), np.float32))
    with pytest.raises(InputError, match="no tiny VAE"):
        pipe(PROMPT, image=edit_image(), tiny_vae=True)
    with pytest.raises(InputError):
        pipe(PROMPT, image=42)
    with pytest.raises(GenerationError, match="step_noise has 3 arrays; 2 steps need 1"):
        pipe(PROMPT, image=edit_image(), strength=0.5, step_noise=edit_draws(3, 0))


def test_seeded_edits_are_reproducible_and_differ_by_seed(pipe):
    a = pipe(PROMPT, image=edit_image(), strength=0.5, seed=3, output="np")
    b = pipe(PROMPT, image=edit_image(), strength=0.5, seed=3, output="np")
    c = pipe(PROMPT, image=edit_image(), strength=0.5, seed=4, output="np")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.01
    assert pipe.last_precisions["vae_encoder"] == "fp32"


# --- inpainting ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, strength", RUNS)
def test_inpaint_regular_unet_matches_diffusers(pipe, inpaint_reference, monkeypatch, steps, strength):
    runs = steps_run(steps, strength)
    # the image's sample, the start noise, the masked image's sample (diffusers draws it even for a regular
    # UNet, which never uses it; lcmrt skips that encoding), then the step noise
    arrays = edit_draws(3 + runs - 1, seed=steps * 10 + int(strength * 10))
    call = dict(prompt=PROMPT, image=edit_image(), mask_image=edit_mask(), strength=strength,
                num_inference_steps=steps, guidance_scale=1.0)
    expected = diffusers_edit(inpaint_reference, monkeypatch, arrays, **call)
    ours = arrays[:2] + arrays[3:]
    got = pipe(**call, output="np", **lcmrt_arrays(("image_noise", "latents"), ours))
    diff = float(np.abs(got - expected).max())
    print(f"inpaint (4-channel UNet) steps={steps} strength={strength}: max abs diff {diff:.2e}")
    assert diff <= MAX_ABS_DIFF


def test_inpaint_keeps_the_unmasked_region(pipe):
    """A regular UNet's known region is put back after every step: outside the mask the output is the VAE's
    round trip of the image whatever the prompt, inside it follows the prompt."""
    call = dict(image=edit_image(), mask_image=edit_mask(), strength=1.0, num_inference_steps=4, seed=0, output="np")
    a, b = pipe(PROMPT, **call)[0], pipe("a red bicycle", **call)[0]
    keep = np.asarray(edit_mask()) == 0
    # pixels far from the mask edge (the VAE's receptive field mixes the two near it)
    far = keep & np.roll(keep, 24, 0) & np.roll(keep, -24, 0) & np.roll(keep, 24, 1) & np.roll(keep, -24, 1)
    assert np.abs(a - b)[far].max() < 0.2 * np.abs(a - b)[~keep].max()


def test_mask_errors(pipe):
    with pytest.raises(InputError):
        pipe(PROMPT, image=edit_image(), mask_image="/nonexistent/mask.png")
    with pytest.raises(InputError):
        pipe(PROMPT, image=edit_image(), mask_image=edit_mask(), mask_blur=-1)


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory):
    from lcmrt.export.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("random-inpaint") / "tiny", size="tiny", seed=0, inpaint=True)


@pytest.fixture(scope="module")
def inpaint_engine(inpaint_model, tmp_path_factory):
    return build_tiny_engine(inpaint_model, tmp_path_factory.mktemp("engines") / "tiny-inpaint")


@pytest.fixture(scope="module")
def inpaint_unet_reference(inpaint_model):
    return _reference(inpaint_model["model"], diffusers.StableDiffusionInpaintPipeline, inpaint_model["lcm_lora"],
                      inpaint_model["style_lora"])


@pytest.mark.parametrize("steps, strength", RUNS)
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_inpainting_unet_matches_diffusers(inpaint_engine, inpaint_unet_reference, monkeypatch, steps, strength,
                                           guidance):
    pipe = Pipeline.load(inpaint_engine)
    assert pipe.unet_in_channels == 9
    runs = steps_run(steps, strength)
    # at strength 1 diffusers encodes only the masked image (the start is pure noise)
    names = ("latents", "masked_image_noise") if strength == 1.0 else ("image_noise", "latents", "masked_image_noise")
    arrays = edit_draws(len(names) + runs - 1, seed=steps * 10 + int(strength * 10))
    call = dict(prompt=PROMPT, image=edit_image(), mask_image=edit_mask(), strength=strength,
                num_inference_steps=steps, guidance_scale=guidance,
                **({"negative_prompt": NEGATIVE} if guidance > 1 else {}))
    expected = diffusers_edit(inpaint_unet_reference, monkeypatch, arrays, **call)
    got = pipe(**call, output="np", **lcmrt_arrays(names, arrays))
    diff = float(np.abs(got - expected).max())
    print(f"inpaint (9-channel UNet) steps={steps} strength={strength} guidance={guidance}: max abs diff {diff:.2e}")
    assert diff <= MAX_ABS_DIFF


def test_inpainting_unet_needs_a_mask_and_uses_it(inpaint_engine):
    pipe = Pipeline.load(inpaint_engine)
    with pytest.raises(InputError, match="inpainting UNet"):
        pipe(PROMPT)
    with pytest.raises(InputError, match="inpainting UNet"):
        pipe(PROMPT, image=edit_image())
    call = dict(image=edit_image(), strength=1.0, num_inference_steps=2, seed=0, output="np")
    full = Image.new("L", (TINY_WIDTH, TINY_HEIGHT), 255)
    assert np.abs(pipe(PROMPT, mask_image=edit_mask(), **call) - pipe(PROMPT, mask_image=full, **call)).max() > 0.01


def test_mask_blur_matches_diffusers_blur(pipe, inpaint_reference, monkeypatch):
    """mask_blur=r is diffusers' mask_processor.blur(mask, blur_factor=r) before the pipeline."""
    arrays = edit_draws(3 + 1, seed=11)
    call = dict(prompt=PROMPT, image=edit_image(), strength=0.5, num_inference_steps=4, guidance_scale=1.0)
    blurred = inpaint_reference.mask_processor.blur(edit_mask(), blur_factor=6)
    expected = diffusers_edit(inpaint_reference, monkeypatch, arrays, mask_image=blurred, **call)
    got = pipe(**call, mask_image=edit_mask(), mask_blur=6, output="np",
               **lcmrt_arrays(("image_noise", "latents"), arrays[:2] + arrays[3:]))
    assert float(np.abs(got - expected).max()) <= MAX_ABS_DIFF


def test_cli_generate_edits_images(pipe, tiny_engine, tmp_path):
    """`lcmrt generate --image [--mask]` writes the image the API gives, and records the edit in the PNG."""
    from click.testing import CliRunner

    from lcmrt.cli import cli
    from lcmrt.images import read_png_metadata

    edit_image().save(tmp_path / "in.png")
    edit_mask().save(tmp_path / "mask.png")
    for extra, call in ((["--strength", "0.5"], dict(strength=0.5)),
                        (["--mask", tmp_path / "mask.png", "--mask-blur", "2"],
                         dict(mask_image=edit_mask(), mask_blur=2))):
        out = tmp_path / "out.png"
        result = CliRunner().invoke(cli, [str(a) for a in ("generate", tiny_engine, PROMPT, "--image",
                                                           tmp_path / "in.png", "--seed", 3, "-o", out, *extra)])
        assert result.exit_code == 0, result.output
        assert "VAE encode" in result.output
        expected = pipe(PROMPT, image=edit_image(), seed=3, **call)[0]
        np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(expected))
        meta = read_png_metadata(out)
        assert meta["image"] == str(tmp_path / "in.png") and meta["strength"] == call.get("strength", 1.0)
    result = CliRunner().invoke(cli, ["generate", str(tiny_engine), PROMPT, "--strength", "0.5"])
    assert result.exit_code != 0 and "--image" in result.output
    result = CliRunner().invoke(cli, ["generate", str(tiny_engine), PROMPT, "--image", str(tmp_path / "missing.png")])
    assert result.exit_code != 0 and "missing.png" in result.output
