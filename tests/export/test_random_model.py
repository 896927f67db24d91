"""lcmrt.export.random_model: random-weight SD1.5, SDXL and SSD-1B models and their LoRA files."""
import json
import logging
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from lcmrt.errors import InputError
from lcmrt.export.random_model import (INPAINT_IN_CHANNELS, LCM_LORA_TARGETS, PRESETS, SD15_FULL, SD15_TINY,
                                       STYLE_KEY_PREFIXES, STYLE_TEXT_TARGETS, STYLE_UNET_TARGETS, get_preset,
                                       target_modules, write_random_model)

XL_ARCHS = ("sdxl", "ssd1b")
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "ssd1b": "StableDiffusionXLPipeline"}
INPAINT_PIPELINES = {"sd15": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline",
                     "ssd1b": "StableDiffusionXLInpaintPipeline"}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load_pipeline(model, arch="sd15", inpaint=False):
    import diffusers

    return getattr(diffusers, (INPAINT_PIPELINES if inpaint else PIPELINES)[arch]).from_pretrained(model)


@pytest.fixture(scope="module")
def tiny_models(tiny_model, tmp_path_factory):
    """arch -> the paths of its tiny random model, seed 0, written on first use (sd15: the session's)."""
    written = {"sd15": tiny_model}

    def get(arch):
        if arch not in written:
            written[arch] = write_random_model(tmp_path_factory.mktemp(arch) / "tiny", arch=arch, size="tiny", seed=0)
        return written[arch]
    return get


def test_tiny_model_loads_as_sd15_pipeline(tiny_model):
    from diffusers import LCMScheduler

    pipe = _load_pipeline(tiny_model["model"])
    assert pipe.unet.config.block_out_channels == [32, 64]
    assert pipe.unet.config.sample_size == 16
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.vae_scale_factor == 8
    assert pipe.safety_checker is None

    tok, te = pipe.tokenizer, pipe.text_encoder.config
    assert tok.model_max_length == te.max_position_embeddings == 77
    assert te.vocab_size == len(tok)
    assert (te.bos_token_id, te.eos_token_id, te.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id]) == ["<|startoftext|>", "<|endoftext|>"]
    assert tok.pad_token_id == tok.eos_token_id
    n = len(tok("a photo of a cat").input_ids)
    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and n >= 7  # bos, at least one token per word, eos
    assert ids[0] == tok.bos_token_id and ids[n - 1] == tok.eos_token_id
    assert ids[n:] == [tok.pad_token_id] * (77 - n) and tok.eos_token_id not in ids[1:n - 1]

    lcm = LCMScheduler.from_config(pipe.scheduler.config)
    assert lcm.config.beta_schedule == "scaled_linear"
    assert (lcm.config.beta_start, lcm.config.beta_end, lcm.config.steps_offset) == (0.00085, 0.012, 1)

    pipe.scheduler = lcm
    image = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 128, 128, 3)
    assert np.isfinite(image).all() and image.std() > 0


def test_tokenizer_json_loads_with_tokenizers(tiny_model):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model["model"] / "tokenizer" / "tokenizer.json"))
    assert tok.get_vocab_size() == len(tok.get_vocab())
    vocab = tok.get_vocab()
    # CLIP's layout: bytes, bytes + "</w>", merges, then the two specials last.
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (len(vocab) - 2, len(vocab) - 1)
    assert tok.truncation is None and tok.padding is None
    enc = tok.encode("A  photo of a CAT")
    assert enc.tokens[0] == "<|startoftext|>" and enc.tokens[-1] == "<|endoftext|>"
    assert "".join(enc.tokens[1:-1]).replace("</w>", " ").strip() == "a photo of a cat"


def test_same_seed_same_bytes_and_overwrite(tiny_model, tmp_path):
    again = tmp_path / "again"
    write_random_model(again, size="tiny", seed=1)
    with pytest.raises(InputError, match="--overwrite"):
        write_random_model(again, size="tiny", seed=0)
    paths = write_random_model(again, size="tiny", seed=0, overwrite=True)
    assert paths == {"model": again / "model", "lcm_lora": again / "lcm-lora.safetensors",
                     "style_lora": again / "style-lora.safetensors"}
    first, second = _files(tiny_model["model"].parent), _files(again)
    assert sorted(first) == sorted(second)
    assert len(first) == 12
    for name in first:
        assert first[name] == second[name], name


