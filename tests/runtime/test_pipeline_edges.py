"""Every input of lcmrt/pipeline.py and `lcmrt generate` checked at the edge, before any component runs, and
no image from non-finite numbers: NaN/inf in the inputs is refused, NaN/inf out of a component is an error."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
from click.testing import CliRunner

from lcmrt import Pipeline
from lcmrt.cli import cli
from lcmrt.errors import AdapterError, GenerationError, InputError
from lcmrt.images import to_pil
from lcmrt.pipeline import MAX_NUM_IMAGES

from tiny_engines import TINY_HEIGHT, TINY_WIDTH  # noqa: E402

PROMPT = "a lighthouse at dusk"
LATENT_SHAPE = (1, 4, TINY_HEIGHT // 8, TINY_WIDTH // 8)  # [B, 4, H/8, W/8]


@pytest.fixture(scope="module")
def loaded(tiny_engine):
    return Pipeline.load(tiny_engine)


@pytest.fixture
def runs(loaded, monkeypatch):
    """The pipeline with every session counting its runs: {component: runs}."""
    counts = {name: 0 for name in loaded.sessions}
    for name, session in loaded.sessions.items():
        def run(feeds, name=name, original=session.run):
            counts[name] += 1
            return original(feeds)

        monkeypatch.setattr(session, "run", run)
    return loaded, counts


@pytest.fixture
def idle(runs):
    """The pipeline, and after the test: no session ran."""
    pipe, counts = runs
    yield pipe
    assert not any(counts.values()), f"components ran before the request was refused: {counts}"


def _draws(steps, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(LATENT_SHAPE, dtype=np.float32),
            [rng.standard_normal(LATENT_SHAPE, dtype=np.float32) for _ in range(steps - 1)])


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _assert_clean_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def no_load(monkeypatch):
    """`lcmrt generate` must refuse before it loads the folder."""
    def load(*args, **kwargs):
        raise AssertionError("Pipeline.load ran before the arguments were checked")

    monkeypatch.setattr(Pipeline, "load", load)


# --- integers: numpy's accepted, bool and floats refused ------------------------------------------------


def test_numpy_integers_are_integers(runs):
    pipe, _ = runs
    expected = pipe(PROMPT, num_inference_steps=2, num_images=1, seed=1, output="np")
    got = pipe(PROMPT, num_inference_steps=np.int64(2), num_images=np.int32(1), seed=np.uint8(1), output="np")
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("steps", [True, 4.0, np.float64(2), "4"])
def test_steps_must_be_an_integer(idle, steps):
    with pytest.raises(GenerationError, match=rf"num_inference_steps={re.escape(repr(steps))} .*must be an integer"):
        idle(PROMPT, num_inference_steps=steps, seed=0)


@pytest.mark.parametrize("num_images", [True, 2.0, np.float32(1)])
def test_num_images_must_be_an_integer(idle, num_images):
    with pytest.raises(InputError, match="must be a positive integer"):
        idle(PROMPT, num_images=num_images, seed=0)


def test_num_images_has_a_maximum(idle):
    with pytest.raises(InputError, match=rf"num_images={MAX_NUM_IMAGES + 1} .*at most {MAX_NUM_IMAGES}.*loop"):
        idle(PROMPT, num_images=MAX_NUM_IMAGES + 1, seed=0)


def test_cli_num_images_over_the_maximum_fails_before_loading(tiny_engine, tmp_path, no_load):
    _assert_clean_error(_invoke("generate", tiny_engine, PROMPT, "--num-images", 10000, "-o", tmp_path / "x.png"),
                        f"at most {MAX_NUM_IMAGES}")


# --- guidance_scale: a finite real number ---------------------------------------------------------------


@pytest.mark.parametrize("guidance", ["2", None, True, float("inf"), float("nan"), -np.inf, [1.5], 1e39])
def test_guidance_scale_must_be_a_finite_number(idle, guidance):
    """1e39 is finite, but not in float32, where guidance is applied."""
    with pytest.raises(InputError, match=r"guidance_scale=.* must be a finite number"):
        idle(PROMPT, guidance_scale=guidance, seed=0)


def test_numpy_guidance_scale(runs):
    pipe, _ = runs
    expected = pipe(PROMPT, num_inference_steps=1, guidance_scale=1.5, seed=2, output="np")
    got = pipe(PROMPT, num_inference_steps=1, guidance_scale=np.float32(1.5), seed=2, output="np")
    np.testing.assert_array_equal(got, expected)


def test_cli_infinite_guidance_fails_before_loading(tiny_engine, tmp_path, no_load):
    _assert_clean_error(_invoke("generate", tiny_engine, PROMPT, "--guidance", "inf", "-o", tmp_path / "x.png"),
                        "guidance_scale=inf must be a finite number")
    assert not (tmp_path / "x.png").exists()


# --- prompts: text that is valid UTF-8 ------------------------------------------------------------------


@pytest.mark.parametrize("prompt, negative_prompt", [("a\udcffb", None), (PROMPT, "\udc80blurry")])
def test_prompt_that_is_not_utf8_text(idle, prompt, negative_prompt):
    """A command-line argument in another encoding reaches Python as lone surrogates (surrogateescape);
    the tokenizer fails on them with a bare TypeError."""
    with pytest.raises(InputError, match="is not valid UTF-8 text"):
        idle(prompt, negative_prompt=negative_prompt, guidance_scale=1.5, seed=0)
    with pytest.raises(InputError, match="is not valid UTF-8 text"):
        idle.encode_prompt(prompt if negative_prompt is None else negative_prompt)


def test_encode_prompt_takes_a_string(idle):
    with pytest.raises(InputError, match="must be a string"):
        idle.encode_prompt(["a", "b"])


def test_cli_prompt_that_is_not_utf8_text(tiny_engine, tmp_path, no_load):
    # what click hands over for the bytes b"fox \xff" in sys.argv on Linux (surrogateescape)
    _assert_clean_error(_invoke("generate", tiny_engine, "fox \udcff", "-o", tmp_path / "x.png"),
                        "prompt is not valid UTF-8 text")


# --- latents and step_noise -----------------------------------------------------------------------------


@pytest.mark.parametrize("latents", [np.full(LATENT_SHAPE, "x"), np.zeros(LATENT_SHAPE, complex),
                                     np.zeros(LATENT_SHAPE, bool), "noise", {"a": 1}])
def test_latents_must_be_real_numbers(idle, latents):
    with pytest.raises(InputError, match="latents must be an array of real numbers"):
        idle(PROMPT, num_inference_steps=1, latents=latents)


def test_step_noise_must_be_a_list_of_arrays(idle):
    latents, step_noise = _draws(4)
    for wrong in (np.stack(step_noise), iter(step_noise), 5):
        with pytest.raises(InputError, match="step_noise must be a list"):
            idle(PROMPT, num_inference_steps=4, latents=latents, step_noise=wrong)
    with pytest.raises(InputError, match=r"step_noise\[1\] must be an array of real numbers"):
        idle(PROMPT, num_inference_steps=4, latents=latents, step_noise=[step_noise[0], "x", step_noise[2]])


def test_nan_latents_are_refused(idle):
    latents, step_noise = _draws(2)
    latents[0, 1, 2, 3] = np.nan
    with pytest.raises(InputError, match=r"latents hold NaN or inf \(1 of 1024 values\)"):
        idle(PROMPT, num_inference_steps=2, latents=latents, step_noise=step_noise)


def test_inf_step_noise_is_refused(idle):
    latents, step_noise = _draws(3)
    step_noise[1][0, 0, 0, 0] = np.inf
    with pytest.raises(InputError, match=r"step_noise\[1\] hold NaN or inf"):
        idle(PROMPT, num_inference_steps=3, latents=latents, step_noise=step_noise)
    # float64 beyond float32's range turns into inf when cast: refused too
    with pytest.raises(InputError, match="latents hold NaN or inf"):
        idle(PROMPT, num_inference_steps=3, latents=np.full(LATENT_SHAPE, 1e300), step_noise=step_noise)


# --- non-finite component outputs are errors, never images ----------------------------------------------


def _poison(pipe, monkeypatch, component, output):
    session = pipe.sessions[component]
    original = session.run
    monkeypatch.setattr(session, "run", lambda feeds: {output: np.full_like(original(feeds)[output], np.nan)})


def test_nan_from_the_unet_is_an_error(tiny_engine, monkeypatch):
    pipe = Pipeline.load(tiny_engine)
    _poison(pipe, monkeypatch, "unet", "noise_pred")
    with pytest.raises(GenerationError, match=r"The UNet \(fp32\) returned NaN/inf at step 1 of 2.*lcmrt build"):
        pipe(PROMPT, num_inference_steps=2, seed=0)


def test_nan_from_an_fp16_unet_names_the_fp32_fix(tiny_engine, monkeypatch):
    pipe = Pipeline.load(tiny_engine)
    monkeypatch.setattr(pipe.sessions["unet"], "precision", "fp16")
    _poison(pipe, monkeypatch, "unet", "noise_pred")
    with pytest.raises(GenerationError, match=r"UNet \(fp16\) returned NaN/inf.*precision='fp32'.*--precision fp32"):
        pipe(PROMPT, num_inference_steps=2, seed=0, output="latent")


def test_nan_from_a_device_loop_is_an_error(tiny_engine, monkeypatch):
    """Backends that run the loop on the device (TensorRT's CUDA graph) return only the final latents."""
    pipe = Pipeline.load(tiny_engine)
    loop = lambda sampler, x, noise, conditioning, guidance, timings: np.full_like(x, np.nan)  # noqa: E731
    monkeypatch.setattr(pipe.sessions["unet"], "denoise_loop", lambda batch: loop)
    with pytest.raises(GenerationError, match=r"The UNet \(fp32\) returned NaN/inf in its denoising loop"):
        pipe(PROMPT, num_inference_steps=3, seed=0)


def test_nan_from_an_fp32_vae_is_an_error(tiny_engine, monkeypatch):
    pipe = Pipeline.load(tiny_engine)
    _poison(pipe, monkeypatch, "vae_decoder", "image")
    with pytest.raises(GenerationError, match=r"The VAE decoder \(fp32\) returned NaN/inf"):
        pipe(PROMPT, num_inference_steps=1, seed=0, output="np")
    assert "vae_decoder_fp32" not in pipe.sessions  # no fallback from fp32 to the same fp32 graph


def test_nan_from_the_text_encoder_is_an_error_and_not_cached(tiny_engine, monkeypatch):
    pipe = Pipeline.load(tiny_engine)
    _poison(pipe, monkeypatch, "text_encoder", "last_hidden_state")
    with pytest.raises(GenerationError, match=r"The text encoder \(fp32\) returned NaN/inf"):
        pipe(PROMPT, num_inference_steps=1, seed=0)
    monkeypatch.undo()
    assert np.isfinite(pipe.encode_prompt(PROMPT)["encoder_hidden_states"]).all()


def test_to_pil_refuses_nan():
    with pytest.raises(InputError, match="NaN or inf"):
        to_pil(np.full((1, 8, 8, 3), np.nan, np.float32))


def test_cli_writes_no_png_for_a_nan_image(tiny_engine, tmp_path, monkeypatch):
    load = Pipeline.load

    def poisoned(*args, **kwargs):
        pipe = load(*args, **kwargs)
        _poison(pipe, monkeypatch, "unet", "noise_pred")
        return pipe

    monkeypatch.setattr(Pipeline, "load", poisoned)
    out = tmp_path / "fox.png"
    _assert_clean_error(_invoke("generate", tiny_engine, PROMPT, "--steps", 2, "-o", out), "NaN/inf", "UNet")
    assert list(tmp_path.iterdir()) == []


# --- adapters -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refit_pipe(tiny_refit_engine):
    return Pipeline.load(tiny_refit_engine)


@pytest.mark.parametrize("adapters, message", [
    (None, "a dict"), ([("style", 0.5)], "a dict"), ("style", "a dict"),
    ({1: 0.5}, "names must be strings"), ({"style": "0.5"}, "weights must be finite numbers"),
])
def test_set_adapters_types(refit_pipe, monkeypatch, adapters, message):
    before = refit_pipe.adapters
    for session in refit_pipe.sessions.values():
        monkeypatch.setattr(session, "refit", lambda weights: pytest.fail("refit ran"))
    with pytest.raises(AdapterError, match=message):
        refit_pipe.set_adapters(adapters)
    assert refit_pipe.adapters == before


@pytest.mark.parametrize("adapters", [[("style", 0.5)], "style", {1: 0.5}])
def test_load_adapters_types_before_reading_the_folder(tmp_path, adapters):
    with pytest.raises(AdapterError, match="adapters must be a dict|names must be strings"):
        Pipeline.load(tmp_path / "no-folder-here", adapters=adapters)


@pytest.mark.parametrize("arg, message", [
    ("style:nan", "finite"), ("style:inf", "finite"), (":0.8", "expected NAME:WEIGHT"), ("style:x", "NAME:WEIGHT"),
])
def test_cli_bad_adapter_fails_before_loading(tiny_refit_engine, tmp_path, no_load, arg, message):
    _assert_clean_error(_invoke("generate", tiny_refit_engine, PROMPT, "--adapter", arg, "-o", tmp_path / "x.png"),
                        message)


def test_cli_adapter_given_twice_fails_before_loading(tiny_refit_engine, tmp_path, no_load):
    _assert_clean_error(_invoke("generate", tiny_refit_engine, PROMPT, "--adapter", "style:0.5", "--adapter",
                                "style:0.8", "-o", tmp_path / "x.png"), "given twice")


# --- the output path of `lcmrt generate` ----------------------------------------------------------------


def test_cli_output_under_a_file_fails_before_loading(tiny_engine, tmp_path, no_load):
    (tmp_path / "notes.txt").write_text("not a folder")
    _assert_clean_error(_invoke("generate", tiny_engine, PROMPT, "-o", tmp_path / "notes.txt" / "dir" / "x.png"),
                        "notes.txt is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: the check would pass and create the folder")
def test_cli_output_in_a_missing_root_folder_fails_before_loading(tiny_engine, no_load):
    _assert_clean_error(_invoke("generate", tiny_engine, PROMPT, "-o", "/nonexistent/dir/x.png"), "not writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_cli_output_in_a_read_only_folder_fails_before_loading(tiny_engine, tmp_path, no_load):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    _assert_clean_error(_invoke("generate", tiny_engine, PROMPT, "-o", folder / "x.png"), "not writable")


def test_cli_output_that_is_a_folder_fails_before_loading(tiny_engine, tmp_path, no_load):
    _assert_clean_error(_invoke("generate", tiny_engine, PROMPT, "-o", tmp_path), "is a folder")
    # several images: each numbered name is checked
    (tmp_path / "fox-1.png").mkdir()
    _assert_clean_error(_invoke("generate", tiny_engine, PROMPT, "--num-images", 2, "-o", tmp_path / "fox.png"),
                        "fox-1.png is a folder")


@pytest.mark.parametrize("name", ["fox.jpg", "fox", "fox.png.txt"])
def test_cli_output_must_be_named_png(tiny_engine, tmp_path, no_load, name):
    _assert_clean_error(_invoke("generate", tiny_engine, PROMPT, "-o", tmp_path / name), "name it *.png")


def test_cli_output_folders_are_still_created(tiny_engine, tmp_path):
    out = tmp_path / "a" / "b" / "fox.PNG"
    result = _invoke("generate", tiny_engine, PROMPT, "--steps", 1, "--seed", 0, "-o", out)
    assert result.exit_code == 0, result.output
    assert out.is_file()
