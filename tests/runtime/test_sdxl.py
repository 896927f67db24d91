"""The SDXL families (SDXL, SSD-1B) end to end on tiny random models of their architectures: build with the
LCM-LoRA (kohya keys) and a style LoRA on the UNet and both text encoders fused, then images against diffusers'
StableDiffusionXLPipeline + LCMScheduler with the same weights, latents and noise."""
from __future__ import annotations

import numpy as np
import pytest

from lcmrt import Pipeline
from lcmrt.errors import InputError
from lcmrt.manifest import read_manifest

from tiny_engines import (CROSS_GRAPH_ATOL, STYLE_WEIGHT, TINY_HEIGHT, TINY_WIDTH, build_tiny_engine,  # noqa: E402
                          diff_to_diffusers, diffusers_edit, edit_draws, edit_image, edit_mask, lcmrt_arrays)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

MAX_ABS_DIFF = 2e-3  # the bound on the [0, 1] image; fp32 ONNX Runtime vs torch measures ~1e-6
GRAPH_ATOL = 1e-4  # each exported graph against its torch module
LATENT_SHAPE = (1, 4, TINY_HEIGHT // 8, TINY_WIDTH // 8)
PROMPT = "a watercolor fox in the snow"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module", params=["sdxl", "ssd1b"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family, tmp_path_factory):
    from lcmrt.export.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp(family) / "tiny", arch=family, size="tiny", seed=0, taesd=True)


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    return build_tiny_engine(model, tmp_path_factory.mktemp("engine") / "engine")


@pytest.fixture(scope="module")
def pipe(engine):
    return Pipeline.load(engine)


@pytest.fixture(scope="module")
def reference(model):
    """diffusers' StableDiffusionXLPipeline + LCMScheduler, fp32, with the engine's LoRAs fused the same way."""
    return _reference(diffusers.StableDiffusionXLPipeline, model)


def _reference(pipeline_class, model):
    from lcmrt.export.lora import LoraSpec, fuse_loras

    ref = pipeline_class.from_pretrained(model["model"], torch_dtype=torch.float32)
    fuse_loras(ref, [LoraSpec(model["lcm_lora"], weight=1.0, name="lcm", role="lcm"),
                     LoraSpec(model["style_lora"], weight=STYLE_WEIGHT, name="style")])
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _draws(seed, steps):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(LATENT_SHAPE, dtype=np.float32), [rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
                                                                  for _ in range(steps - 1)]


def test_the_folder_is_of_its_family_with_both_text_encoders(engine, family):
    manifest = read_manifest(engine)
    assert manifest.family == family
    assert set(manifest.components) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert [i.name for i in manifest.component("unet").inputs] == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert set(manifest.tokenizers) == {"text_encoder", "text_encoder_2"}
    assert manifest.force_zeros_for_empty_prompt
    assert manifest.vae_scaling_factor == pytest.approx(0.13025)
    for name, component in manifest.components.items():
        assert component.data["validation"]["max_abs_diff"] <= GRAPH_ATOL, name
    style = next(a for a in manifest.adapters if a.name == "style")
    assert all(style.data["modules"][c] > 0 for c in ("unet", "text_encoder", "text_encoder_2"))


def test_second_tokenizer_pads_with_its_own_token(pipe, reference):
    for name, tokenizer in (("text_encoder", reference.tokenizer), ("text_encoder_2", reference.tokenizer_2)):
        expected = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
        np.testing.assert_array_equal(pipe.tokenizers[name](PROMPT)[0], expected)
    assert reference.tokenizer_2.pad_token_id != reference.tokenizer.pad_token_id


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("guidance, negative_prompt", [(1.0, None), (1.5, NEGATIVE), (1.5, None)],
                         ids=["unguided", "negative-prompt", "zeros-for-empty-negative"])
def test_image_matches_diffusers(pipe, reference, monkeypatch, steps, guidance, negative_prompt):
    latents, step_noise = _draws(steps, steps)
    diff = diff_to_diffusers(pipe, reference, monkeypatch, PROMPT, latents, step_noise, steps, guidance, negative_prompt)
    print(f"{pipe.family.name} steps={steps} guidance={guidance} negative={negative_prompt!r}: max abs diff {diff:.2e}")
    assert diff <= MAX_ABS_DIFF


