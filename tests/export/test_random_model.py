"""lcmrt.export.random_model: random-weight SD1.5 models and their LoRA files."""
import logging
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from lcmrt.errors import InputError
from lcmrt.export.random_model import (LCM_LORA_TARGETS, SD15_FULL, SD15_TINY, STYLE_KEY_PREFIXES,
                                       STYLE_TEXT_TARGETS, STYLE_UNET_TARGETS, target_modules,
                                       write_random_model)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load_pipeline(model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model)


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


@pytest.mark.parametrize("role", ["lcm_lora", "style_lora"])
def test_diffusers_wraps_every_module_of_the_file(tiny_model, role):
    """FIELD-NOTES' trap: diffusers can skip modules with only a log line. Count what it wrapped."""
    from diffusers.utils import logging as diffusers_logging
    from peft.tuners.lora import LoraLayer

    pipe = _load_pipeline(tiny_model["model"])
    sd = load_file(tiny_model[role])
    expected = {"unet": 0, "text_encoder": 0}
    for key in sd:
        if key.endswith((".lora_down.weight", ".lora_A.weight")):
            expected["text_encoder" if key.startswith(("text_encoder.", "lora_te_")) else "unet"] += 1

    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(x, 500, ctx).sample

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(tiny_model[role], adapter_name="a")
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    messages += [str(w.message) for w in caught]
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], messages
    for bad in ("unexpected keys", "missing keys", "skipp", "not found in the base model"):
        assert not [m for m in messages if bad in m.lower()], messages

    for component in ("unet", "text_encoder"):
        wrapped = {n: m for n, m in getattr(pipe, component).named_modules() if isinstance(m, LoraLayer) and "a" in m.lora_A}
        assert len(wrapped) == expected[component], component
        for name, module in wrapped.items():  # and each holds the file's factors, not a fresh init
            if role == "lcm_lora":
                key = "lora_unet_" + name.replace(".", "_")
                down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
            else:
                key = STYLE_KEY_PREFIXES[component] + name
                down, up = sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"]
            np.testing.assert_array_equal(module.lora_A["a"].weight.detach().numpy(), down.astype(np.float32))
            np.testing.assert_array_equal(module.lora_B["a"].weight.detach().numpy(), up.astype(np.float32))
    assert expected["unet"] > 0 and (expected["text_encoder"] > 0) == (role == "style_lora")

    if role == "lcm_lora":  # alpha / rank reached peft
        scalings = {m.scaling["a"] for m in pipe.unet.modules() if isinstance(m, LoraLayer)}
        assert scalings == {SD15_TINY.lcm_alpha / SD15_TINY.lcm_rank}

    # the LoRA moves the UNet's output visibly, but does not swamp it
    with torch.no_grad():
        adapted = pipe.unet(x, 500, ctx).sample
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