def test_different_seed_different_weights(tiny_model, tmp_path):
    other = write_random_model(tmp_path / "seed1", size="tiny", seed=1)
    for role, file in (("lcm_lora", None), ("style_lora", None), ("model", "unet/diffusion_pytorch_model.safetensors"),
                       ("model", "vae/diffusion_pytorch_model.safetensors"),
                       ("model", "text_encoder/model.safetensors")):
        a = load_file(tiny_model[role] / file if file else tiny_model[role])
        b = load_file(other[role] / file if file else other[role])
        assert a.keys() == b.keys()
        weights = [k for k in a if a[k].size > 1 and a[k].std() > 0]  # not the constant norm scales
        assert weights and all(not np.array_equal(a[k], b[k]) for k in weights), (role, file)


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match=r"--arch sd15 --size tiny.*--arch sd15 --size full"):
        write_random_model(tmp_path / "x", arch="sd15", size="huge")
    with pytest.raises(InputError, match="'sd99'"):
        write_random_model(tmp_path / "x", arch="sd99")
    assert not (tmp_path / "x").exists()


def test_lcm_lora_is_kohya_fp16_with_alpha(tiny_model):
    pipe = _load_pipeline(tiny_model["model"])
    modules = dict(target_modules(pipe.unet, LCM_LORA_TARGETS))
    # every module kind the real LCM-LoRA trains exists in the tiny UNet
    for target in LCM_LORA_TARGETS:
        assert any(name.endswith("." + target) for name in modules), target

    sd = load_file(tiny_model["lcm_lora"])
    names = {"lora_unet_" + name.replace(".", "_"): module for name, module in modules.items()}
    assert len(names) == 117
    assert set(sd) == {f"{n}.{part}" for n in names for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    rank, alpha = SD15_TINY.lcm_rank, SD15_TINY.lcm_alpha
    assert (rank, alpha) == (8, 4.0)
    for name, module in names.items():
        down, up, a = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"], sd[f"{name}.alpha"]
        assert down.dtype == up.dtype == a.dtype == np.float16
        assert a.shape == () and float(a) == alpha
        w = module.weight
        if w.ndim == 4:  # conv: down is a conv with the module's kernel, up a 1x1 conv
            assert down.shape == (rank, w.shape[1], w.shape[2], w.shape[3]) and up.shape == (w.shape[0], rank, 1, 1)
        else:
            assert down.shape == (rank, w.shape[1]) and up.shape == (w.shape[0], rank)
        assert np.abs(up).max() > 0 and np.abs(down).max() > 0
    with safe_open(tiny_model["lcm_lora"], "np") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "8" and float(meta["ss_network_alpha"]) == 4.0


def test_style_lora_is_peft_format_on_unet_and_text_encoder(tiny_model):
    sd = load_file(tiny_model["style_lora"])
    assert all(v.dtype == np.float32 for v in sd.values())
    assert not any("alpha" in k for k in sd)
    unet_a = [k for k in sd if k.startswith("unet.") and k.endswith(".lora_A.weight")]
    te_a = [k for k in sd if k.startswith("text_encoder.") and k.endswith(".lora_A.weight")]
    assert len(sd) == 2 * (len(unet_a) + len(te_a))
    # tiny UNet: 2 + 3 + 1 transformer blocks (down, up, mid) x attn1/attn2 x q, k, v, out
    assert len(unet_a) == 6 * 2 * 4
    assert len(te_a) == 2 * 4  # 2 CLIP layers x q, k, v, out
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in sd
    # transformers 4 names, as style LoRAs in the field have them
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight" in sd
    for key in unet_a + te_a:
        a, b = sd[key], sd[key.replace("lora_A", "lora_B")]
        assert a.shape[0] == b.shape[1] == SD15_TINY.style_rank
        assert np.abs(b).max() > 0


def _component_of(key):
    """The pipeline component a LoRA key (peft or kohya naming) belongs to."""
    if key.startswith(("text_encoder_2.", "lora_te2_")):
        return "text_encoder_2"
    return "text_encoder" if key.startswith(("text_encoder.", "lora_te_", "lora_te1_")) else "unet"


def _load_lora_checked(pipe, path, adapter):
    """pipe.load_lora_weights, failing on any sign that diffusers skipped part of the file (FIELD-NOTES' trap:
    diffusers can skip modules with only a log line)."""
    from diffusers.utils import logging as diffusers_logging

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(path, adapter_name=adapter)
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    messages += [str(w.message) for w in caught]
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], messages
    for bad in ("unexpected keys", "missing keys", "skipp", "not found in the base model"):
        assert not [m for m in messages if bad in m.lower()], messages


