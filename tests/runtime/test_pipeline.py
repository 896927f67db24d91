"""lcmrt/pipeline.py on the tiny engine folder: image parity with diffusers, seeds, batching, outputs, the
prompt cache, no torch at run time, and every error a request or a damaged folder can raise."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from PIL import Image

from lcmrt import Pipeline
from lcmrt.errors import EngineFolderError, GenerationError, InputError
from lcmrt.images import to_pil
from lcmrt.manifest import MANIFEST_NAME
from lcmrt.pipeline import MAX_STEPS, PROMPT_CACHE_SIZE


from tiny_engines import (CROSS_GRAPH_ATOL, STYLE_WEIGHT, TINY_HEIGHT, TINY_WIDTH, build_tiny_engine,  # noqa: E402
                          diff_to_diffusers)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("diffusers.schedulers.scheduling_lcm")

# End-to-end bound on the [0, 1] image against diffusers with the same weights, latents and noise (the runtime
# issue's contract). fp32 ONNX Runtime against fp32 torch measures ~1e-6 on the tiny model.
MAX_ABS_DIFF = 2e-3
LATENT_SHAPE = (1, 4, TINY_HEIGHT // 8, TINY_WIDTH // 8)  # [B, 4, H/8, W/8]
PROMPT = "a watercolor fox in the snow"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def pipe(tiny_engine):
    return Pipeline.load(tiny_engine)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """diffusers' StableDiffusionPipeline + LCMScheduler, fp32, with the engine's LoRAs fused the same way."""
    from lcmrt.export.lora import LoraSpec, fuse_loras

    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_model["model"], torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    fuse_loras(ref, [LoraSpec(tiny_model["lcm_lora"], weight=1.0, name="lcm", role="lcm"),
                     LoraSpec(tiny_model["style_lora"], weight=STYLE_WEIGHT, name="style")])
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def _draws(seed, steps, num_images=1):
    """Start latents and one noise array per step but the last, as numpy float32."""
    rng = np.random.default_rng(seed)
    shape = (num_images, *LATENT_SHAPE[1:])
    return rng.standard_normal(shape, dtype=np.float32), [rng.standard_normal(shape, dtype=np.float32)
                                                          for _ in range(steps - 1)]


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("guidance, negative_prompt", [(1.0, None), (1.5, NEGATIVE)])
def test_image_matches_diffusers(pipe, reference, monkeypatch, steps, guidance, negative_prompt):
    latents, step_noise = _draws(steps, steps)
    diff = diff_to_diffusers(pipe, reference, monkeypatch, PROMPT, latents, step_noise, steps, guidance, negative_prompt)
    print(f"steps={steps} guidance={guidance}: max abs diff vs diffusers {diff:.2e}")
    assert diff <= MAX_ABS_DIFF


def test_parity_inputs_change_the_image(pipe):
    """The parity test could fail: guidance, negative prompt and prompt each move the image well past the bound
    (measured 0.02-0.06 on the tiny model, whose images stay near mid-gray)."""
    latents, step_noise = _draws(0, 4)

    def run(prompt, guidance=1.0, negative_prompt=None):
        return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=4, guidance_scale=guidance,
                    latents=latents, step_noise=step_noise, output="np")

    base = run(PROMPT)
    for other in (run(PROMPT, 1.5), run(PROMPT, 1.5, NEGATIVE), run("a red bicycle")):
        assert np.abs(base - other).max() > 5 * MAX_ABS_DIFF
    assert np.abs(run(PROMPT, 1.5) - run(PROMPT, 1.5, NEGATIVE)).max() > 5 * MAX_ABS_DIFF


def test_same_seed_same_image_and_different_seeds_differ(pipe):
    a = pipe(PROMPT, num_inference_steps=2, seed=7, output="np")
    assert pipe.last_seed == 7
    b = pipe(PROMPT, num_inference_steps=2, seed=7, output="np")
    c = pipe(PROMPT, num_inference_steps=2, seed=8, output="np")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.05


def test_random_seed_is_recorded_and_reproduces_the_image(pipe):
    a = pipe(PROMPT, num_inference_steps=2, output="np")
    seed = pipe.last_seed
    assert isinstance(seed, int) and seed >= 0
    b = pipe(PROMPT, num_inference_steps=2, output="np")
    assert pipe.last_seed != seed  # 32 random bits: equal by chance once in 4e9 runs
    np.testing.assert_array_equal(pipe(PROMPT, num_inference_steps=2, seed=seed, output="np"), a)
    assert np.abs(a - b).max() > 0.05


def test_num_images_beyond_the_folder_batch(pipe):
    """Batch-1 folder, two images: run in two chunks; each image is the one its own latents give alone."""
    assert pipe.shapes.batch == 1
    latents, step_noise = _draws(3, 4, num_images=2)
    two = pipe(PROMPT, num_inference_steps=4, num_images=2, latents=latents, step_noise=step_noise, output="np")
    assert two.shape == (2, TINY_HEIGHT, TINY_WIDTH, 3)
    assert np.abs(two[0] - two[1]).max() > 0.05
    for i in range(2):
        one = pipe(PROMPT, num_inference_steps=4, latents=latents[i:i + 1],
                   step_noise=[a[i:i + 1] for a in step_noise], output="np")
        np.testing.assert_array_equal(one[0], two[i])
    seeded = pipe(PROMPT, num_inference_steps=2, seed=1, num_images=2, output="np")
    assert seeded.shape[0] == 2 and np.abs(seeded[0] - seeded[1]).max() > 0.05
    assert len(pipe.last_timings["unet_steps"]) == 2 * 2  # two chunks of two steps


def test_output_kinds(pipe):
    latents, step_noise = _draws(5, 2)
    kwargs = dict(num_inference_steps=2, latents=latents, step_noise=step_noise)
    latent = pipe(PROMPT, output="latent", **kwargs)
    assert latent.shape == LATENT_SHAPE and latent.dtype == np.float32
    image = pipe(PROMPT, output="np", **kwargs)
    assert 0 <= image.min() and image.max() <= 1
    pils = pipe(PROMPT, output="pil", **kwargs)
    assert isinstance(pils, list) and len(pils) == 1
    assert isinstance(pils[0], Image.Image) and pils[0].size == (TINY_WIDTH, TINY_HEIGHT) and pils[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pils[0]), np.asarray(to_pil(image)[0]))
    assert set(pipe.last_timings) == {"text_encoder", "unet_steps", "vae_decode", "total"}
    assert len(pipe.last_timings["unet_steps"]) == 2
    with pytest.raises(InputError, match="output='tensor' is not one of pil, np, latent"):
        pipe(PROMPT, output="tensor")


class _CountingSession:
    def __init__(self, session):
        self.session, self.prompts, self.precision = session, [], session.precision

    def run(self, feeds):
        self.prompts.append(feeds["input_ids"].copy())
        return self.session.run(feeds)


@pytest.fixture
def counted(tiny_engine):
    """A fresh pipeline (empty cache) whose text encoder counts its runs."""
    fresh = Pipeline.load(tiny_engine)
    fresh.sessions["text_encoder"] = _CountingSession(fresh.sessions["text_encoder"])
    return fresh, fresh.sessions["text_encoder"].prompts


def test_prompt_embeddings_are_cached(counted):
    fresh, runs = counted
    first = fresh(PROMPT, num_inference_steps=1, seed=0, output="np")
    assert len(runs) == 1
    again = fresh(PROMPT, num_inference_steps=1, seed=0, output="np")
    assert len(runs) == 1
    np.testing.assert_array_equal(first, again)
    fresh(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=1, guidance_scale=1.5, seed=0, output="np")
    assert len(runs) == 2  # only the negative prompt is new
    fresh(PROMPT, num_inference_steps=1, guidance_scale=1.5, seed=0, output="np")
    assert len(runs) == 3  # the empty negative prompt


def test_prompt_cache_is_bounded_lru(counted):
    fresh, runs = counted
    prompts = [f"prompt number {i}" for i in range(PROMPT_CACHE_SIZE + 1)]
    for p in prompts[:PROMPT_CACHE_SIZE]:
        fresh.encode_prompt(p)
    fresh.encode_prompt(prompts[0])  # most recently used now; prompts[1] is the oldest
    assert len(runs) == PROMPT_CACHE_SIZE
    fresh.encode_prompt(prompts[-1])
    assert len(fresh._prompt_cache) == PROMPT_CACHE_SIZE
    fresh.encode_prompt(prompts[0])
    assert len(runs) == PROMPT_CACHE_SIZE + 1  # still cached
    fresh.encode_prompt(prompts[1])
    assert len(runs) == PROMPT_CACHE_SIZE + 2  # evicted, encoded again


def test_long_prompt_is_truncated_with_a_warning(counted, reference):
    fresh, runs = counted
    prompt = " ".join(["fox"] * 60 + ["dog", "horse"] * 20)
    with pytest.warns(UserWarning, match=r"tokens long but the text encoder takes 77: \d+ tokens were dropped"):
        image = fresh(prompt, num_inference_steps=1, seed=0, output="np")
    assert image.shape == (1, TINY_HEIGHT, TINY_WIDTH, 3)
    expected = reference.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert runs[0].tolist() == [expected]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh("a short prompt", num_inference_steps=1, seed=0, output="np")


def test_generation_imports_no_torch(tiny_engine):
    script = textwrap.dedent(f"""
        import sys
        import lcmrt
        from lcmrt.images import save_png
        pipe = lcmrt.Pipeline.load({str(tiny_engine)!r})
        images = pipe("a fox", num_inference_steps=2, seed=0)
        pipe("a fox", negative_prompt="dog", num_inference_steps=2, guidance_scale=1.5, seed=0, num_images=2)
        save_png(images[0], {str(tiny_engine)!r} + "-no-torch.png", {{"prompt": "a fox"}})
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        print("heavy:", heavy)
        sys.exit(1 if heavy else 0)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "heavy: []" in done.stdout


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.fixture
def engine_copy(tiny_engine, tmp_path):
    """A private copy of the tiny engine folder, to damage."""
    return shutil.copytree(tiny_engine, tmp_path / "engine")