def test_size_conditioning_matches_diffusers(pipe, reference, monkeypatch):
    latents, step_noise = _draws(9, 2)
    call = dict(original_size=(512, 384), crops_coords_top_left=(16, 8), target_size=(256, 192))
    diff = diff_to_diffusers(pipe, reference, monkeypatch, PROMPT, latents, step_noise, 2, 1.5, NEGATIVE, **call)
    assert diff <= MAX_ABS_DIFF
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, guidance_scale=1.5, latents=latents,
                 step_noise=step_noise, output="np", **call)
    default = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, guidance_scale=1.5, latents=latents,
                   step_noise=step_noise, output="np")
    assert np.abs(image - default).max() > MAX_ABS_DIFF  # the conditioning reaches the UNet


def test_a_second_size_matches_diffusers_at_that_size(model, reference, monkeypatch, tmp_path):
    """A folder of two sizes, at the second: diffusers' image of that size, with the size conditioning that
    follows it by default (original_size = target_size = the image's)."""
    height, width = 96, 160
    pipe = Pipeline.load(build_tiny_engine(model, tmp_path / "sizes", sizes=[(TINY_HEIGHT, TINY_WIDTH), (height, width)]))
    rng = np.random.default_rng(3)
    shape = (1, 4, height // 8, width // 8)
    latents, step_noise = rng.standard_normal(shape, dtype=np.float32), [rng.standard_normal(shape, dtype=np.float32)]
    diff = diff_to_diffusers(pipe, reference, monkeypatch, PROMPT, latents, step_noise, 2, 1.5, NEGATIVE,
                             height=height, width=width)
    print(f"{pipe.family.name} {width}x{height} of a two-size folder: max abs diff {diff:.2e}")
    assert diff <= MAX_ABS_DIFF


def test_the_parity_inputs_change_the_image(pipe):
    """Each input the parity tests vary moves the image past their bound (and ~1000x past the ~1e-6 they
    measure), so they can fail: a wrong conditioning would show."""
    latents, step_noise = _draws(0, 2)

    def run(prompt, guidance=1.0, negative_prompt=None):
        return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=2, guidance_scale=guidance,
                    latents=latents, step_noise=step_noise, output="np")

    base, guided = run(PROMPT), run(PROMPT, 1.5)
    changes = {"guidance": guided, "negative prompt": run(PROMPT, 1.5, NEGATIVE), "prompt": run("a red bicycle")}
    diffs = {what: float(np.abs(base - image).max()) for what, image in changes.items()}
    # zeros for a missing negative prompt (force_zeros_for_empty_prompt) differ from the encoded empty prompt
    diffs["zeros vs empty negative"] = float(np.abs(guided - run(PROMPT, 1.5, "")).max())
    print(pipe.family.name, {k: f"{v:.1e}" for k, v in diffs.items()})
    assert all(diff > MAX_ABS_DIFF for diff in diffs.values()), diffs


def test_encode_prompt_gives_both_conditionings_once_per_prompt(pipe):
    conditioning = pipe.encode_prompt(PROMPT)
    assert conditioning["encoder_hidden_states"].shape == (1, 77, 64)  # 32 + 32 features side by side
    assert conditioning["text_embeds"].shape == (1, 32)
    assert pipe.encode_prompt(PROMPT) is conditioning  # cached: the text encoders ran once


def test_bad_size_conditioning_is_refused(pipe, tiny_engine):
    with pytest.raises(InputError, match="original_size"):
        pipe(PROMPT, original_size=(512,), seed=0)
    with pytest.raises(InputError, match="condition SDXL-family UNets"):
        Pipeline.load(tiny_engine)(PROMPT, original_size=(128, 128), seed=0)


# --- refit, adapters, engine variants: what works for SD1.5 works for the SDXL families ---------------------

@pytest.fixture(scope="module")
def refit_engine(model, tmp_path_factory):
    return build_tiny_engine(model, tmp_path_factory.mktemp("refit") / "engine", refittable=True)


def _image(pipe, **call):
    latents, step_noise = _draws(4, 2)
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2, guidance_scale=1.5, latents=latents,
                step_noise=step_noise, output="np", **call)