def _unet_inputs(pipe):
    """(sample, timestep, encoder_hidden_states) and kwargs for a seeded call of the pipeline's UNet."""
    config = pipe.unet.config
    x = torch.randn(1, config.in_channels, config.sample_size, config.sample_size,
                    generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    kwargs = {}
    if config.addition_embed_type == "text_time":  # SDXL's pooled text embedding and size/crop ids
        pooled = torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=torch.Generator().manual_seed(2))
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
    return (x, 500, ctx), kwargs


@pytest.mark.parametrize("role", ["lcm_lora", "style_lora"])
@pytest.mark.parametrize("arch", ["sd15", *XL_ARCHS])
def test_diffusers_wraps_every_module_of_the_file(tiny_models, arch, role):
    """Every module the file names is wrapped, in every component, and holds the file's factors."""
    from peft.tuners.lora import LoraLayer

    paths, preset = tiny_models(arch), get_preset(arch, "tiny")
    components = [name for name, _, _ in preset.arch.text_encoders] + ["unet"]
    pipe = _load_pipeline(paths["model"], arch)
    sd = load_file(paths[role])
    expected = dict.fromkeys(components, 0)
    for key in sd:
        if key.endswith((".lora_down.weight", ".lora_A.weight")):
            expected[_component_of(key)] += 1

    args, kwargs = _unet_inputs(pipe)
    with torch.no_grad():
        base = pipe.unet(*args, **kwargs).sample
    _load_lora_checked(pipe, paths[role], "a")

    for component in components:
        wrapped = {n: m for n, m in getattr(pipe, component).named_modules() if isinstance(m, LoraLayer) and "a" in m.lora_A}
        assert len(wrapped) == expected[component], component
        for name, module in wrapped.items():  # and each holds the file's factors, not a fresh init
            if role == "lcm_lora":
                key = "lora_unet_" + name.replace(".", "_")
                down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
            else:
                key = STYLE_KEY_PREFIXES[component] + name.removeprefix("text_model.")
                down, up = sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"]
            np.testing.assert_array_equal(module.lora_A["a"].weight.detach().numpy(), down.astype(np.float32))
            np.testing.assert_array_equal(module.lora_B["a"].weight.detach().numpy(), up.astype(np.float32))
    assert expected["unet"] > 0
    for component in components[:-1]:  # the text encoders: the style LoRA's only
        assert (expected[component] > 0) == (role == "style_lora"), component

    if role == "lcm_lora":  # alpha / rank reached peft
        scalings = {m.scaling["a"] for m in pipe.unet.modules() if isinstance(m, LoraLayer)}
        assert scalings == {preset.lcm_alpha / preset.lcm_rank}

    # the LoRA moves the UNet's output visibly, but does not swamp it
    with torch.no_grad():
        adapted = pipe.unet(*args, **kwargs).sample
    change = ((adapted - base).norm() / base.norm()).item()
    assert 1e-3 < change < 0.5, change


