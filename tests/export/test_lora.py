"""LoRA loading, fusing and fuse verification (lcmrt.export.lora) on the tiny random SD1.5 model."""
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

from lcmrt.errors import InputError, LoraError  # noqa: E402
from lcmrt.export.lora import FUSE_RTOL, LoraSpec, fuse_loras, parse_lora_arg  # noqa: E402

# fused (peft-merged) weights against unfused peft adapters, same fp32 math in another order
OUTPUT_ATOL = 1e-5


def load_pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model["model"], dtype=torch.float32)


def lora_layers(pipe):
    from peft.tuners.lora import LoraLayer

    return [m for c in (pipe.unet, pipe.text_encoder) for m in c.modules() if isinstance(m, LoraLayer)]


def reference_fused(pipe, files):
    """{(component, module name): W + sum weight * alpha/rank * up @ down}, straight from the raw files.

    Names are mapped the obvious way (kohya `lora_unet_a_b_c` is the module whose dots became underscores;
    peft `unet.a.b.c.lora_A`), independent of both diffusers' conversion and lcmrt's value matching.
    """
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    kohya_names = {"lora_unet_" + n.replace(".", "_"): ("unet", n) for n, _ in pipe.unet.named_modules()}
    for n, _ in pipe.text_encoder.named_modules():
        # real files name CLIP modules `text_model.encoder...`; transformers 5 dropped the `text_model` level
        for name in (n, "text_model." + n):
            kohya_names["lora_te_" + name.replace(".", "_")] = ("text_encoder", n)
    out = {}
    for path, weight in files:
        sd = load_file(str(path))
        for key in sd:
            if key.endswith(".lora_down.weight"):
                base = key[: -len(".lora_down.weight")]
                target, up = kohya_names[base], sd[base + ".lora_up.weight"]
                alpha = sd[base + ".alpha"].item() if base + ".alpha" in sd else None
            elif key.endswith(".lora_A.weight"):
                base = key[: -len(".lora_A.weight")]
                comp, name = base.split(".", 1)
                if not hasattr(comps[comp], "text_model"):
                    name = name.removeprefix("text_model.")
                target, up, alpha = (comp, name), sd[base + ".lora_B.weight"], None
            else:
                continue
            down = sd[key].double()
            rank = down.shape[0]
            scale = (alpha if alpha is not None else rank) / rank
            w0 = out.get(target)
            if w0 is None:
                w0 = comps[target[0]].get_submodule(target[1]).weight.detach().double().clone()
            delta = (up.double().reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(w0.shape)
            out[target] = w0 + weight * scale * delta
    return out


def assert_fused_like(pipe, expected):
    for (comp, name), want in expected.items():
        got = getattr(pipe, comp).get_submodule(name).weight.detach().double()
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel < FUSE_RTOL, f"{comp}.{name}: {rel:.2e}"


def model_outputs(pipe):
    """UNet noise prediction and text-encoder hidden states on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    cfg = pipe.unet.config
    size = cfg.sample_size
    sample = torch.randn(2, cfg.in_channels, size, size, generator=g)  # [B, 4, H/8, W/8]
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (2, 77), generator=g)
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]  # [B, 77, D]
        eps = pipe.unet(sample, torch.tensor([999, 499]), encoder_hidden_states=text).sample
    return text, eps


@pytest.fixture
def pipe(tiny_model):
    return load_pipe(tiny_model)


@pytest.fixture
def lcm(tiny_model):
    return Path(tiny_model["lcm_lora"])


@pytest.fixture
def style(tiny_model):
    return Path(tiny_model["style_lora"])


# ------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_kohya_lcm_lora_fuses_exactly(pipe, lcm, weight):
    raw = load_file(str(lcm))
    n_modules = sum(k.endswith(".lora_down.weight") for k in raw)
    alpha = next(v for k, v in raw.items() if k.endswith(".alpha")).item()
    rank = next(v for k, v in raw.items() if k.endswith(".lora_down.weight")).shape[0]
    assert alpha != rank  # the fixture exercises the alpha / rank scale
    expected = reference_fused(pipe, [(lcm, weight)])

    [rec] = fuse_loras(pipe, [LoraSpec(lcm, weight, "lcm", "lcm")])

    assert_fused_like(pipe, expected)
    assert rec["format"] == "kohya" and rec["role"] == "lcm" and rec["weight"] == weight
    assert rec["modules"] == {"unet": n_modules, "text_encoder": 0}
    assert rec["ranks"] == [rank] and rec["alphas"] == [alpha]
    assert 0 <= rec["max_fuse_error"] < FUSE_RTOL
    assert len(rec["sha256"]) == 64 and rec["path"] == str(lcm)
    assert not lora_layers(pipe)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_peft_style_lora_with_text_encoder_fuses_exactly(pipe, style, weight):
    raw = load_file(str(style))
    counts = {c: sum(k.startswith(c + ".") and k.endswith(".lora_A.weight") for k in raw)
              for c in ("unet", "text_encoder")}
    assert counts["text_encoder"] > 0
    expected = reference_fused(pipe, [(style, weight)])

    [rec] = fuse_loras(pipe, [LoraSpec(style, weight)])

    assert_fused_like(pipe, expected)
    assert rec["format"] == "peft" and rec["name"] == style.stem and rec["role"] == "style"
    assert rec["modules"] == counts
    assert rec["alphas"] == [float(r) for r in rec["ranks"]]  # no alpha in the file: alpha = rank


def test_two_loras_fused_equal_active_adapters(tiny_model, pipe, lcm, style):
    weights = {"lcm": 1.0, "style": 0.5}
    expected = reference_fused(pipe, [(lcm, 1.0), (style, 0.5)])
    base_text, base_eps = model_outputs(pipe)

    records = fuse_loras(pipe, [LoraSpec(lcm, 1.0, "lcm", "lcm"), LoraSpec(style, 0.5, "style")])
    assert [r["name"] for r in records] == ["lcm", "style"]
    assert_fused_like(pipe, expected)
    fused_text, fused_eps = model_outputs(pipe)

    # the oracle: diffusers' own unfused adapters, active at the same weights
    live = load_pipe(tiny_model)
    live.load_lora_weights(str(lcm), adapter_name="lcm")
    live.load_lora_weights(str(style), adapter_name="style")
    live.set_adapters(list(weights), adapter_weights=list(weights.values()))
    live_text, live_eps = model_outputs(live)

    assert (fused_text - live_text).abs().max().item() < OUTPUT_ATOL
    assert (fused_eps - live_eps).abs().max().item() < OUTPUT_ATOL
    # and the LoRAs do change the outputs, well above that tolerance
    assert (fused_eps - base_eps).abs().max().item() > 100 * OUTPUT_ATOL
    assert (fused_text - base_text).abs().max().item() > 100 * OUTPUT_ATOL


# ------------------------------------------------------------------------------------ alpha / scale

def test_alpha_scaling_changes_the_fuse(tiny_model, lcm, tmp_path):
    raw = load_file(str(lcm))
    no_alpha = tmp_path / "lcm-no-alpha.safetensors"
    save_file({k: v for k, v in raw.items() if not k.endswith(".alpha")}, str(no_alpha))
    alpha = next(v for k, v in raw.items() if k.endswith(".alpha")).item()
    rank = next(v for k, v in raw.items() if k.endswith(".lora_down.weight")).shape[0]

    base = load_pipe(tiny_model)
    with_alpha, without = load_pipe(tiny_model), load_pipe(tiny_model)
    [rec_a] = fuse_loras(with_alpha, [LoraSpec(lcm, 1.0)])
    [rec_n] = fuse_loras(without, [LoraSpec(no_alpha, 1.0)])
    assert rec_a["alphas"] == [alpha] and rec_n["alphas"] == [float(rank)]

    name = "down_blocks.0.resnets.0.conv1"  # a conv module: kohya [r, in, 3, 3] / [out, r, 1, 1]
    w0, wa, wn = (p.unet.get_submodule(name).weight.detach().double() for p in (base, with_alpha, without))
    assert (wa - w0).abs().max() > 1e-3
    torch.testing.assert_close(wa - w0, (alpha / rank) * (wn - w0), rtol=1e-4, atol=1e-6)


def test_wrong_scale_is_caught(pipe, lcm, monkeypatch):
    # simulate a diffusers/peft that ignores alpha: scaling = weight instead of weight * alpha / rank
    from peft.tuners.lora import LoraLayer

    def set_scale_ignoring_alpha(self, adapter, scale):
        if adapter in self.scaling:
            self.scaling[adapter] = scale

    monkeypatch.setattr(LoraLayer, "set_scale", set_scale_ignoring_alpha)
    with pytest.raises(LoraError, match=r"do not match .* layers differ"):
        fuse_loras(pipe, [LoraSpec(lcm, 0.8)])


def test_tampered_fused_weight_is_caught(pipe, style, monkeypatch):
    # one weight off by a part in 1e4 after an otherwise correct fuse
    unload = type(pipe).unload_lora_weights

    def unload_then_tamper(self, *args, **kwargs):
        unload(self, *args, **kwargs)
        with torch.no_grad():
            w = next(m for n, m in self.text_encoder.named_modules() if n.endswith("layers.0.self_attn.q_proj")).weight
            w[0, 0] += 1e-4 * w.abs().max()

    monkeypatch.setattr(type(pipe), "unload_lora_weights", unload_then_tamper)
    with pytest.raises(LoraError, match=r"1 of \d+ layers differ, worst text_encoder\.\S*layers\.0\.self_attn\.q_proj "):
        fuse_loras(pipe, [LoraSpec(style, 1.0)])


# ------------------------------------------------------------------------------------ partial loads

def test_mixed_legacy_and_peft_keys_are_a_partial_load(pipe, tmp_path):
    # FIELD-NOTES trap: convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)) writes legacy
    # `to_q.lora.down` keys for attention next to peft keys; diffusers skips the legacy ones with a warning.
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_config(pipe.unet.config)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]))
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    legacy = sum(k.endswith(".lora.down.weight") for k in sd)
    total = sum(k.endswith("down.weight") or k.endswith("lora_A.weight") for k in sd)
    assert 0 < legacy < total
    path = tmp_path / "trap.safetensors"
    save_file({"unet." + k: v.contiguous() for k, v in sd.items()}, str(path))

    with pytest.raises(LoraError, match=rf"{legacy} of {total} modules in the file did not land"):
        fuse_loras(pipe, [LoraSpec(path, 1.0)])
    assert not lora_layers(pipe)  # nothing half-loaded is left behind


def test_modules_missing_from_model_are_reported(pipe, style, tmp_path):
    sd = load_file(str(style))
    n = sum(k.endswith(".lora_A.weight") for k in sd)
    for i in range(3):
        sd[f"unet.down_blocks.7.attentions.{i}.proj_in.lora_A.weight"] = torch.randn(4, 32)
        sd[f"unet.down_blocks.7.attentions.{i}.proj_in.lora_B.weight"] = torch.randn(32, 4)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoraError, match=rf"3 of {n + 3} modules .*down_blocks.7.attentions.0.proj_in"):
        fuse_loras(pipe, [LoraSpec(path, 1.0)])


def test_unprefixed_peft_keys_load_nothing_and_are_reported(pipe, style, tmp_path):
    sd = {k.removeprefix("unet."): v for k, v in load_file(str(style)).items() if k.startswith("unet.")}
    n = sum(k.endswith(".lora_A.weight") for k in sd)
    path = tmp_path / "bare.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoraError, match=rf"{n} of {n} modules"):
        fuse_loras(pipe, [LoraSpec(path, 1.0)])


# ------------------------------------------------------------------------------------------- errors

def test_missing_file(pipe, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        fuse_loras(pipe, [LoraSpec(tmp_path / "nope.safetensors", 1.0)])


def test_pickle_refused_unless_allowed(tiny_model, style, tmp_path):
    path = tmp_path / "style.pt"
    torch.save(load_file(str(style)), path)
    pipe = load_pipe(tiny_model)
    with pytest.raises(LoraError, match="allow_pickle"):
        fuse_loras(pipe, [LoraSpec(path, 1.0)])
    expected = reference_fused(pipe, [(style, 0.7)])
    [rec] = fuse_loras(pipe, [LoraSpec(path, 0.7)], allow_pickle=True)
    assert rec["format"] == "peft" and rec["modules"]["text_encoder"] > 0
    assert_fused_like(pipe, expected)


def test_not_a_lora_names_its_keys(pipe, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2), "conv_in.bias": torch.zeros(2)}, str(path))
    with pytest.raises(LoraError, match=r"2 of 2 keys are not LoRA keys .*conv_in\."):
        fuse_loras(pipe, [LoraSpec(path, 1.0)])


@pytest.mark.parametrize("down, up", [
    (torch.zeros(0, 8), torch.zeros(8, 0)),  # rank 0
    (torch.zeros(4, 0), torch.zeros(8, 4)),  # no input features
    (torch.zeros(4), torch.zeros(8, 4)),  # a vector
    (torch.zeros(4, 8, 3, 3), torch.zeros(8, 4, 3, 3)),  # up is not 1x1
], ids=["rank-0", "empty", "1-d", "up-3x3"])
def test_factors_that_are_no_lora_module_are_refused(pipe, tmp_path, down, up):
    path = tmp_path / "bad.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up}, str(path))
    with pytest.raises(LoraError, match=r"lora_unet_conv_in has factors of shapes .*every size at least 1"):
        fuse_loras(pipe, [LoraSpec(path, 1.0)])


@pytest.mark.parametrize("tensor, problem", [
    ({"lora_unet_conv_in.lora_down.weight": torch.full((4, 8), math.nan)}, "NaN or infinite"),
    ({"lora_unet_conv_in.alpha": torch.ones(2)}, "alpha of shape"),
], ids=["nan", "alpha-vector"])
def test_damaged_values_are_refused(pipe, tmp_path, tensor, problem):
    sd = {"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 8), "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 4)}
    path = tmp_path / "bad.safetensors"
    save_file({**sd, **tensor}, str(path))
    with pytest.raises(LoraError, match=problem):
        fuse_loras(pipe, [LoraSpec(path, 1.0)])


@pytest.mark.parametrize("metadata, problem", [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"unet.lora_alpha": "8"}', "expected a finite number"),
    ('{"unet.lora_alpha": 8, "unet.use_rslora": "yes"}', "expected true or false"),
    ('{"unet.lora_alpha": 8, "unet.alpha_pattern": {"conv_in": "x"}}', r"expected an object of \{module pattern"),
    ('{"unet.lora_alpha": 8, "unet.alpha_pattern": {"conv_(in": 4}}', "not a regular expression"),
], ids=["json", "list", "alpha-string", "rslora-string", "pattern-value", "pattern-regex"])
def test_bad_adapter_metadata_is_refused(pipe, style, tmp_path, metadata, problem):
    sd = load_file(str(style))
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": metadata})
    with pytest.raises(LoraError, match=problem):
        fuse_loras(pipe, [LoraSpec(path, 1.0)])


def test_sdxl_shaped_lora_on_sd15(pipe, tmp_path):
    # SD1.5 names, SDXL shapes (cross-attention dim 2048): peft raises a size mismatch deep inside
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, mod in pipe.unet.named_modules():
        if name.endswith("attn2.to_k"):
            key = "lora_unet_" + name.replace(".", "_")
            sd[key + ".lora_down.weight"] = torch.randn(4, 2048, generator=g).half()
            sd[key + ".lora_up.weight"] = torch.randn(mod.weight.shape[0], 4, generator=g).half()
            sd[key + ".alpha"] = torch.tensor(4.0).half()
    n = len(sd) // 3
    path = tmp_path / "sdxl.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoraError, match=rf"sdxl.safetensors.*{n} of {n} modules in the file fit no layer.*SDXL"):
        fuse_loras(pipe, [LoraSpec(path, 1.0)])
    assert not lora_layers(pipe)


def test_sdxl_named_lora_on_sd15(pipe, tmp_path):
    sd = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
          "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4)}
    path = tmp_path / "sdxl-named.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoraError, match="could not load LoRA 'sdxl-named'"):
        fuse_loras(pipe, [LoraSpec(path, 1.0)])


def test_same_name_twice(pipe, lcm, style):
    with pytest.raises(InputError, match="share the name 'x'"):
        fuse_loras(pipe, [LoraSpec(lcm, 1.0, "x"), LoraSpec(style, 1.0, "x")])


def test_refuses_to_fuse_twice(pipe, style):
    fuse_loras(pipe, [LoraSpec(style, 1.0)])
    with pytest.raises(LoraError, match="applied twice"):
        fuse_loras(pipe, [LoraSpec(style, 1.0, "again")])


@pytest.mark.parametrize("weight", [math.nan, math.inf, "heavy"])
def test_weight_must_be_finite(weight):
    with pytest.raises(InputError, match="weight"):
        LoraSpec(Path("a.safetensors"), weight)


def test_role_checked():
    with pytest.raises(InputError, match="role"):
        LoraSpec(Path("a.safetensors"), 1.0, role="refiner")


@pytest.mark.parametrize("text, path, weight, name", [
    ("loras/papercut.safetensors", "loras/papercut.safetensors", 1.0, "papercut"),
    ("loras/papercut.safetensors:0.8", "loras/papercut.safetensors", 0.8, "papercut"),
    ("paper=loras/papercut.safetensors:-0.5", "loras/papercut.safetensors", -0.5, "paper"),
    ("paper=loras/papercut.safetensors", "loras/papercut.safetensors", 1.0, "paper"),
    ("/data/run:3/style.safetensors", "/data/run:3/style.safetensors", 1.0, "style"),
    ("/data/run:3/style.safetensors:1e-1", "/data/run:3/style.safetensors", 0.1, "style"),
    ("/data/a=b/style.safetensors", "/data/a=b/style.safetensors", 1.0, "style"),
])
def test_parse_lora_arg(text, path, weight, name):
    spec = parse_lora_arg(text, role="style")
    assert (spec.path, spec.weight, spec.name, spec.role) == (Path(path), weight, name, "style")


def test_parse_lora_arg_errors():
    assert parse_lora_arg("lcm.safetensors", role="lcm").role == "lcm"
    with pytest.raises(InputError):
        parse_lora_arg("   ", role="style")
    with pytest.raises(InputError, match="finite"):
        parse_lora_arg("a.safetensors:nan", role="style")


def test_alpha_from_diffusers_metadata(pipe, style, tmp_path):
    # diffusers-saved peft files keep lora_alpha in the safetensors header, not in keys
    import json

    sd = load_file(str(style))
    rank = next(v for k, v in sd.items() if k.endswith(".lora_A.weight")).shape[0]
    meta = {}
    for comp in ("unet", "text_encoder"):
        targets = sorted({k[len(comp) + 1:].split(".lora_")[0].removeprefix("text_model.")
                          for k in sd if k.startswith(comp + ".")})
        meta.update({f"{comp}.r": rank, f"{comp}.lora_alpha": 3 * rank, f"{comp}.target_modules": targets})
    path = tmp_path / "style-meta.safetensors"
    save_file(sd, str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    expected = reference_fused(pipe, [(style, 3.0)])  # alpha = 3 * rank is weight 3 at alpha = rank

    [rec] = fuse_loras(pipe, [LoraSpec(path, 1.0)])
    assert rec["alphas"] == [3.0 * rank]
    assert_fused_like(pipe, expected)
