"""Refittable adapters (`lcmrt/adapters.py`, `Pipeline.set_adapters`, `lcmrt adapter add/list`): parity with
fused folders, pristine-base refits, transactional swaps, refusals."""
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from lcmrt.cli import cli
from lcmrt.errors import AdapterError, LoraError
from lcmrt.images import read_png_metadata
from lcmrt.manifest import MANIFEST_NAME, load_manifest
from lcmrt.pipeline import Pipeline


from tiny_engines import CROSS_GRAPH_ATOL, STYLE_WEIGHT, build_tiny_engine, peft_copy  # noqa: E402

PROMPT = "a paper cut fox in the snow"
GUIDANCE = 1.5  # cfg: both the conditional and the unconditional text embeddings go through the refit weights
# The refit weight W_base + w * scale * up @ down is computed in numpy, the fused one by torch/peft; the two
# differ by a few float32 ulps of the weight, and run through different graphs (weights as inputs vs folded):
# float32 rounding only, measured <= 8e-7 on the tiny-model image.
PARITY_ATOL = CROSS_GRAPH_ATOL


def _images(pipe, prompt=PROMPT, **kwargs):
    """(image [1, H, W, 3], latents) for a fixed seed."""
    kwargs = {"guidance_scale": GUIDANCE, "seed": 0, "num_inference_steps": 4, **kwargs}
    return pipe(prompt, output="np", **kwargs), pipe(prompt, output="latent", **kwargs)


def _copy(folder, tmp_path_factory, name):
    out = tmp_path_factory.mktemp("adapter-folders") / name
    shutil.copytree(folder, out)
    return out


def _snapshot(folder):
    """Bytes of the manifest and of every file under adapters/."""
    files = {MANIFEST_NAME: (folder / MANIFEST_NAME).read_bytes()}
    if (folder / "adapters").is_dir():
        files.update({str(p.relative_to(folder)): p.read_bytes() for p in (folder / "adapters").iterdir()})
    files["entries"] = sorted(p.name for p in folder.iterdir())
    return files


@pytest.fixture(scope="module")
def fused_pipe(tiny_engine):
    """LCM 1.0 + style 0.8, both fused."""
    return Pipeline.load(tiny_engine)


@pytest.fixture
def pipe2(two_adapter_folder):
    return Pipeline.load(two_adapter_folder, adapters={"style": STYLE_WEIGHT})


def _spy_refits(pipe, monkeypatch):
    calls = []
    for component, session in pipe.sessions.items():
        original = session.refit

        def spy(weights, component=component, original=original):
            calls.append((component, frozenset(weights)))
            return original(weights)

        monkeypatch.setattr(session, "refit", spy)
    return calls


def _graph_weights(folder, modules):
    refit_map = load_manifest(folder)["refit_map"]
    by_component = {}
    for m in modules:
        by_component.setdefault(refit_map[m]["component"], set()).add(refit_map[m]["weight"])
    return by_component


# --- parity with fused folders ------------------------------------------------------------------------


def test_refit_to_style_matches_the_fused_folder(tiny_refit_engine, fused_pipe):
    pipe = Pipeline.load(tiny_refit_engine, adapters={})
    assert pipe.adapters == {"lcm": 1.0}
    pipe.set_adapters({"style": STYLE_WEIGHT})
    assert pipe.adapters == {"lcm": 1.0, "style": STYLE_WEIGHT} == fused_pipe.adapters
    got, got_latents = _images(pipe)
    want, want_latents = _images(fused_pipe)
    diff = float(np.abs(got - want).max())
    print(f"refit style {STYLE_WEIGHT} vs fused: max abs diff image {diff:.3g}, "
          f"latents {float(np.abs(got_latents - want_latents).max()):.3g}")
    assert diff <= PARITY_ATOL
    # loading with the set gives the same weights as switching to it
    loaded, _ = _images(Pipeline.load(tiny_refit_engine))
    assert np.array_equal(loaded, got)


def test_refit_at_half_weight_matches_a_folder_fused_at_half(tiny_refit_engine, tiny_model, tmp_path_factory):
    fused = Pipeline.load(build_tiny_engine(tiny_model, tmp_path_factory.mktemp("engines") / "fused-0.5",
                                            style_weight=0.5))
    pipe = Pipeline.load(tiny_refit_engine)
    pipe.set_adapters({"style": 0.5})
    got, want = _images(pipe)[0], _images(fused)[0]
    diff = float(np.abs(got - want).max())
    print(f"refit style 0.5 vs fused 0.5: max abs diff {diff:.3g}")
    assert diff <= PARITY_ATOL
    assert np.abs(got - _images(Pipeline.load(tiny_refit_engine))[0]).max() > 1e-3  # 0.5 is not 0.8


