"""`lcmrt build --vae-decoder PATH`: a tiny VAE decoder (diffusers' AutoencoderTiny, TAESD's architecture) as
the engine folder's vae_decoder, its parity with diffusers, the random TAESD generator, and bad paths."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lcmrt import Pipeline
from lcmrt.backends.onnxruntime import OnnxRuntimeBackend
from lcmrt.cli import cli
from lcmrt.errors import InputError
from lcmrt.export.random_model import SD15_FULL, SD15_TINY, build_taesd, write_random_model
from lcmrt.manifest import load_manifest

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("diffusers.schedulers.scheduling_lcm")


from tiny_engines import TINY_HEIGHT, TINY_WIDTH, build_tiny_engine, diffusers_image  # noqa: E402
LATENT_SHAPE = (1, 4, TINY_HEIGHT // 8, TINY_WIDTH // 8)  # [B, 4, H/8, W/8]
# Graph vs torch on the decoder alone (fp32 reordered sums, ~1e-6 measured) and the end-to-end [0, 1] image
# against diffusers (the same bound as tests/runtime/test_pipeline.py).
MAX_GRAPH_DIFF = 1e-4
MAX_IMAGE_DIFF = 2e-3
PROMPT = "a watercolor fox in the snow"


@pytest.fixture(scope="module")
def taesd(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("taesd") / "taesd"
    build_taesd(SD15_TINY, seed=0).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_vae_engine(tiny_model, taesd, tmp_path_factory) -> Path:
    """The tiny model with only the LCM-LoRA, guidance none, decoding with the random TAESD."""
    out = tmp_path_factory.mktemp("engines") / "tiny-taesd"
    return build_tiny_engine(tiny_model, out, guidance_mode="none", style_weight=None, vae_decoder=taesd)


def _autoencoder_tiny(path):
    return diffusers.AutoencoderTiny.from_pretrained(path, torch_dtype=torch.float32).eval()


def test_manifest_records_the_tiny_decoder(tiny_vae_engine, taesd, tiny_engine):
    manifest = load_manifest(tiny_vae_engine)
    decoder = manifest["components"]["vae_decoder"]
    assert decoder["source"] == f"AutoencoderTiny:{taesd.resolve()}"
    assert load_manifest(tiny_engine)["components"]["vae_decoder"]["source"] == "AutoencoderKL"
    # same I/O contract as the full VAE's decoder graph
    assert decoder["inputs"] == [{"name": "latents", "shape": list(LATENT_SHAPE), "dtype": "float32"}]
    assert decoder["outputs"] == [{"name": "image", "shape": [1, 3, TINY_HEIGHT, TINY_WIDTH], "dtype": "float32"}]
    assert decoder["validation"]["max_abs_diff"] <= decoder["validation"]["tolerance"]
    # the encoder (img2img) and the latent scaling stay the model's own
    assert manifest["vae"]["scaling_factor"] == 0.18215
    assert "source" not in manifest["components"]["vae_encoder"]


def test_decoder_graph_matches_autoencoder_tiny(tiny_vae_engine, taesd):
    session = OnnxRuntimeBackend().load(tiny_vae_engine, load_manifest(tiny_vae_engine), "vae_decoder")
    # the sampler's latents: SD-scaled, std ~1; TAESD's scaling_factor is 1.0, so they go in as they are
    latents = np.random.default_rng(3).standard_normal(LATENT_SHAPE, dtype=np.float32) * 1.5
    got = session.run({"latents": latents})["image"]
    vae = _autoencoder_tiny(taesd)
    assert vae.config.scaling_factor == 1.0
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latents)).sample.numpy()
    diff = float(np.abs(got - expected).max())
    print(f"TAESD decoder graph vs diffusers AutoencoderTiny.decode: max abs diff {diff:.2e}")
    assert diff <= MAX_GRAPH_DIFF
    assert 0.1 < expected.std() and -1.5 < expected.mean() < 1.5  # a visible image in about [-1, 1]


def _reference(tiny_model, vae):
    from lcmrt.export.lora import LoraSpec, fuse_loras

    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_model["model"], torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    fuse_loras(ref, [LoraSpec(tiny_model["lcm_lora"], weight=1.0, name="lcm", role="lcm")])
    if vae is not None:
        ref.vae = vae
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_image_matches_diffusers_with_autoencoder_tiny(tiny_vae_engine, tiny_model, taesd, monkeypatch):
    steps = 4
    rng = np.random.default_rng(11)
    latents = rng.standard_normal(LATENT_SHAPE, dtype=np.float32)
    step_noise = [rng.standard_normal(LATENT_SHAPE, dtype=np.float32) for _ in range(steps - 1)]
    image = Pipeline.load(tiny_vae_engine)(PROMPT, num_inference_steps=steps, latents=latents,
                                            step_noise=step_noise, output="np")
    expected = diffusers_image(_reference(tiny_model, _autoencoder_tiny(taesd)), monkeypatch, PROMPT, latents, step_noise,
                                steps)
    diff = float(np.abs(image - expected).max())
    print(f"4 steps, TAESD decoder: max abs diff vs diffusers (pipe.vae = AutoencoderTiny) {diff:.2e}")
    assert image.shape == expected.shape == (1, TINY_HEIGHT, TINY_WIDTH, 3)
    assert diff <= MAX_IMAGE_DIFF
    # the test could fail: the model's own VAE gives another image from the same latents
    full_vae = diffusers_image(_reference(tiny_model, None), monkeypatch, PROMPT, latents, step_noise, steps)
    assert np.abs(image - full_vae).max() > 50 * MAX_IMAGE_DIFF


def test_random_model_with_taesd_keeps_the_model_bytes(tiny_model, tmp_path):
    paths = write_random_model(tmp_path / "m", size="tiny", seed=0, taesd=True)
    assert paths["taesd"] == tmp_path / "m" / "taesd"
    assert sorted(p.name for p in paths["taesd"].iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((paths["taesd"] / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    def files(root, skip=()):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.relative_to(root).parts[0] not in skip}

    assert files(paths["model"].parent, skip=("taesd",)) == files(tiny_model["model"].parent)
    again = build_taesd(SD15_TINY, seed=0)
    other = build_taesd(SD15_TINY, seed=1)
    weights = _autoencoder_tiny(paths["taesd"]).state_dict()
    for name, value in again.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert not torch.equal(other.decoder.layers[0].weight, again.decoder.layers[0].weight)


def test_full_taesd_is_the_real_architecture():
    with torch.device("meta"):
        vae = diffusers.AutoencoderTiny(**SD15_FULL.taesd)
    assert sum(p.numel() for p in vae.decoder.parameters()) == 1_222_531  # TAESD's decoder: 1.22M
    assert vae.config.scaling_factor == 1.0 and vae.config.latent_channels == 4


def _build_args(tiny_model, out, vae_decoder):
    return ["build", str(tiny_model["model"]), "--lcm-lora", str(tiny_model["lcm_lora"]), "--out", str(out),
            "--height", "64", "--width", "64", "--vae-decoder", str(vae_decoder), "--no-ort-cpu-graphs", "--quiet"]


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a folder with a config.json"),
    ("autoencoder_kl", "_class_name 'AutoencoderKL', not 'AutoencoderTiny'"),
    ("no_weights", "has no diffusion_pytorch_model.safetensors"),
    ("pickled", "pass --allow-pickle"),
])
def test_bad_vae_decoder_path(tiny_model, taesd, tmp_path, case, message):
    bad = tmp_path / "bad"
    if case == "autoencoder_kl":
        bad = Path(tiny_model["model"]) / "vae"
    elif case in ("no_weights", "pickled"):
        bad.mkdir()
        (bad / "config.json").write_bytes((taesd / "config.json").read_bytes())
        if case == "pickled":
            (bad / "diffusion_pytorch_model.bin").write_bytes(b"")
    result = CliRunner().invoke(cli, _build_args(tiny_model, tmp_path / "out", bad))
    assert result.exit_code == 2, result.output
    assert message in result.output and "--vae-decoder takes a diffusers AutoencoderTiny folder" in result.output
    assert not (tmp_path / "out").exists()


def test_tiny_vae_for_other_latents_is_refused(tiny_model, tmp_path):
    path = tmp_path / "taesd16"
    diffusers.AutoencoderTiny(latent_channels=16, encoder_block_out_channels=(8,) * 4,
                              decoder_block_out_channels=(8,) * 4).save_pretrained(path)
    from lcmrt.engines.build import EngineRequest
    from lcmrt.export.build import BuildRequest, build_engine_folder
    from lcmrt.export.lora import LoraSpec

    request = BuildRequest(model=str(tiny_model["model"]), out=tmp_path / "out", height=64, width=64,
                           lcm_lora=LoraSpec(tiny_model["lcm_lora"], weight=1.0, name="lcm", role="lcm"),
                           vae_decoder=path, engines=EngineRequest(ort_cpu_graphs=False))
    with pytest.raises(InputError, match="16-channel latents, but sd15 makes 4-channel"):
        build_engine_folder(request)
    assert not (tmp_path / "out").exists()


def test_engines_only_refuses_vae_decoder(tiny_engine, taesd):
    result = CliRunner().invoke(cli, ["build", "--engines-only", str(tiny_engine), "--vae-decoder", str(taesd)])
    assert result.exit_code == 2 and "--vae-decoder" in result.output
