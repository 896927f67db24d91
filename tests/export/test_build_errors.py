"""`lcmrt build` on bad input: exit code 2 and one clear paragraph naming the problem, no traceback,
and nothing written at --out."""
import re
import shutil
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lcmrt.cli import cli  # noqa: E402
from lcmrt.errors import InputError  # noqa: E402


def build(tiny_model, out, *extra, model=None, lcm_lora=None, quiet=True):
    args = ["build", str(model or tiny_model["model"]), "--lcm-lora", str(lcm_lora or tiny_model["lcm_lora"]),
            "--height", "64", "--width", "64", "--out", str(out), *extra] + (["--quiet"] if quiet else [])
    return CliRunner().invoke(cli, args)


def error_of(result, out=None):
    """The error paragraph, after checking exit code 2, no traceback, and (with `out`) nothing written."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # one paragraph, last thing printed
    assert result.stdout == ""
    if out is not None:
        assert not out.exists()
        assert not out.parent.exists() or not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return errors[0]


@pytest.fixture
def out(tmp_path):
    return tmp_path / "engines" / "engine"


# ------------------------------------------------------------------------------------ paths, options

def test_missing_model_path(tiny_model, tmp_path, out):
    err = error_of(build(tiny_model, out, model=tmp_path / "no-such-model"), out)
    assert re.search(r"no-such-model does not exist", err)


def test_missing_lcm_lora(tiny_model, tmp_path, out):
    err = error_of(build(tiny_model, out, lcm_lora=tmp_path / "lcm.safetensors"), out)
    assert re.search(r"LoRA file .*lcm\.safetensors does not exist", err)


def test_missing_style_lora(tiny_model, tmp_path, out):
    err = error_of(build(tiny_model, out, "--lora", f"{tmp_path / 'paper.safetensors'}:0.8"), out)
    assert re.search(r"LoRA file .*paper\.safetensors does not exist", err)


@pytest.mark.parametrize("option, value, hint", [("--height", "100", "96"), ("--width", "130", "128")])
def test_size_not_multiple_of_8(tiny_model, out, option, value, hint):
    args = ["build", str(tiny_model["model"]), "--lcm-lora", str(tiny_model["lcm_lora"]), "--height", "64",
            "--width", "64", "--out", str(out), option, value, "--quiet"]
    err = error_of(CliRunner().invoke(cli, args), out)
    assert f"The {option[2:]} {value} of the size" in err and "is not a multiple of 8" in err and f"try {hint}" in err


def test_existing_out_refused_without_overwrite(tiny_model, tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = error_of(build(tiny_model, out))
    assert "already exists" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]


def test_debug_shows_the_exception(tiny_model, out):
    args = ["--debug", "build", str(tiny_model["model"]), "--lcm-lora", str(tiny_model["lcm_lora"]),
            "--height", "100", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0 and isinstance(result.exception, InputError)


# --------------------------------------------------------------------------------------------- pickles

def test_pickled_model_refused(tiny_model, tmp_path, out):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, ckpt)
    err = error_of(build(tiny_model, out, model=ckpt), out)
    assert "model.ckpt is a pickled checkpoint" in err and "--allow-pickle" in err


def test_diffusers_folder_with_only_pickles_refused(tiny_model, tmp_path, out):
    model = tmp_path / "model"
    shutil.copytree(tiny_model["model"], model)
    for path in model.rglob("*.safetensors"):
        path.rename(path.with_suffix(".bin"))
    err = error_of(build(tiny_model, out, model=model), out)
    assert "only pickled weights" in err and "--allow-pickle" in err


def test_pickled_lora_refused(tiny_model, tmp_path, out):
    path = tmp_path / "style.bin"
    torch.save(load_file(str(tiny_model["style_lora"])), path)
    err = error_of(build(tiny_model, out, "--lora", str(path)), out)
    assert "style.bin is a pickled checkpoint" in err and "--allow-pickle" in err


# ----------------------------------------------------------------------------------------- bad LoRAs

def test_non_lora_file_names_keys(tiny_model, out):
    weights = tiny_model["model"] / "unet" / "diffusion_pytorch_model.safetensors"
    keys = list(load_file(str(weights)))
    err = error_of(build(tiny_model, out, "--lora", str(weights)), out)
    assert re.search(rf"{len(keys)} of {len(keys)} keys are not LoRA keys", err)
    named = [k for k in keys if k in err]
    assert 1 <= len(named) <= 5, named  # a few, not all


def sdxl_shaped_lora(tiny_model, path):
    """kohya keys on this model's cross-attention to_k modules, but with SDXL's 2048-wide text features."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model["model"], subfolder="unet")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, mod in unet.named_modules():
        if name.endswith("attn2.to_k"):
            key = "lora_unet_" + name.replace(".", "_")
            sd[key + ".lora_down.weight"] = torch.randn(4, 2048, generator=g).half()
            sd[key + ".lora_up.weight"] = torch.randn(mod.weight.shape[0], 4, generator=g).half()
            sd[key + ".alpha"] = torch.tensor(4.0).half()
    save_file(sd, str(path))
    return len(sd) // 3