# --- pristine base: A -> B -> A, weight 0 -------------------------------------------------------------


def test_a_b_a_is_bitwise_a(pipe2):
    a, a_latents = _images(pipe2)
    pipe2.set_adapters({"lcm2": 0.5, "style2": 0.7})
    b, b_latents = _images(pipe2)
    assert pipe2.adapters == {"lcm": 1.0, "lcm2": 0.5, "style2": 0.7}
    assert np.abs(b - a).max() > 1e-3
    pipe2.set_adapters({"style": STYLE_WEIGHT})
    a2, a2_latents = _images(pipe2)
    assert np.array_equal(a2, a) and np.array_equal(a2_latents, a_latents)
    assert pipe2.adapters == {"lcm": 1.0, "style": STYLE_WEIGHT}


def test_weight_zero_is_no_adapter(two_adapter_folder, pipe2):
    none, none_latents = _images(Pipeline.load(two_adapter_folder, adapters={}))
    pipe2.set_adapters({"style": 0.0, "lcm2": 0.0})
    assert pipe2.adapters == {"lcm": 1.0}
    got, got_latents = _images(pipe2)
    assert np.array_equal(got, none) and np.array_equal(got_latents, none_latents)
    # added adapters start at weight 0: the default set is the built one
    assert Pipeline.load(two_adapter_folder).adapters == {"lcm": 1.0, "style": STYLE_WEIGHT}


# --- only changed weights are touched -------------------------------------------------------------------


def test_only_the_weights_that_change_are_refit(two_adapter_folder, monkeypatch):
    pipe = Pipeline.load(two_adapter_folder, adapters={})
    manifest = load_manifest(two_adapter_folder)
    targets = {a["name"]: a["targets"] for a in manifest["adapters"] if not a["fused"]}
    calls = _spy_refits(pipe, monkeypatch)
    pipe.encode_prompt(PROMPT)

    pipe.set_adapters({"lcm2": 0.5})  # UNet only: the text encoder and the prompt cache stay
    assert calls == [("unet", frozenset(_graph_weights(two_adapter_folder, targets["lcm2"])["unet"]))]
    assert PROMPT in pipe._prompt_cache

    calls.clear()
    pipe.set_adapters({"lcm2": 0.5})  # same set: nothing to do
    assert calls == []

    pipe.set_adapters({"lcm2": 0.5, "style2": 0.3})  # lcm2's own modules are not touched again
    expected = _graph_weights(two_adapter_folder, targets["style2"])
    assert dict(calls) == {c: frozenset(w) for c, w in expected.items()}
    assert [c for c, _ in calls] == ["text_encoder", "unet"]
    assert not pipe._prompt_cache


# --- transactional ---------------------------------------------------------------------------------------


def test_a_failure_mid_swap_keeps_the_old_set(pipe2, monkeypatch):
    before, before_latents = _images(pipe2)
    embeds = pipe2.encode_prompt(PROMPT)["encoder_hidden_states"].copy()
    adapters = pipe2.adapters
    calls = _spy_refits(pipe2, monkeypatch)

    def failing_refit(weights):
        calls.append(("unet", frozenset(weights)))
        raise RuntimeError("injected refit failure")

    monkeypatch.setattr(pipe2.sessions["unet"], "refit", failing_refit)
    with pytest.raises(AdapterError, match="injected refit failure"):
        pipe2.set_adapters({"style2": 1.0})
    # the text encoder is applied first, then the UNet failed; the text encoder was restored
    assert [c for c, _ in calls] == ["text_encoder", "unet", "text_encoder"]
    assert calls[0][1] == calls[2][1]
    assert pipe2.adapters == adapters
    pipe2._prompt_cache.clear()  # recompute the embeddings with the restored text encoder
    assert np.array_equal(pipe2.encode_prompt(PROMPT)["encoder_hidden_states"], embeds)
    after, after_latents = _images(pipe2)
    assert np.array_equal(after, before) and np.array_equal(after_latents, before_latents)

    monkeypatch.undo()  # the failure is gone: the same switch now works
    pipe2.set_adapters({"style2": 1.0})
    assert pipe2.adapters == {"lcm": 1.0, "style2": 1.0}


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_bad_pack_fails_before_any_weight_is_applied(two_adapter_folder, tmp_path_factory, monkeypatch,
                                                       damage):
    folder = _copy(two_adapter_folder, tmp_path_factory, f"bad-pack-{damage}")
    pipe = Pipeline.load(folder)
    before = _images(pipe)[0]
    pack = folder / "adapters" / "style2.safetensors"
    if damage == "missing":
        pack.unlink()
    else:
        pack.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header" + pack.read_bytes()[20:])
    calls = _spy_refits(pipe, monkeypatch)
    with pytest.raises(AdapterError, match="style2"):
        pipe.set_adapters({"style": STYLE_WEIGHT, "style2": 1.0})
    assert calls == []
    assert pipe.adapters == {"lcm": 1.0, "style": STYLE_WEIGHT}
    assert np.array_equal(_images(pipe)[0], before)


