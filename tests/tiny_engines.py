"""Tiny engine folders for tests: the shapes, LoRA weights and cross-graph image tolerance the shared fixtures
use, and a builder."""


TINY_HEIGHT = TINY_WIDTH = 128
STYLE_WEIGHT = 0.8
# Max abs difference of the [0, 1] image between two fp32 runs of the same weights through different graphs
# (pre-optimized vs plain, refit inputs vs baked weights, static vs dynamic batch). ONNX Runtime fixes no
# summation order or FMA use; its kernels differ by CPU (AVX2 vs AVX-512, NCHWc blocks of 8 vs 16), so such
# runs are equal only up to float32 rounding. Measured on the tiny model, on AVX-512 and on an emulated AVX2
# CPU (qemu-x86_64 -cpu Haswell): <= 1.2e-6 between such graphs and between ONNX Runtime's optimization
# levels, <= 1.4e-6 against torch; a wrong weight or adapter moves the image by > 1e-3.
CROSS_GRAPH_ATOL = 1e-5
# QEMU's x86 emulation (TCG) has AVX2 and FMA but no AVX-512 or VNNI: ONNX Runtime and OpenVINO take their AVX2
# kernels (they read CPUID, which QEMU emulates; /proc/cpuinfo still shows the host's flags).
EMULATED_AVX2_CPU = "Haswell"


def run_on_emulated_avx2(code: str, *args: str) -> str:
    """Run Python `code` with `args` on an emulated AVX2-only x86-64 CPU (qemu-user); return its stdout. Skips
    where qemu-x86_64 cannot run, except in CI (.ci/run installs it: the check must not vanish silently there)."""
    import os
    import platform
    import shutil
    import subprocess
    import sys

    import pytest

    if platform.machine() != "x86_64":
        pytest.skip("emulates an x86-64 CPU under qemu-user, on x86-64 hosts")
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        if os.environ.get("CI") == "true":
            pytest.fail("qemu-x86_64 is missing (apt-get install qemu-user)")
        pytest.skip("needs qemu-x86_64 to emulate an AVX2-only CPU (apt-get install qemu-user)")
    run = subprocess.run([qemu, "-cpu", EMULATED_AVX2_CPU, sys.executable, "-c", code, *args], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def engine_with_variant(tiny_engine, folder, write):
    """A copy of `tiny_engine` at `folder` with `write(folder, manifest)` applied to its manifest, which is saved."""
    import shutil

    from lcmrt.manifest import load_manifest, write_manifest

    shutil.copytree(tiny_engine, folder)
    manifest = load_manifest(folder)
    write(folder, manifest)
    write_manifest(folder, manifest)
    return folder


def peft_copy(tiny_model, tmp_path_factory, name):
    """The style LoRA (diffusers/peft keys, UNet and text encoder) under another file name."""
    import shutil

    path = tmp_path_factory.mktemp("loras") / f"{name}.safetensors"
    shutil.copyfile(tiny_model["style_lora"], path)
    return path


def build_tiny_engine(tiny_model, out, guidance_mode="cfg", style_weight=STYLE_WEIGHT, lcm=True, **overrides):
    """Build an engine folder from the tiny model: LCM-LoRA at 1.0 (unless not `lcm`) plus the style LoRA. The
    CPU backend choice is left out unless `engines` asks for it: on tiny graphs it is a coin toss, and tests
    loading with backend "auto" expect ONNX Runtime."""
    from lcmrt.engines.build import EngineRequest
    from lcmrt.export.build import BuildRequest, build_engine_folder
    from lcmrt.export.lora import LoraSpec

    loras = [] if style_weight is None else [LoraSpec(tiny_model["style_lora"], weight=style_weight, name="style")]
    request = BuildRequest(model=str(tiny_model["model"]), out=out,
                           lcm_lora=LoraSpec(tiny_model["lcm_lora"], weight=1.0, name="lcm", role="lcm") if lcm else None,
                           loras=loras, height=TINY_HEIGHT, width=TINY_WIDTH, guidance_mode=guidance_mode,
                           **{"engines": EngineRequest(choose_backends=False), **overrides})
    build_engine_folder(request)
    return out


def diffusers_image(reference, monkeypatch, prompt, latents, step_noise, steps, guidance=1.0, negative_prompt=None,
                    **call):
    """diffusers' image for explicit latents, with LCMScheduler's per-step noise replaced by `step_noise`;
    `call`: the pipeline's other arguments (SDXL's original_size, target_size, ...)."""
    import torch
    from diffusers.schedulers import scheduling_lcm

    draws = iter(step_noise)

    def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
        noise = next(draws)
        assert tuple(shape) == noise.shape
        return torch.from_numpy(noise.copy()).to(dtype=dtype)

    monkeypatch.setattr(scheduling_lcm, "randn_tensor", randn_tensor)
    with torch.no_grad():
        if negative_prompt is not None:  # diffusers' LCM pipeline takes none
            call["negative_prompt"] = negative_prompt
        image = reference(prompt, num_inference_steps=steps, guidance_scale=guidance,
                          latents=torch.from_numpy(latents.copy()), output_type="np", **call).images
    assert next(draws, None) is None, "diffusers drew fewer noise arrays than steps - 1"
    monkeypatch.undo()
    return image


def diff_to_diffusers(pipe, reference, monkeypatch, prompt, latents, step_noise, steps, guidance=1.0,
                      negative_prompt=None, **call) -> float:
    """Max abs difference of the [0, 1] images of lcmrt's `pipe` and diffusers' `reference` for the same prompt,
    latents and per-step noise (`call`: other arguments both take)."""
    import numpy as np

    expected = diffusers_image(reference, monkeypatch, prompt, latents, step_noise, steps, guidance, negative_prompt,
                               **dict(call))
    extra = {} if negative_prompt is None else {"negative_prompt": negative_prompt}
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=latents, step_noise=step_noise,
                 output="np", **extra, **call)
    assert image.shape == expected.shape == (latents.shape[0], 8 * latents.shape[2], 8 * latents.shape[3], 3)
    assert image.dtype == np.float32
    return float(np.abs(image - expected).max())


