"""FP16 graph variants through the ONNX Runtime backend, and the fp32 fallback for a VAE that overflows."""
import shutil

import numpy as np
import pytest

import lcmrt
from lcmrt.engines.fp16 import convert_folder, psnr, record_variants


@pytest.fixture(scope="module")
def fp16_engine(tiny_engine, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp16") / "engine"
    shutil.copytree(tiny_engine, folder)
    record_variants(folder, convert_folder(folder, ("text_encoder", "unet", "vae_decoder")))
    return folder


def test_fp16_variants_are_loaded_and_close_to_fp32(tiny_engine, fp16_engine):
    fp32 = lcmrt.Pipeline.load(tiny_engine)
    fp16 = lcmrt.Pipeline.load(fp16_engine, backend="onnxruntime", precision="fp16")
    assert {name: s.precision for name, s in fp16.sessions.items()} == {
        "text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp16"}
    assert all(s.precision == "fp32" for s in fp32.sessions.values())
    a = fp32("a watercolor fox", seed=5, output="np")
    b = fp16("a watercolor fox", seed=5, output="np")
    assert 0 < np.abs(a - b).max() < 0.05
    assert psnr(a, b, peak=1.0) > 30


def test_fp16_vae_overflow_falls_back_to_fp32(fp16_engine):
    pipe = lcmrt.Pipeline.load(fp16_engine, backend="onnxruntime", precision="fp16")
    reference = pipe("a fox", seed=2, output="np")
    vae = pipe.sessions["vae_decoder"]
    original_run = vae.run
    vae.run = lambda feeds: {"image": np.full_like(original_run(feeds)["image"], np.nan)}
    with pytest.warns(UserWarning, match="fp32 VAE"):
        fallback = pipe("a fox", seed=2, output="np")
    assert np.isfinite(fallback).all()
    assert pipe.sessions["vae_decoder_fp32"].precision == "fp32"
    assert pipe.last_precisions == {"text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp32"}
    pipe("a fox", seed=2, output="latent")
    assert pipe.last_precisions == {"text_encoder": "fp16", "unet": "fp16"}
    # the fp32 decoder of the same latents differs from the fp16 one only by fp16 rounding
    assert np.abs(fallback - reference).max() < 0.05


def test_unknown_precision_is_refused(tiny_engine):
    from lcmrt.errors import BackendError

    with pytest.raises(BackendError, match="precision"):
        lcmrt.Pipeline.load(tiny_engine, backend="onnxruntime", precision="int4")