def test_refit_matches_the_fused_folder_and_swaps_exactly(refit_engine, pipe):
    refit = Pipeline.load(refit_engine)
    style = next(a for a in read_manifest(refit_engine).adapters if a.name == "style")
    assert {t.split(".")[0] for t in style.targets} == {"unet", "text_encoder", "text_encoder_2"}
    first = _image(refit)
    np.testing.assert_allclose(first, _image(pipe), atol=CROSS_GRAPH_ATOL, rtol=0)
    refit.set_adapters({"style": 0.0})
    off = _image(refit)
    assert np.abs(off - first).max() > MAX_ABS_DIFF
    refit.set_adapters({"style": STYLE_WEIGHT})  # A -> B -> A: bitwise the first image
    np.testing.assert_array_equal(_image(refit), first)


def test_adapter_add_takes_the_second_text_encoder(refit_engine, model, tmp_path):
    import shutil

    from lcmrt.export.adapters import add_adapter
    from lcmrt.export.lora import LoraSpec

    folder = shutil.copytree(refit_engine, tmp_path / "engine")
    record = add_adapter(folder, LoraSpec(model["style_lora"], weight=0.0, name="again"))
    assert record["modules"]["text_encoder_2"] > 0
    pipe = Pipeline.load(folder, adapters={"style": 0.0, "again": STYLE_WEIGHT})
    # the same file added again gives the image of the built-in style adapter, through every text encoder
    np.testing.assert_array_equal(_image(pipe), _image(Pipeline.load(refit_engine)))


def test_fp16_graphs_cover_both_text_encoders(engine, tmp_path):
    import shutil

    from lcmrt.engines.build import EngineRequest, add_engines

    folder = shutil.copytree(engine, tmp_path / "engine")
    add_engines(folder, EngineRequest(fp16=True, ort_cpu_graphs=False))
    fp16 = Pipeline.load(folder, backend="onnxruntime", precision="fp16")
    assert {n: s.precision for n, s in fp16.sessions.items()} == {
        "text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32"}
    diff = float(np.abs(_image(fp16) - _image(Pipeline.load(folder))).max())
    assert 0 < diff < 0.05, diff


def test_int8_unet_and_tiny_vae_decoder(model, engine, tmp_path):
    """TAESDXL (the tiny VAE's architecture) as the decoder and an int8 UNet: both build and run; the int8
    UNet's latents stay near the fp32 UNet's."""
    from lcmrt.engines.build import EngineRequest

    folder = build_tiny_engine(model, tmp_path / "engine", vae_decoder=str(model["taesd"]),
                               engines=EngineRequest(int8=True, ort_cpu_graphs=False))
    manifest = read_manifest(folder)
    assert manifest.component("vae_decoder").data["source"].startswith("AutoencoderTiny")
    int8 = Pipeline.load(folder, precision="int8")
    assert int8.sessions["unet"].precision == "int8"
    image = _image(int8)
    assert image.shape == (1, TINY_HEIGHT, TINY_WIDTH, 3) and np.isfinite(image).all() and image.std() > 0.01
    latents, step_noise = _draws(4, 2)
    call = dict(num_inference_steps=2, latents=latents, step_noise=step_noise, output="latent")
    diff = float(np.abs(int8(PROMPT, **call) - Pipeline.load(folder)(PROMPT, **call)).max())
    assert 0 < diff < 0.5, diff  # int8 rounding moves the latents a little, never to another image


def test_tensorrt_engines_on_the_stand_in(engine, tmp_path, gpu_standin_modules):
    import shutil

    from lcmrt.engines.tensorrt import build_engines

    folder = shutil.copytree(engine, tmp_path / "engine")
    build_engines(folder, workspace="256M", log=lambda *a: None)
    assert {e.component for e in read_manifest(folder).engines} == {"text_encoder", "text_encoder_2", "unet",
                                                                    "vae_decoder", "vae_encoder"}
    trt = Pipeline.load(folder, backend="tensorrt")
    np.testing.assert_allclose(_image(trt), _image(Pipeline.load(folder, backend="onnxruntime-cpu")),
                               atol=CROSS_GRAPH_ATOL, rtol=0)
    assert trt.sessions["unet"]._loop.eager_reason is None  # the step with SDXL's extra inputs was captured


