"""SDXL LoRA files as people have them (lcmrt.export.lora on the tiny random SDXL and SSD-1B models): kohya's
trainer's SGM-named style LoRAs with both text encoders, the published LCM-LoRA format, and the keys diffusers
drops without a word, which lcmrt must refuse by name."""
import re
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.numpy import load_file as load_numpy  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lcmrt.errors import LoraError  # noqa: E402
from lcmrt.export.lora import FUSE_RTOL, LoraSpec, fuse_loras  # noqa: E402
from lcmrt.export.random_model import (KOHYA_ALPHA_PER_RANK, SDXL_FULL, SSD1B_FULL, get_preset,  # noqa: E402
                                       kohya_sgm_key, kohya_sgm_lora_state_dict, kohya_sgm_targets,
                                       peft_to_kohya_sgm, save_safetensors, sgm_block_names, write_random_model)

XL_ARCHS = ("sdxl", "ssd1b")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# Two fuses of the same fp32 factors in the same order agree exactly; 1e-6 only absorbs a different summation
# order (fp32 eps 1.2e-7 times weights of magnitude ~1).
WEIGHT_ATOL = 1e-6


def load_pipe(model_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """arch -> paths of its tiny random model (seed 0) plus `kohya`, its SGM-named kohya style LoRA."""
    models = {}
    for arch in XL_ARCHS:
        paths = write_random_model(tmp_path_factory.mktemp(arch) / "tiny", arch=arch, size="tiny", seed=0)
        pipe = load_pipe(paths["model"])
        tensors, metadata = kohya_sgm_lora_state_dict(models_of(pipe), get_preset(arch, "tiny"), seed=0)
        paths["kohya"] = paths["model"].parent / "style-lora-kohya.safetensors"
        save_safetensors(paths["kohya"], tensors, metadata)
        models[arch] = paths
    return models


def models_of(pipe):
    return {c: getattr(pipe, c) for c in COMPONENTS}


def weights(pipe) -> dict[tuple[str, str], torch.Tensor]:
    """Every Linear/Conv2d weight of the UNet and both text encoders."""
    return {(c, n): m.weight.detach().clone() for c in COMPONENTS for n, m in getattr(pipe, c).named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def changed(before: dict, after: dict) -> set:
    return {k for k in before if not torch.equal(before[k], after[k])}


def diffusers_fused(model_dir, path) -> dict:
    """The oracle: diffusers' own load_lora_weights + fuse_lora + unload on a fresh pipeline."""
    from peft.tuners.lora import LoraLayer

    pipe = load_pipe(model_dir)
    pipe.load_lora_weights(str(path), adapter_name="oracle")
    wrapped = [c for c in COMPONENTS if any(isinstance(m, LoraLayer) for m in getattr(pipe, c).modules())]
    pipe.fuse_lora(components=wrapped, lora_scale=1.0)
    pipe.unload_lora_weights()
    return weights(pipe)


def diffusers_wrapped(pipe_or_dir, path) -> int:
    """How many layers diffusers wraps when it loads `path`, without error."""
    from peft.tuners.lora import LoraLayer

    pipe = load_pipe(pipe_or_dir) if not hasattr(pipe_or_dir, "unet") else pipe_or_dir
    pipe.load_lora_weights(str(path), adapter_name="probe")
    return sum(isinstance(m, LoraLayer) for c in COMPONENTS if getattr(pipe, c, None) is not None
               for m in getattr(pipe, c).modules())


def modules_in(sd: dict) -> list[str]:
    return sorted(k.removesuffix(".lora_down.weight") for k in sd if k.endswith(".lora_down.weight"))


# --------------------------------------------------------------------------------------- SGM naming

def test_sgm_names_follow_the_block_layout():
    from diffusers import UNet2DConditionModel

    def blocks(unet_config):
        with torch.device("meta"):  # the real layout without allocating 2.5B parameters
            return sgm_block_names(UNet2DConditionModel(**unet_config))

    full = blocks(SDXL_FULL.unet)
    # names in SDXL LoRAs from kohya's trainer
    assert full["down_blocks.0.resnets.0"] == "input_blocks.1.0"
    assert full["down_blocks.0.downsamplers.0"] == "input_blocks.3.0"  # input_blocks_3_0_op
    assert full["down_blocks.1.attentions.0"] == "input_blocks.4.1"
    assert full["down_blocks.1.downsamplers.0"] == "input_blocks.6.0"
    assert full["down_blocks.2.attentions.1"] == "input_blocks.8.1"
    assert [full[f"mid_block.{m}"] for m in ("resnets.0", "attentions.0", "resnets.1")] == [
        "middle_block.0", "middle_block.1", "middle_block.2"]
    assert full["up_blocks.0.attentions.2"] == "output_blocks.2.1"
    assert full["up_blocks.0.upsamplers.0"] == "output_blocks.2.2"  # output_blocks_2_2_conv
    assert full["up_blocks.1.upsamplers.0"] == "output_blocks.5.2"
    assert full["up_blocks.2.resnets.2"] == "output_blocks.8.0"
    assert "up_blocks.2.upsamplers.0" not in full

    # diffusers' own reading of SGM keys agrees on every block of every layout, the tiny 2-level ones included
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    # block kind -> (an SGM module in it, the same module's diffusers name)
    leaf = {"resnets": ("in_layers_2", "conv1"), "attentions": ("proj_in", "proj_in"),
            "downsamplers": ("op", "conv"), "upsamplers": ("conv", "conv")}
    for unet_config in (SDXL_FULL.unet, SSD1B_FULL.unet, get_preset("sdxl", "tiny").unet,
                        get_preset("ssd1b", "tiny").unet):
        keys = {}
        for block, sgm in blocks(unet_config).items():
            sgm_leaf, diffusers_leaf = leaf[block.split(".")[-2]]
            keys[f"lora_unet_{sgm.replace('.', '_')}_{sgm_leaf}.lora_down.weight"] = f"{block}.{diffusers_leaf}"
        # each value is its own key, so the renamed dict says where each key went
        mapped = _maybe_map_sgm_blocks_to_diffusers({k: k for k in keys}, SimpleNamespace(**unet_config))
        assert sorted(mapped.values()) == sorted(keys)
        for new_key, old_key in mapped.items():
            assert _convert_unet_lora_key(new_key) == keys[old_key] + ".lora.down.weight", old_key


def test_kohya_sgm_lora_covers_what_kohya_trains(xl):
    sd = load_file(str(xl["sdxl"]["kohya"]))
    names = modules_in(sd)
    for key in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_proj_in",
                "lora_unet_output_blocks_2_1_proj_out", "lora_unet_input_blocks_1_0_in_layers_2",
                "lora_unet_input_blocks_1_0_emb_layers_1", "lora_unet_input_blocks_1_0_out_layers_3",
                "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_3_0_op",
                "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_5_1_transformer_blocks_1_ff_net_2",
                "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                "lora_te2_text_model_encoder_layers_1_mlp_fc1"):
        assert key in names
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block_" in n for n in names)
    assert all(sd[f"{n}.lora_down.weight"].dtype == sd[f"{n}.alpha"].dtype == torch.float16 for n in names)
    rank = get_preset("sdxl", "tiny").style_rank
    assert {sd[f"{n}.alpha"].item() for n in names} == {rank * KOHYA_ALPHA_PER_RANK}


# ------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("arch", XL_ARCHS)
def test_kohya_sgm_fuses_like_the_same_factors_in_peft(xl, arch, tmp_path):
    paths = xl[arch]
    peft_file = paths["style_lora"]
    base = load_pipe(paths["model"])
    sgm_file = tmp_path / "style-sgm.safetensors"
    save_safetensors(sgm_file, peft_to_kohya_sgm(load_numpy(str(peft_file)), base.unet))
    w0 = weights(base)

    [rec_peft] = fuse_loras(base, [LoraSpec(peft_file, 0.8)])
    pipe = load_pipe(paths["model"])
    [rec_sgm] = fuse_loras(pipe, [LoraSpec(sgm_file, 0.8)])

    w_peft, w_sgm = weights(base), weights(pipe)
    assert max_diff(w_peft, w_sgm) <= WEIGHT_ATOL
    assert changed(w0, w_sgm) == changed(w0, w_peft) and len(changed(w0, w_sgm)) == len(modules_in(load_file(
        str(sgm_file))))
    assert rec_sgm["format"] == "kohya" and rec_peft["format"] == "peft"
    assert rec_sgm["modules"] == rec_peft["modules"] and all(n > 0 for n in rec_sgm["modules"].values())


@pytest.mark.parametrize("arch", XL_ARCHS)
def test_kohya_sgm_style_lora_fuses_like_diffusers(xl, arch):
    paths = xl[arch]
    pipe = load_pipe(paths["model"])
    w0 = weights(pipe)
    sd = load_file(str(paths["kohya"]))

    [rec] = fuse_loras(pipe, [LoraSpec(paths["kohya"], 1.0)])

    fused = weights(pipe)
    assert max_diff(fused, diffusers_fused(paths["model"], paths["kohya"])) <= WEIGHT_ATOL
    counts = {c: sum(n.startswith(p) for n in modules_in(sd))
              for c, p in zip(COMPONENTS, ("lora_unet_", "lora_te1_", "lora_te2_"))}
    assert rec["modules"] == counts and all(n > 0 for n in counts.values())
    assert rec["format"] == "kohya" and 0 <= rec["max_fuse_error"] < FUSE_RTOL

    # and both put every module where the UNet's own block layout says (not just where diffusers does)
    blocks = sgm_block_names(pipe.unet)
    targets = {kohya_sgm_key(c, n, blocks): (c, n) for c, n, _ in kohya_sgm_targets(models_of(pipe))}
    assert sorted(targets) == modules_in(sd)
    for key, target in targets.items():
        down, up, alpha = (sd[f"{key}.{p}"].double() for p in ("lora_down.weight", "lora_up.weight", "alpha"))
        rank = down.shape[0]
        want = w0[target].double() + (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(w0[target].shape)
        rel = ((fused[target].double() - want).abs().max() / want.abs().max()).item()
        assert rel < FUSE_RTOL, (key, rel)
    assert changed(w0, fused) == set(targets.values())


@pytest.mark.parametrize("arch", XL_ARCHS)
def test_published_lcm_lora_format_fuses_like_diffusers(xl, arch):
    # lcm-lora-sdxl / lcm-lora-ssd-1b: kohya keys on diffusers module names, UNet only
    paths = xl[arch]
    pipe = load_pipe(paths["model"])
    w0 = weights(pipe)
    n = len(modules_in(load_file(str(paths["lcm_lora"]))))

    [rec] = fuse_loras(pipe, [LoraSpec(paths["lcm_lora"], 1.0, "lcm", "lcm")])

    assert max_diff(weights(pipe), diffusers_fused(paths["model"], paths["lcm_lora"])) <= WEIGHT_ATOL
    assert len(changed(w0, weights(pipe))) == n
    assert rec["modules"] == {"unet": n, "text_encoder": 0, "text_encoder_2": 0}


# ------------------------------------------------------------------------------- what diffusers drops

def extra_module(key: str, down_shape, up_shape) -> dict:
    g = torch.Generator().manual_seed(1)
    return {f"{key}.lora_down.weight": torch.randn(*down_shape, generator=g).half(),
            f"{key}.lora_up.weight": torch.randn(*up_shape, generator=g).half(),
            f"{key}.alpha": torch.tensor(2.0).half()}


# (key of a module this model does not have, down shape, up shape); tiny SDXL: 2 levels, 2 CLIP layers
MISSING_MODULES = {
    "te2-layer": ("lora_te2_text_model_encoder_layers_5_self_attn_q_proj", (4, 32), (32, 4)),
    "input-block": ("lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q", (4, 64), (64, 4)),
    "transformer-block": ("lora_unet_input_blocks_4_1_transformer_blocks_5_attn1_to_q", (4, 64), (64, 4)),
    "upsampler": ("lora_unet_output_blocks_5_1_conv", (4, 32, 3, 3), (32, 4, 1, 1)),
    "middle-block": ("lora_unet_middle_block_3_proj_in", (4, 64), (64, 4)),
}


@pytest.mark.parametrize("case", MISSING_MODULES)
def test_module_the_model_lacks_is_named(xl, tmp_path, case):
    key, down, up = MISSING_MODULES[case]
    sd = {**load_file(str(xl["sdxl"]["kohya"])), **extra_module(key, down, up)}
    path = tmp_path / f"{case}.safetensors"
    save_file(sd, str(path))
    n = len(modules_in(sd))

    if case == "middle-block":  # diffusers refuses, but its error names no key
        with pytest.raises(ValueError, match="Invalid middle block id 3") as err:
            diffusers_wrapped(xl["sdxl"]["model"], path)
        assert key not in str(err.value)
    else:  # diffusers loads the rest and drops this module without a word
        assert diffusers_wrapped(xl["sdxl"]["model"], path) == n - 1

    with pytest.raises(LoraError, match=rf"1 of {n} modules .*{key}\b"):
        fuse_loras(load_pipe(xl["sdxl"]["model"]), [LoraSpec(path, 1.0)])


def test_sdxl_layout_on_ssd1b_names_the_distilled_away_blocks(xl, tmp_path):
    sdxl, ssd1b = (set(modules_in(load_file(str(xl[a]["kohya"])))) for a in XL_ARCHS)
    lacking = sorted(sdxl - ssd1b)
    assert "lora_unet_middle_block_1_proj_in" in lacking  # SSD-1B's mid block has no attention
    assert diffusers_wrapped(xl["ssd1b"]["model"], xl["sdxl"]["kohya"]) == len(sdxl) - len(lacking)

    with pytest.raises(LoraError, match=rf"{len(lacking)} of {len(sdxl)} modules .*{lacking[0]}\b"):
        fuse_loras(load_pipe(xl["ssd1b"]["model"]), [LoraSpec(xl["sdxl"]["kohya"], 1.0)])


def test_sgm_keys_mixed_with_diffusers_names_are_named(xl, tmp_path):
    # a file with both layouts: diffusers keeps the diffusers-named UNet keys and drops every SGM one
    kohya = load_file(str(xl["sdxl"]["kohya"]))
    lcm = {k: v for k, v in load_file(str(xl["sdxl"]["lcm_lora"])).items() if "down_blocks_0_resnets_0" in k}
    sd = {**lcm, **kohya}
    path = tmp_path / "mixed.safetensors"
    save_file(sd, str(path))
    sgm = [n for n in modules_in(kohya) if n.startswith("lora_unet_")]
    n = len(modules_in(sd))
    assert diffusers_wrapped(xl["sdxl"]["model"], path) == n - len(sgm)

    with pytest.raises(LoraError, match=rf"{len(sgm)} of {n} modules .*{sgm[0]}\b"):
        fuse_loras(load_pipe(xl["sdxl"]["model"]), [LoraSpec(path, 1.0)])


def test_second_text_encoder_on_sd15_is_named(xl, tiny_model, tmp_path):
    # tiny SD1.5's CLIP has tiny SDXL's first text encoder's shapes: te1 lands, te2 has nowhere to go
    from diffusers import StableDiffusionPipeline

    sd = {k: v for k, v in load_file(str(xl["sdxl"]["kohya"])).items() if k.startswith("lora_te")}
    path = tmp_path / "te-only.safetensors"
    save_file(sd, str(path))
    te2 = [n for n in modules_in(sd) if n.startswith("lora_te2_")]

    def sd15():
        return StableDiffusionPipeline.from_pretrained(tiny_model["model"], dtype=torch.float32)

    assert diffusers_wrapped(sd15(), path) == len(modules_in(sd)) - len(te2)  # te2 silently dropped
    with pytest.raises(LoraError, match=rf"{len(te2)} of {len(modules_in(sd))} modules .*{re.escape(te2[0])}\b"):
        fuse_loras(sd15(), [LoraSpec(path, 1.0)])