def test_full_size_is_sd15():
    """The full preset, counted on the meta device (no memory, well under a second)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_FULL.unet)
        vae = AutoencoderKL(**SD15_FULL.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_FULL.text_encoder))

    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text_encoder) == 123_060_480
    lcm = target_modules(unet, LCM_LORA_TARGETS)
    assert len(lcm) == 278  # as in the real lcm-lora-sdv1-5
    rank = SD15_FULL.lcm_rank
    assert rank == 64 and SD15_FULL.lcm_alpha != rank
    lora_params = sum(rank * (m.weight[0].numel() + m.weight.shape[0]) for _, m in lcm)
    assert round(lora_params / 1e6, 1) == 67.3
    assert len(target_modules(unet, STYLE_UNET_TARGETS)) == 16 * 2 * 4
    assert len(target_modules(text_encoder, STYLE_TEXT_TARGETS)) == 12 * 4


# ------------------------------------------------------------------------------------------ SDXL, SSD-1B

def test_cli_arch_choices_are_the_presets():
    from lcmrt.cli import random_model

    option = next(p for p in random_model.params if p.name == "arch")
    assert list(option.type.choices) == list(dict.fromkeys(arch for arch, _ in PRESETS))
    assert set(XL_ARCHS) < set(option.type.choices)


@pytest.mark.parametrize("arch", XL_ARCHS)
def test_tiny_xl_model_loads_as_sdxl_pipeline(tiny_models, arch):
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    paths = tiny_models(arch)
    pipe = _load_pipeline(paths["model"], arch)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"

    unet, te, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.sample_size == 16 and list(unet.block_out_channels) == [32, 64]
    assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
    assert unet.cross_attention_dim == te.hidden_size + te2.hidden_size == 64
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert (te.hidden_act, te2.hidden_act) == ("quick_gelu", "gelu")
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    assert pipe.vae_scale_factor == 8

    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (sched.num_train_timesteps, sched.steps_offset, sched.timestep_spacing) == (1000, 1, "leading")
    assert (sched.prediction_type, sched.interpolation_type, sched.use_karras_sigmas) == ("epsilon", "linear", False)
    assert LCMScheduler.from_config(sched).config.set_alpha_to_one is False  # as from SDXL's own file

    for tok, config in ((pipe.tokenizer, te), (pipe.tokenizer_2, te2)):
        assert config.vocab_size == len(tok) and config.max_position_embeddings == tok.model_max_length == 77
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("arch", XL_ARCHS)
def test_tokenizer_2_pads_with_exclamation_mark(tiny_models, arch):
    """SDXL's tokenizer_2 pads with "!" (id 0 in CLIP's vocabulary), its tokenizer with <|endoftext|>."""
    model = tiny_models(arch)["model"]
    pipe = _load_pipeline(model, arch)
    tok, tok2 = pipe.tokenizer, pipe.tokenizer_2
    assert json.loads((model / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"
    assert tok2.pad_token == "!" and tok2.pad_token_id == tok2.get_vocab()["!"] == 0
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    assert tok.get_vocab() == tok2.get_vocab()

    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    ids2 = tok2("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    n = len(tok("a photo of a cat").input_ids)
    assert ids[:n] == ids2[:n] and ids[n - 1] == tok.eos_token_id
    assert ids[n:] == [tok.eos_token_id] * (77 - n) and ids2[n:] == [0] * (77 - n)


@pytest.mark.parametrize("arch", XL_ARCHS)
def test_tiny_xl_runs_one_lcm_step_with_both_loras(tiny_models, arch):
    from diffusers import LCMScheduler
    from peft.tuners.lora import LoraLayer

    paths = tiny_models(arch)
    pipe = _load_pipeline(paths["model"], arch)
    _load_lora_checked(pipe, paths["lcm_lora"], "lcm")
    _load_lora_checked(pipe, paths["style_lora"], "style")
    for component in ("text_encoder", "text_encoder_2"):
        assert any(isinstance(m, LoraLayer) and "style" in m.lora_A for m in getattr(pipe, component).modules())
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.8])
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0, height=128, width=128,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 128, 128, 3)
    assert np.isfinite(image).all() and image.std() > 0.01


@pytest.mark.parametrize("arch", XL_ARCHS)
def test_xl_same_seed_same_bytes(tiny_models, tmp_path, arch):
    from click.testing import CliRunner

    from lcmrt.cli import cli

    first = _files(tiny_models(arch)["model"].parent)
    result = CliRunner().invoke(cli, ["random-model", str(tmp_path / "again"), "--arch", arch, "--size", "tiny"])
    assert result.exit_code == 0, result.output
    second = _files(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert len(first) == 16  # sd15's 12, and two files in each of text_encoder_2/ and tokenizer_2/
    for name in first:
        assert first[name] == second[name], name

    other = write_random_model(tmp_path / "seed1", arch=arch, size="tiny", seed=1)
    for file in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        a, b = load_file(tmp_path / "again" / "model" / file), load_file(other["model"] / file)
        weights = [k for k in a if a[k].size > 1 and a[k].std() > 0]
        assert weights and all(not np.array_equal(a[k], b[k]) for k in weights), file


def test_lcm_lora_xl_is_kohya_with_sdxl_metadata(tiny_models):
    for arch in XL_ARCHS:
        sd = load_file(tiny_models(arch)["lcm_lora"])
        assert all(k.startswith("lora_unet_") for k in sd) and all(v.dtype == np.float16 for v in sd.values())
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in sd
        with safe_open(tiny_models(arch)["lcm_lora"], "np") as f:
            assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    style = load_file(tiny_models("sdxl")["style_lora"])
    # transformers 4 names for both text encoders, as SDXL style LoRAs in the field have them
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight" in style
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in style


def _transformer_depths(unet):
    """Transformer blocks per attention: down blocks, mid block, up blocks."""
    def depths(block):
        return [len(a.transformer_blocks) for a in getattr(block, "attentions", None) or []]
    return [depths(b) for b in unet.down_blocks], depths(unet.mid_block), [depths(b) for b in unet.up_blocks]


def test_tiny_ssd1b_is_a_distilled_tiny_sdxl(tiny_models):
    """SSD-1B's UNet is SDXL's with transformer blocks and the mid block's attention removed; the rest, the
    conditioning included, is the same."""
    from diffusers import UNet2DConditionModel

    sdxl, ssd1b = (UNet2DConditionModel.from_pretrained(tiny_models(arch)["model"] / "unet") for arch in XL_ARCHS)
    assert _transformer_depths(sdxl) == ([[], [2, 2]], [2], [[2, 2, 2], []])
    assert _transformer_depths(ssd1b) == ([[], [1, 1]], [], [[1, 1, 2], []])
    assert (type(sdxl.mid_block).__name__, type(ssd1b.mid_block).__name__) == (
        "UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
    a, b = sdxl.state_dict(), ssd1b.state_dict()
    assert set(b) < set(a)  # every SSD-1B weight has an SDXL namesake ...
    assert all(a[k].shape == b[k].shape for k in b)  # ... of its shape
    for name in ("conv_in.weight", "add_embedding.linear_1.weight",
                 "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"):
        assert name in b
    for arch in XL_ARCHS:  # and the LCM-LoRA follows: one LoRA per target module of its own UNet
        sd = load_file(tiny_models(arch)["lcm_lora"])
        unet = sdxl if arch == "sdxl" else ssd1b
        assert len(sd) == 3 * len(target_modules(unet, LCM_LORA_TARGETS))
    assert len(target_modules(ssd1b, LCM_LORA_TARGETS)) < len(target_modules(sdxl, LCM_LORA_TARGETS))


@pytest.mark.parametrize("arch, unet_params, lcm_modules, lcm_params", [
    ("sdxl", 2_567_463_684, 788, 196.8),  # lcm-lora-sdxl: 394 MB in fp16
    ("ssd1b", 1_331_334_404, 423, 104.9),
])
def test_full_size_is_sdxl_or_ssd1b(arch, unet_params, lcm_modules, lcm_params):
    """The full presets, counted on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    preset = get_preset(arch, "full")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset.unet)
        vae = AutoencoderKL(**preset.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**preset.text_encoder))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**preset.text_encoder_2))

    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(unet) == unet_params
    assert count(vae) == 83_653_863 and preset.vae["scaling_factor"] == 0.13025
    assert count(text_encoder) == 123_060_480  # CLIP ViT-L/14
    assert count(text_encoder_2) == 694_659_840  # OpenCLIP ViT-bigG/14 with its projection
    assert unet.config.cross_attention_dim == 768 + 1280
    assert unet.config.projection_class_embeddings_input_dim == 6 * 256 + 1280
    lcm = target_modules(unet, LCM_LORA_TARGETS)
    assert len(lcm) == lcm_modules
    rank = preset.lcm_rank
    assert rank == 64 and preset.lcm_alpha != rank
    assert round(sum(rank * (m.weight[0].numel() + m.weight.shape[0]) for _, m in lcm) / 1e6, 1) == lcm_params
    assert len(target_modules(text_encoder_2, STYLE_TEXT_TARGETS)) == 32 * 4