def test_sdxl_lora_on_sd15_counts_unmatched_modules(tiny_model, tmp_path, out):
    n = sdxl_shaped_lora(tiny_model, tmp_path / "sdxl-style.safetensors")
    assert n >= 2
    result = build(tiny_model, out, "--lora", str(tmp_path / "sdxl-style.safetensors"), quiet=False)
    err = error_of(result, out)
    assert re.search(rf"sdxl-style\.safetensors.*{n} of {n} modules in the file fit no layer", err)
    assert "SDXL" in err and "SD1.5" in err
    assert "done load model" in result.stderr  # progress before the error, then the error paragraph last


def test_sdxl_lora_as_lcm_lora(tiny_model, tmp_path, out):
    n = sdxl_shaped_lora(tiny_model, tmp_path / "lcm-sdxl.safetensors")
    err = error_of(build(tiny_model, out, lcm_lora=tmp_path / "lcm-sdxl.safetensors"), out)
    assert re.search(rf"could not load LoRA 'lcm'.*{n} of {n} modules in the file fit no layer", err)


# ------------------------------------------------------------------------------- hub ids, single files

def test_hub_id_with_hub_offline_fails_fast(tiny_model, out, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    err = error_of(build(tiny_model, out, model="someone/some-model"), out)
    assert time.perf_counter() - start < 10
    assert "'someone/some-model' is not a local path" in err and "HF_HUB_OFFLINE" in err


def test_hub_id_without_network_names_the_problem(tiny_model, out, monkeypatch):
    # no HF_HUB_OFFLINE: one quick look-up instead of diffusers' half a minute of download retries
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    err = error_of(build(tiny_model, out, model="lcmrt-tests/no-such-model-3f9a"), out)
    assert time.perf_counter() - start < 20
    assert "'lcmrt-tests/no-such-model-3f9a' is not a local path" in err
    # offline here; a CI machine with network reaches the Hub, which has no such model
    assert re.search(r"cannot be reached .*offline|has no model", err)


def test_single_file_without_config_offline(tiny_model, tmp_path, out, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "sd15.safetensors"
    shutil.copy(tiny_model["model"] / "unet" / "diffusion_pytorch_model.safetensors", ckpt)
    err = error_of(build(tiny_model, out, model=ckpt), out)
    assert "sd15.safetensors is a single-file checkpoint" in err and "--config" in err


def test_single_file_without_config_no_network(tiny_model, tmp_path, out, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    ckpt = tmp_path / "sd15.safetensors"
    shutil.copy(tiny_model["model"] / "unet" / "diffusion_pytorch_model.safetensors", ckpt)
    err = error_of(build(tiny_model, out, model=ckpt), out)
    assert "Loading the checkpoint" in err and "needs --config" in err


def test_single_file_config_must_exist(tiny_model, tmp_path, out):
    ckpt = tmp_path / "sd15.safetensors"
    shutil.copy(tiny_model["model"] / "unet" / "diffusion_pytorch_model.safetensors", ckpt)
    err = error_of(build(tiny_model, out, "--config", str(tmp_path / "no-config"), model=ckpt), out)
    assert "--config" in err and "no-config does not exist" in err


def test_single_file_that_is_not_a_checkpoint(tiny_model, tmp_path, out):
    # a diffusers-format UNet file is no original-format (LDM) checkpoint, even with the right --config
    ckpt = tmp_path / "unet-only.safetensors"
    shutil.copy(tiny_model["model"] / "unet" / "diffusion_pytorch_model.safetensors", ckpt)
    err = error_of(build(tiny_model, out, "--config", str(tiny_model["model"]), model=ckpt), out)
    assert "Loading the checkpoint" in err and "unet-only.safetensors" in err