# --- refusals -----------------------------------------------------------------------------------------------


def test_refused_weight_changes(tiny_refit_engine):
    pipe = Pipeline.load(tiny_refit_engine)
    with pytest.raises(AdapterError, match="lcmrt adapter add"):
        pipe.set_adapters({"papercut": 0.8})
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(AdapterError, match="finite"):
            pipe.set_adapters({"style": bad})
    with pytest.raises(AdapterError, match="--refittable-lcm"):
        pipe.set_adapters({"style": 0.5, "lcm": 0.5})
    with pytest.raises(AdapterError, match="lcmrt adapter add"):
        Pipeline.load(tiny_refit_engine, adapters={"papercut": 0.8})
    assert pipe.adapters == {"lcm": 1.0, "style": STYLE_WEIGHT}
    pipe.set_adapters({"lcm": 1.0, "style": 0.5})  # the fused weight itself is accepted
    assert pipe.adapters == {"lcm": 1.0, "style": 0.5}


def test_add_to_a_folder_without_refit_map_is_refused(tiny_engine, tiny_model, tmp_path_factory):
    from lcmrt.export.adapters import add_adapter
    from lcmrt.export.lora import LoraSpec

    before = _snapshot(tiny_engine)
    with pytest.raises(AdapterError, match="--refittable"):
        add_adapter(tiny_engine, LoraSpec(peft_copy(tiny_model, tmp_path_factory, "x"), weight=0.0))
    assert _snapshot(tiny_engine) == before


def test_add_with_a_taken_name_is_refused(tiny_refit_engine, tiny_model):
    from lcmrt.export.adapters import add_adapter
    from lcmrt.export.lora import LoraSpec

    before = _snapshot(tiny_refit_engine)
    with pytest.raises(AdapterError, match="already has an adapter named 'style'"):
        add_adapter(tiny_refit_engine, LoraSpec(tiny_model["lcm_lora"], weight=0.0, name="style"))
    assert _snapshot(tiny_refit_engine) == before