# ------------------------------------------------------------------------------------------ inpainting

@pytest.fixture(scope="module")
def tiny_inpaint_models(tmp_path_factory):
    """arch -> the paths of its tiny random inpainting model, seed 0, written on first use."""
    written = {}

    def get(arch):
        if arch not in written:
            out = tmp_path_factory.mktemp(f"{arch}-inpaint") / "tiny"
            written[arch] = write_random_model(out, arch=arch, size="tiny", seed=0, inpaint=True)
        return written[arch]
    return get


@pytest.mark.parametrize("arch", ["sd15", *XL_ARCHS])
def test_tiny_inpaint_model_inpaints_with_both_loras(tiny_inpaint_models, arch):
    from diffusers import LCMScheduler
    from PIL import Image

    paths = tiny_inpaint_models(arch)
    model_index = json.loads((paths["model"] / "model_index.json").read_text())
    assert model_index["_class_name"] == INPAINT_PIPELINES[arch]
    pipe = _load_pipeline(paths["model"], arch, inpaint=True)
    assert type(pipe).__name__ == INPAINT_PIPELINES[arch]
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels) == (INPAINT_IN_CHANNELS, 4) == (9, 4)
    if arch in XL_ARCHS:  # six time ids (sizes and crops) as the UNet's add_embedding takes, not five
        assert model_index["requires_aesthetics_score"] is False and pipe.config.requires_aesthetics_score is False
        assert pipe.config.force_zeros_for_empty_prompt is True

    # the LoRAs fit the 9-channel UNet: conv_in is no LoRA target
    _load_lora_checked(pipe, paths["lcm_lora"], "lcm")
    _load_lora_checked(pipe, paths["style_lora"], "style")
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, 0.8])
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    size = 8 * pipe.unet.config.sample_size
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    # strength 1.0: one step at strength < 1 leaves diffusers' inpaint pipelines no step to take
    out = pipe("a photo of a cat", image=image, mask_image=Image.fromarray(mask), num_inference_steps=1,
               strength=1.0, guidance_scale=1.0, height=size, width=size, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, size, size, 3) == (1, 128, 128, 3)
    assert np.isfinite(out).all() and out.std() > 0.01


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_inpaint_mask_and_masked_image_move_the_unet_output(tiny_inpaint_models, arch):
    pipe = _load_pipeline(tiny_inpaint_models(arch)["model"], arch, inpaint=True)
    (x, t, ctx), kwargs = _unet_inputs(pipe)  # x: [1, 9, 16, 16] = latents, mask, masked-image latents
    with torch.no_grad():
        def run(sample):
            return pipe.unet(sample, t, ctx, **kwargs).sample  # [1, 4, 16, 16]

        masked, unmasked = x.clone(), x.clone()
        masked[:, 4], unmasked[:, 4] = 1.0, 0.0
        base = run(masked)
        mask_change = ((run(unmasked) - base).norm() / base.norm()).item()
        other_image = masked.clone()
        other_image[:, 5:] = torch.randn(1, 4, *x.shape[2:], generator=torch.Generator().manual_seed(3))
        image_change = ((run(other_image) - base).norm() / base.norm()).item()
    # measured on the tiny models: 17-20% (mask), 70-79% (masked image)
    assert mask_change > 0.05, mask_change
    assert image_change > 0.05, image_change