def test_cli_generate_and_info(engine, tmp_path):
    from click.testing import CliRunner

    from lcmrt.cli import cli
    from lcmrt.images import read_png_metadata

    out = tmp_path / "fox.png"
    result = CliRunner().invoke(cli, ["generate", str(engine), PROMPT, "--steps", "2", "--seed", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert read_png_metadata(out)["precision"] == {"text_encoder": "fp32", "text_encoder_2": "fp32", "unet": "fp32",
                                                  "vae_decoder": "fp32"}
    info = CliRunner().invoke(cli, ["info", str(engine)])
    assert info.exit_code == 0 and read_manifest(engine).family in info.output and "text_encoder_2" in info.output


# --- img2img and inpainting, as StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline -----------

@pytest.mark.parametrize("steps, strength, guidance", [(2, 0.5, 1.0), (4, 0.3, 1.0), (4, 1.0, 1.5)])
def test_img2img_matches_diffusers(pipe, reference, monkeypatch, steps, strength, guidance):
    runs = int(steps * strength)
    arrays = edit_draws(2 + runs - 1, seed=steps)
    call = dict(prompt=PROMPT, image=edit_image(), strength=strength, num_inference_steps=steps,
                guidance_scale=guidance, **({"negative_prompt": NEGATIVE} if guidance > 1 else {}))
    expected = diffusers_edit(diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(reference), monkeypatch, arrays,
                              **call)
    got = pipe(**call, output="np", **lcmrt_arrays(("image_noise", "latents"), arrays))
    diff = float(np.abs(got - expected).max())
    print(f"img2img steps={steps} strength={strength} guidance={guidance}: max abs diff {diff:.2e}")
    assert diff <= MAX_ABS_DIFF


@pytest.mark.parametrize("steps, strength", [(2, 0.5), (4, 1.0)])
def test_inpaint_matches_diffusers(pipe, reference, monkeypatch, steps, strength):
    """A regular UNet: the known region is re-noised and blended back after every step (diffusers also encodes
    the masked image, which only an inpainting UNet uses: its draw is skipped here)."""
    runs = int(steps * strength)
    arrays = edit_draws(3 + runs - 1, seed=steps + 1)
    call = dict(prompt=PROMPT, image=edit_image(), mask_image=edit_mask(), strength=strength, num_inference_steps=steps,
                guidance_scale=1.0)
    expected = diffusers_edit(diffusers.StableDiffusionXLInpaintPipeline.from_pipe(reference), monkeypatch, arrays,
                              **call)
    got = pipe(**call, output="np", **lcmrt_arrays(("image_noise", "latents"), arrays[:2] + arrays[3:]))
    diff = float(np.abs(got - expected).max())
    print(f"inpaint steps={steps} strength={strength}: max abs diff {diff:.2e}")
    assert diff <= MAX_ABS_DIFF


@pytest.fixture(scope="module")
def inpaint_model(family, tmp_path_factory):
    """The family's model with a 9-channel inpainting UNet (diffusers/stable-diffusion-xl-1.0-inpainting-0.1's)."""
    from lcmrt.export.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp(f"{family}-inpaint") / "tiny", arch=family, size="tiny", seed=0,
                              inpaint=True)


@pytest.fixture(scope="module")
def inpaint_pipe(inpaint_model, tmp_path_factory):
    return Pipeline.load(build_tiny_engine(inpaint_model, tmp_path_factory.mktemp("engine") / "inpaint"))


@pytest.mark.parametrize("steps, strength", [(2, 0.5), (4, 1.0)])
def test_inpainting_unet_matches_diffusers(inpaint_pipe, inpaint_model, monkeypatch, steps, strength):
    pipe = inpaint_pipe
    reference = _reference(diffusers.StableDiffusionXLInpaintPipeline, inpaint_model)
    names = ("latents", "masked_image_noise") if strength == 1.0 else ("image_noise", "latents", "masked_image_noise")
    arrays = edit_draws(len(names) + int(steps * strength) - 1, seed=steps + 2)
    call = dict(prompt=PROMPT, image=edit_image(), mask_image=edit_mask(), strength=strength, num_inference_steps=steps,
                guidance_scale=1.0)
    expected = diffusers_edit(reference, monkeypatch, arrays, **call)
    got = pipe(**call, output="np", **lcmrt_arrays(names, arrays))
    diff = float(np.abs(got - expected).max())
    print(f"inpaint (9-channel UNet) steps={steps} strength={strength}: max abs diff {diff:.2e}")
    assert diff <= MAX_ABS_DIFF