def assert_swaps_match(pipe, reference, weights, atol, **call):
    """Swap the style adapter to each of `weights` on both pipelines: the images agree within `atol` after each
    swap and each swap moves the image (so a refit that never arrives fails). Returns the first image."""
    import numpy as np

    first = pipe(**call)
    np.testing.assert_allclose(first, reference(**call), atol=atol, rtol=0)
    for weight in weights:
        pipe.set_adapters({"style": weight})
        reference.set_adapters({"style": weight})
        got = pipe(**call)
        np.testing.assert_allclose(got, reference(**call), atol=atol, rtol=0)
        assert np.abs(got - first).max() > 1e-3
    return first


# --- image edits (img2img, inpainting) against diffusers ----------------------------------------------------

def edit_image(width=TINY_WIDTH, height=TINY_HEIGHT, seed=0):
    """A smooth color gradient with some texture: an image whose latents are not noise."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rng = np.random.default_rng(seed)
    rgb = np.stack([x, y, 1 - (x + y) / 2], axis=-1) + 0.1 * rng.standard_normal((height, width, 3))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def edit_mask(width=TINY_WIDTH, height=TINY_HEIGHT):
    """White (repaint) disc in the middle, black (keep) around it."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    inside = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2
    return Image.fromarray((inside * 255).astype(np.uint8), mode="L")


def edit_draws(count: int, seed: int, num_images: int = 1, latent=(4, TINY_HEIGHT // 8, TINY_WIDTH // 8)) -> list:
    """`count` seeded standard-normal latent arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.standard_normal((num_images, *latent), dtype=np.float32) for _ in range(count)]


def diffusers_edit(reference, monkeypatch, arrays: list, **call):
    """diffusers' image with every standard-normal draw (VAE sample, noise, step noise) taken from `arrays`."""
    import importlib

    import torch

    modules = [importlib.import_module(f"diffusers.{name}") for name in (
        "models.autoencoders.vae", "schedulers.scheduling_lcm",
        "pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
        "pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
        "pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
        "pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint")]

    queue = iter(arrays)

    def randn_tensor(shape, generator=None, device=None, dtype=None, **kwargs):
        value = next(queue)
        assert tuple(shape) == value.shape, (shape, value.shape)
        return torch.from_numpy(value.copy()).to(dtype=dtype)

    for module in modules:
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
    with torch.no_grad():
        image = reference(output_type="np", **call).images
    monkeypatch.undo()
    assert next(queue, None) is None, "diffusers drew fewer arrays than given"
    return image


def lcmrt_arrays(names: tuple[str, ...], arrays: list) -> dict:
    """The same arrays as lcmrt's keyword arguments: the named draws, then the step noise."""
    return {**dict(zip(names, arrays)), "step_noise": arrays[len(names):]}