def test_inpaint_model_is_the_regular_model_with_a_wider_conv_in(tiny_model, tiny_inpaint_models):
    """Same seed: every file but the UNet's and model_index.json has the regular model's bytes, and the UNet's
    conv_in keeps the regular weights for the latents and adds its own for the mask and masked image."""
    regular, inpaint = _files(tiny_model["model"].parent), _files(tiny_inpaint_models("sd15")["model"].parent)
    assert sorted(regular) == sorted(inpaint)
    changed = {"model/model_index.json", "model/unet/config.json", "model/unet/diffusion_pytorch_model.safetensors"}
    assert {name for name in regular if regular[name] != inpaint[name]} == changed

    index, inpaint_index = (json.loads(files["model/model_index.json"]) for files in (regular, inpaint))
    assert {**index, "_class_name": "StableDiffusionInpaintPipeline"} == inpaint_index
    config, inpaint_config = (json.loads(files["model/unet/config.json"]) for files in (regular, inpaint))
    assert {**config, "in_channels": 9} == inpaint_config

    a = load_file(tiny_model["model"] / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tiny_inpaint_models("sd15")["model"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not np.array_equal(a[k], b[k])] == ["conv_in.weight"]
    assert a["conv_in.weight"].shape == (32, 4, 3, 3) and b["conv_in.weight"].shape == (32, 9, 3, 3)
    np.testing.assert_array_equal(b["conv_in.weight"][:, :4], a["conv_in.weight"])
    # torch's default init for a 9-channel conv: its bound scales with 1 / sqrt(fan_in), 4 * 9 -> 9 * 9 inputs
    ratio = b["conv_in.weight"][:, 4:].std() / a["conv_in.weight"].std()
    assert 0.55 < ratio < 0.8, ratio


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_cli_inpaint_writes_the_same_9_channel_model(tiny_inpaint_models, tmp_path, arch):
    from click.testing import CliRunner

    from lcmrt.cli import cli

    out = tmp_path / "inpaint"
    result = CliRunner().invoke(cli, ["random-model", str(out), "--arch", arch, "--inpaint"])
    assert result.exit_code == 0, result.output
    assert "inpainting" in result.output
    assert json.loads((out / "model" / "unet" / "config.json").read_text())["in_channels"] == 9
    first, second = _files(tiny_inpaint_models(arch)["model"].parent), _files(out)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], name
