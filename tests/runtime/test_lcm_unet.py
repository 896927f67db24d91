"""Full LCM models (a distilled LCM UNet, not LCM-LoRA): the guidance scale is the UNet's `timestep_cond`
input and no unconditional batch runs. Tiny SD1.5 and SDXL models with such a UNet (random weights, the real
config key `time_cond_proj_dim`), built without an LCM-LoRA, against diffusers' LatentConsistencyModelPipeline
and StableDiffusionXLPipeline with the same UNet, latents and noise."""
from __future__ import annotations

import numpy as np
import pytest

from lcmrt import Pipeline
from lcmrt.errors import InputError
from lcmrt.guidance import TIMESTEP_COND, guidance_embedding

from tiny_engines import TINY_HEIGHT, TINY_WIDTH, build_tiny_engine, diff_to_diffusers  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

MAX_ABS_DIFF = 2e-3
TIME_COND_PROJ_DIM = 32  # LCM_Dreamshaper_v7 and LCM-SDXL use 256; any width exercises the same graph
LATENT_SHAPE = (1, 4, TINY_HEIGHT // 8, TINY_WIDTH // 8)
PROMPT = "a watercolor fox in the snow"


def _pipeline_class(arch):
    return diffusers.StableDiffusionXLPipeline if arch == "sdxl" else diffusers.LatentConsistencyModelPipeline


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def lcm_model(arch, tmp_path_factory):
    """The tiny random model with its UNet replaced by one of the same config plus time_cond_proj_dim, saved as
    the LCM models are (SD1.5 ones as a LatentConsistencyModelPipeline folder with LCMScheduler)."""
    from lcmrt.export.random_model import write_random_model

    tmp = tmp_path_factory.mktemp(f"lcm-{arch}")
    paths = write_random_model(tmp / "random", arch=arch, size="tiny", seed=0)
    base = (diffusers.StableDiffusionXLPipeline if arch == "sdxl" else diffusers.StableDiffusionPipeline
            ).from_pretrained(paths["model"], torch_dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        unet = diffusers.UNet2DConditionModel.from_config({**base.unet.config,
                                                           "time_cond_proj_dim": TIME_COND_PROJ_DIM})
    scheduler = diffusers.LCMScheduler.from_config(base.scheduler.config)
    if arch == "sdxl":
        base.register_modules(unet=unet, scheduler=scheduler)
        pipe = base
    else:
        pipe = diffusers.LatentConsistencyModelPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp / "lcm", safe_serialization=True)
    return tmp / "lcm"


@pytest.fixture(scope="module")
def engine(lcm_model, tmp_path_factory):
    return build_tiny_engine({"model": lcm_model}, tmp_path_factory.mktemp("engine") / "engine",
                             guidance_mode="none", style_weight=None, lcm=False)


@pytest.fixture(scope="module")
def reference(arch, lcm_model):
    ref = _pipeline_class(arch).from_pretrained(lcm_model, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_guidance_embedding_is_diffusers(reference):
    """Equal up to float32 rounding of the angles (up to 1000 (w - 1)), as lcmrt/guidance.py explains."""
    for scale in (1.0, 1.5, 8.5, 15.0):
        for dim in (32, 33, 256):
            expected = reference.get_guidance_scale_embedding(torch.tensor([scale - 1.0]), embedding_dim=dim).numpy()
            got = guidance_embedding(scale, dim, 2)
            assert got.shape == (2, dim) and got.dtype == np.float32
            np.testing.assert_allclose(got, np.repeat(expected, 2, axis=0), rtol=0,
                                       atol=1e-6 + 2 * 1000 * (scale - 1) * 2.0 ** -23)


def test_the_unet_takes_the_guidance_embedding(engine):
    pipe = Pipeline.load(engine)
    assert pipe.guidance_embedded and pipe.supports_guidance
    assert TIMESTEP_COND in [t.name for t in pipe.manifest.component("unet").inputs]
    assert pipe.shapes.unet_batch_sizes == (1,)  # no unconditional batch
    assert pipe.manifest.adapters == ()


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("guidance", [1.0, 8.5])
def test_image_matches_diffusers(engine, reference, monkeypatch, steps, guidance):
    rng = np.random.default_rng(steps)
    latents = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    step_noise = [rng.standard_normal(LATENT_SHAPE, dtype=np.float32) for _ in range(steps - 1)]
    pipe = Pipeline.load(engine)
    diff = diff_to_diffusers(pipe, reference, monkeypatch, PROMPT, latents, step_noise, steps, guidance)
    print(f"{pipe.family.name} LCM UNet steps={steps} guidance={guidance}: max abs diff {diff:.2e}")
    assert diff <= MAX_ABS_DIFF
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                 step_noise=step_noise, output="np")
    other = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance + 2, latents=latents,
                 step_noise=step_noise, output="np")
    assert np.abs(other - image).max() > MAX_ABS_DIFF  # the embedding reaches the UNet


def test_negative_prompt_is_refused(engine):
    with pytest.raises(InputError, match="distilled LCM UNet.*negative prompt"):
        Pipeline.load(engine)(PROMPT, negative_prompt="blurry", seed=0)


def test_build_refuses_an_lcm_lora_or_cfg_on_a_distilled_model(lcm_model, tiny_model, tmp_path):
    with pytest.raises(InputError, match="distilled LCM model already"):
        build_tiny_engine({**tiny_model, "model": lcm_model}, tmp_path / "a", guidance_mode="none", style_weight=None)
    with pytest.raises(InputError, match="--guidance-mode none"):
        build_tiny_engine({"model": lcm_model}, tmp_path / "b", guidance_mode="cfg", style_weight=None, lcm=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_plain_model_needs_the_lcm_lora(tiny_model, tmp_path):
    with pytest.raises(InputError, match="not a distilled LCM model.*--lcm-lora"):
        build_tiny_engine(tiny_model, tmp_path / "c", style_weight=None, lcm=False)