def test_not_a_folder(tmp_path, engine_copy):
    with pytest.raises(EngineFolderError, match="is not a folder.*lcmrt build"):
        Pipeline.load(tmp_path / "missing")
    with pytest.raises(EngineFolderError, match="is not a folder"):
        Pipeline.load(engine_copy / MANIFEST_NAME)


def test_folder_without_manifest(tmp_path):
    (tmp_path / "unet.onnx").write_bytes(b"")
    with pytest.raises(EngineFolderError, match=r"not an lcmrt engine folder: it has no manifest\.json\. Build one"):
        Pipeline.load(tmp_path)


def test_manifest_from_a_newer_format(engine_copy):
    manifest = json.loads((engine_copy / MANIFEST_NAME).read_text())
    manifest["format_version"] = 999
    (engine_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(EngineFolderError, match=r"format 999.*reads format 2 at most\. Upgrade lcmrt.*rebuild"):
        Pipeline.load(engine_copy)


def test_unreadable_manifest(engine_copy):
    (engine_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(EngineFolderError, match="is not valid JSON.*Rebuild"):
        Pipeline.load(engine_copy)


@pytest.fixture(params=["pre-optimized", "plain"])
def graph_suffix(request, monkeypatch):
    """The files the CPU backend reads: the build's pre-optimized graphs on this CPU, the plain ones on another."""
    if request.param == "plain":
        import lcmrt.backends.onnxruntime as ort_backend

        monkeypatch.setattr(ort_backend, "cpu_graph_key", lambda: {"onnxruntime": "other"})
        return ".onnx"
    return ".ort-cpu.onnx"


@pytest.mark.parametrize("component", ["text_encoder", "unet", "vae_decoder"])
def test_missing_graph(engine_copy, graph_suffix, component):
    graph = component + graph_suffix
    (engine_copy / graph).unlink()
    with pytest.raises(EngineFolderError, match=rf"{graph} is missing from the engine folder\. Rebuild"):
        Pipeline.load(engine_copy)


def test_modified_graph(engine_copy, graph_suffix):
    graph = "unet" + graph_suffix
    path = engine_copy / graph
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(EngineFolderError, match=rf"{graph} does not match the hash recorded at build time.*Rebuild"):
        Pipeline.load(engine_copy)


def test_file_modified_after_a_verified_load_is_detected(engine_copy):
    """Loads skip re-hashing files verified before, but only while size and mtime are unchanged."""
    from lcmrt.manifest import VERIFIED_CACHE

    Pipeline.load(engine_copy)
    assert str((engine_copy / "unet.ort-cpu.onnx.data").resolve()) in json.loads(VERIFIED_CACHE.read_text())
    Pipeline.load(engine_copy)  # from the cache
    path = engine_copy / "unet.ort-cpu.onnx.data"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(EngineFolderError, match="does not match the hash recorded at build time"):
        Pipeline.load(engine_copy)


@pytest.mark.parametrize("steps", [0, -1, MAX_STEPS + 1, 4.0])
def test_steps_outside_range(pipe, steps):
    with pytest.raises(GenerationError, match=rf"num_inference_steps={steps!r} is outside 1\.\.50.*4 is the usual"):
        pipe(PROMPT, num_inference_steps=steps, seed=0)


def test_fifty_steps_run(pipe):
    assert pipe(PROMPT, num_inference_steps=MAX_STEPS, seed=0, output="latent").shape == LATENT_SHAPE


@pytest.fixture(scope="module")
def unguided_pipe(tiny_model, tmp_path_factory):
    """The tiny engine folder built with --guidance-mode none (UNet batch 1 only)."""
    return Pipeline.load(build_tiny_engine(tiny_model, tmp_path_factory.mktemp("engines") / "tiny-none",
                                           guidance_mode="none"))


def test_guidance_needs_the_unconditional_batch(unguided_pipe, pipe):
    assert not unguided_pipe.supports_guidance and pipe.supports_guidance
    with pytest.raises(GenerationError, match=r"guidance_scale=1\.5 needs the unconditional batch.*"
                                              r"guidance_scale <= 1, or rebuild with --guidance-mode cfg"):
        unguided_pipe(PROMPT, guidance_scale=1.5, seed=0)
    # guidance <= 1 runs, and equals the cfg folder's image: same weights, conditional batch only (up to
    # float32 rounding: a static-batch graph and a dynamic-batch one may run different kernels)
    latents, step_noise = _draws(9, 2)
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, latents=latents, step_noise=step_noise, output="np")
    np.testing.assert_allclose(unguided_pipe(PROMPT, **kwargs), pipe(PROMPT, **kwargs), rtol=0, atol=CROSS_GRAPH_ATOL)


def test_wrong_latents(pipe):
    needs = r"but this size needs \[{}, 4, 16, 16\]"
    with pytest.raises(GenerationError, match=r"latents has shape \[1, 4, 8, 8\], " + needs.format(1)):
        pipe(PROMPT, latents=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(GenerationError, match=r"latents has shape \[1, 4, 16, 16\], " + needs.format(2)):
        pipe(PROMPT, num_images=2, latents=np.zeros(LATENT_SHAPE, np.float32))


def test_wrong_step_noise(pipe):
    latents, step_noise = _draws(0, 4)
    with pytest.raises(GenerationError, match=r"step_noise has 2 arrays; 4 steps need 3 \(one per step but the last\)"):
        pipe(PROMPT, num_inference_steps=4, latents=latents, step_noise=step_noise[:2])
    with pytest.raises(GenerationError, match=r"step_noise has 3 arrays; 1 steps need 0"):
        pipe(PROMPT, num_inference_steps=1, latents=latents, step_noise=step_noise)
    bad = step_noise[:2] + [np.zeros((1, 4, 16, 8), np.float32)]
    with pytest.raises(GenerationError,
                       match=r"step_noise\[2\] has shape \[1, 4, 16, 8\], but this size needs \[1, 4, 16, 16\]"):
        pipe(PROMPT, num_inference_steps=4, latents=latents, step_noise=bad)


@pytest.mark.parametrize("num_images", [0, -1, 1.5])
def test_bad_num_images(pipe, num_images):
    with pytest.raises(InputError, match="must be a positive integer"):
        pipe(PROMPT, num_images=num_images)


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True, 1 << 64])
def test_bad_seed(pipe, seed):
    with pytest.raises(InputError, match=rf"seed={seed!r} must be an integer in \[0, 2\^64\), or None"):
        pipe(PROMPT, seed=seed)


def test_numpy_integer_seed(pipe):
    expected = pipe(PROMPT, num_inference_steps=1, seed=3, output="np")
    np.testing.assert_array_equal(pipe(PROMPT, num_inference_steps=1, seed=np.int64(3), output="np"), expected)
    assert type(pipe.last_seed) is int  # it goes into JSON metadata


@pytest.mark.parametrize("prompt, negative_prompt", [(None, None), (["a", "b"], None), (PROMPT, ["c"])])
def test_prompts_must_be_strings(pipe, prompt, negative_prompt):
    with pytest.raises(InputError, match="prompt and negative_prompt must be strings.*pass num_images"):
        pipe(prompt, negative_prompt=negative_prompt, guidance_scale=1.5)