def _sdxl_kohya_lora(path):
    """Kohya keys of SDXL modules (down_blocks.2 with 1280 channels), which the tiny SD1.5 UNet lacks."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {}
    for module in ("lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_q",
                   "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_k"):
        tensors[f"{module}.lora_down.weight"] = rng.standard_normal((4, 1280)).astype(np.float16)
        tensors[f"{module}.lora_up.weight"] = rng.standard_normal((1280, 4)).astype(np.float16)
        tensors[f"{module}.alpha"] = np.array(4.0, dtype=np.float16)
    save_file(tensors, str(path))
    return path


def test_add_of_another_architecture_is_refused_naming_modules(tiny_refit_engine, tmp_path_factory):
    from lcmrt.export.adapters import add_adapter
    from lcmrt.export.lora import LoraSpec

    folder = _copy(tiny_refit_engine, tmp_path_factory, "sdxl-refused")
    before = _snapshot(folder)
    path = _sdxl_kohya_lora(tmp_path_factory.mktemp("loras") / "sdxl.safetensors")
    with pytest.raises((AdapterError, LoraError)) as info:
        add_adapter(folder, LoraSpec(path, weight=0.0))
    assert "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q" in str(info.value)
    assert _snapshot(folder) == before


def test_add_of_modules_outside_the_refit_map_is_refused_naming_them(tiny_refit_engine, tiny_model,
                                                                       tmp_path_factory):
    from lcmrt.export.adapters import add_adapter
    from lcmrt.export.lora import LoraSpec
    from lcmrt.manifest import write_manifest

    folder = _copy(tiny_refit_engine, tmp_path_factory, "map-lacks")
    manifest = load_manifest(folder)
    # a folder whose map lacks the text encoder's attention projections (as if the exporter had merged them)
    dropped = sorted(m for m in manifest["refit_map"] if m.startswith("text_encoder.") and "self_attn" in m)
    manifest["refit_map"] = {m: e for m, e in manifest["refit_map"].items() if m not in dropped}
    write_manifest(folder, manifest)
    before = _snapshot(folder)
    with pytest.raises(AdapterError, match="no refittable weight") as info:
        add_adapter(folder, LoraSpec(peft_copy(tiny_model, tmp_path_factory, "style3"), weight=0.0))
    assert str(len(dropped)) in str(info.value) and dropped[0] in str(info.value)
    assert _snapshot(folder) == before
    assert not any(p.name.startswith(".adapter-") for p in folder.iterdir())


# --- --refittable-lcm ------------------------------------------------------------------------------------


def test_refittable_lcm_changes_the_lcm_weight(tiny_model, fused_pipe, tmp_path_factory):
    folder = build_tiny_engine(tiny_model, tmp_path_factory.mktemp("engines") / "refit-lcm",
                               refittable=True, refittable_lcm=True)
    manifest = load_manifest(folder)
    assert [a["fused"] for a in manifest["adapters"]] == [False, False]
    pipe = Pipeline.load(folder)
    assert pipe.adapters == {"lcm": 1.0, "style": STYLE_WEIGHT}
    full = _images(pipe)[0]
    diff = float(np.abs(full - _images(fused_pipe)[0]).max())
    print(f"--refittable-lcm at lcm 1.0 + style 0.8 vs fused: max abs diff {diff:.3g}")
    assert diff <= PARITY_ATOL
    pipe.set_adapters({"lcm": 0.5, "style": STYLE_WEIGHT})
    assert pipe.adapters == {"lcm": 0.5, "style": STYLE_WEIGHT}
    assert np.abs(_images(pipe)[0] - full).max() > 1e-3
    pipe.set_adapters({"lcm": 1.0, "style": STYLE_WEIGHT})
    assert np.array_equal(_images(pipe)[0], full)


# --- CLI ---------------------------------------------------------------------------------------------------


def test_cli_adapter_add_list_and_generate(tiny_refit_engine, tiny_model, tmp_path_factory):
    folder = _copy(tiny_refit_engine, tmp_path_factory, "cli")
    runner = CliRunner()
    kohya = runner.invoke(cli, ["adapter", "add", str(folder), str(tiny_model["lcm_lora"]), "--name", "lcm2"])
    assert kohya.exit_code == 0, kohya.output
    assert "'lcm2' (kohya" in kohya.output and "117 modules" in kohya.output
    peft_file = peft_copy(tiny_model, tmp_path_factory, "papercut")
    peft = runner.invoke(cli, ["adapter", "add", str(folder), str(peft_file)])
    assert peft.exit_code == 0, peft.output
    assert "'papercut'" in peft.output and "56 modules" in peft.output

    listed = runner.invoke(cli, ["adapter", "list", str(folder)])
    assert listed.exit_code == 0, listed.output
    lines = {line.split()[0]: line for line in listed.output.splitlines()}
    assert list(lines) == ["lcm", "style", "lcm2", "papercut"]
    assert "fused" in lines["lcm"] and "refittable" in lines["style"]
    assert "weight 0.8" in lines["style"] and "weight 0" in lines["papercut"]
    assert "unet 117" in lines["lcm2"] and "text_encoder 8" in lines["papercut"]

    refused = runner.invoke(cli, ["adapter", "add", str(folder), str(peft_file)])
    assert refused.exit_code == 2 and "already has an adapter named 'papercut'" in refused.output

    out = tmp_path_factory.mktemp("png") / "cat.png"
    result = runner.invoke(cli, ["generate", str(folder), PROMPT, "--adapter", "papercut:0.6", "--adapter",
                                 "lcm2:0.25", "--seed", "0", "--steps", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    adapters = read_png_metadata(out)["adapters"]
    assert adapters == {"lcm": 1.0, "lcm2": 0.25, "papercut": 0.6}
    pipe = Pipeline.load(folder, adapters={"papercut": 0.6, "lcm2": 0.25})
    assert adapters == pipe.adapters
    assert np.array_equal(np.asarray(pipe(PROMPT, seed=0, num_inference_steps=2)[0]),
                          np.asarray(__import__("PIL.Image").Image.open(out).convert("RGB")))

    unknown = runner.invoke(cli, ["generate", str(folder), PROMPT, "--adapter", "nope:1", "-o", str(out)])
    assert unknown.exit_code == 2 and "lcmrt adapter add" in unknown.output
