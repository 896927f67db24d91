"""`lcmrt build` (lcmrt.export.build) on the tiny random SD1.5 model: the engine folder's manifest, every
graph against an independently fused torch pipeline, build variants, atomicity and the CLI's output."""
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from lcmrt.errors import ExportError  # noqa: E402
from lcmrt.families import FAMILIES  # noqa: E402
from lcmrt.manifest import file_sha256  # noqa: E402


from tiny_engines import STYLE_WEIGHT, TINY_HEIGHT, TINY_WIDTH, build_tiny_engine  # noqa: E402

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# onnxruntime vs torch in fp32 on the tiny model: measured 1e-6..7e-6 (FIELD-NOTES.md); a wrong graph is off
# by order 1, a fused-LoRA mix-up by >= 1e-3.
GRAPH_ATOL = 1e-4
TEST_SEED = 20261122  # not the build's validation seed: fresh inputs


def manifest_of(folder):
    return json.loads((Path(folder) / "manifest.json").read_text())


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def session(folder, component):
    return ort.InferenceSession(str(Path(folder) / f"{component}.onnx"), providers=["CPUExecutionProvider"])


def no_partial_siblings(out):
    return not [p.name for p in Path(out).parent.iterdir() if p.name.startswith(f".{Path(out).name}.")]


@pytest.fixture(scope="module")
def manifest(tiny_engine):
    return manifest_of(tiny_engine)


@pytest.fixture(scope="module")
def fused_pipe(tiny_model):
    """The tiny model with LCM-LoRA (1.0) and style LoRA fused through diffusers directly, not lcmrt."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model["model"], dtype=torch.float32)
    pipe.load_lora_weights(str(tiny_model["lcm_lora"]), adapter_name="lcm")
    pipe.load_lora_weights(str(tiny_model["style_lora"]), adapter_name="style")
    pipe.set_adapters(["lcm", "style"], adapter_weights=[1.0, STYLE_WEIGHT])
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=["lcm", "style"])
    pipe.unload_lora_weights()
    return pipe


@pytest.fixture(scope="module")
def base_pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model["model"], dtype=torch.float32)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(TEST_SEED)


# ------------------------------------------------------------------------------------------ manifest

def test_manifest_top_level(manifest, tiny_model):
    assert manifest["format_version"] == 2
    assert manifest["family"] == "sd15"
    assert manifest["guidance_mode"] == "cfg"
    src = manifest["source"]
    assert src["kind"] == "diffusers" and src["id"] == str(Path(tiny_model["model"]).resolve())
    assert re.fullmatch(r"[0-9a-f]{64}", src["sha256"])
    assert manifest["shapes"] == {
        "batch": 1, "height": TINY_HEIGHT, "width": TINY_WIDTH, "latent_channels": 4,
        "latent_height": 16, "latent_width": 16, "text_length": 77, "unet_batch_sizes": [1, 2],
        "sizes": [[TINY_HEIGHT, TINY_WIDTH]]}
    assert manifest["vae"] == {"scaling_factor": 0.18215, "force_upcast": True}  # diffusers' default, as SD1.5's
    assert manifest["build"]["opset"] >= 18


def test_source_hash_covers_the_weights(manifest, tiny_model, tmp_path):
    # a diffusers folder's hash: every weight file, by relative name and content
    from lcmrt.export.loading import load_model

    model = Path(tiny_model["model"])
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    assert load_model(str(copy)).source["sha256"] == manifest["source"]["sha256"]
    vae = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(vae.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    vae.write_bytes(bytes(data))
    assert load_model(str(copy)).source["sha256"] != manifest["source"]["sha256"]


def test_scheduler_is_diffusers_lcm_from_the_model_config(manifest, tiny_model):
    from diffusers import LCMScheduler

    model_cfg = LCMScheduler.load_config(Path(tiny_model["model"]) / "scheduler")  # the model's own (PNDM)
    assert model_cfg["_class_name"] == "PNDMScheduler"
    expected = LCMScheduler.from_config(model_cfg).config
    sched = manifest["scheduler"]
    assert sched["class"] == "LCMScheduler"
    cfg = sched["config"]
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                "original_inference_steps", "timestep_scaling", "set_alpha_to_one", "steps_offset",
                "timestep_spacing", "clip_sample", "thresholding", "rescale_betas_zero_snr"):
        assert cfg[key] == expected[key], key
    assert (cfg["num_train_timesteps"], cfg["beta_schedule"], cfg["original_inference_steps"],
            cfg["timestep_scaling"], cfg["prediction_type"]) == (1000, "scaled_linear", 50, 10.0, "epsilon")
    # the recorded config rebuilds the same sampler
    ours, theirs = LCMScheduler.from_config(cfg), LCMScheduler.from_config(model_cfg)
    for s in (ours, theirs):
        s.set_timesteps(4)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() == [999, 759, 499, 259]
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


def test_tokenizer_files_load_with_tokenizers(manifest, tiny_engine, base_pipe):
    from tokenizers import Tokenizer

    entry = manifest["tokenizer"]
    tok = base_pipe.tokenizer
    assert entry == {"path": "tokenizer", "max_length": 77, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "sha256": {"tokenizer/tokenizer.json": file_sha256(Path(tiny_engine) / "tokenizer/tokenizer.json")}}
    fast = Tokenizer.from_file(str(Path(tiny_engine) / entry["path"] / "tokenizer.json"))
    prompt = "a photo of a cat sitting on a wooden table, papercut art"
    ids = fast.encode(prompt).ids
    assert ids == tok(prompt).input_ids
    assert ids[0] == entry["bos_token_id"] and ids[-1] == entry["eos_token_id"]


def test_adapters_record_what_was_fused(manifest, tiny_model):
    lcm, style = manifest["adapters"]
    assert (lcm["name"], lcm["role"], lcm["weight"], lcm["fused"], lcm["format"]) == ("lcm", "lcm", 1.0, True, "kohya")
    assert (style["name"], style["role"], style["weight"], style["fused"], style["format"]) == \
        ("style", "style", STYLE_WEIGHT, True, "peft")
    assert lcm["sha256"] == sha256(tiny_model["lcm_lora"]) and style["sha256"] == sha256(tiny_model["style_lora"])
    assert lcm["modules"]["unet"] > 100 and lcm["modules"]["text_encoder"] == 0
    assert style["modules"]["unet"] > 0 and style["modules"]["text_encoder"] > 0
    assert lcm["ranks"] == [8] and lcm["alphas"] == [4.0]
    assert all(0 <= a["max_fuse_error"] < 1e-5 for a in (lcm, style))


def test_components_files_and_hashes(manifest, tiny_engine):
    folder = Path(tiny_engine)
    comps = manifest["components"]
    assert list(comps) == list(COMPONENTS)
    for name, entry in comps.items():
        assert entry["file"] == f"{name}.onnx"
        assert entry["sha256"] == {entry["file"]: sha256(folder / entry["file"])}  # tiny: no external data
        assert entry["precision"] == "fp32"
        assert entry["parameters"] > 0 and entry["flops"] > 0
    # nothing else in the folder: no scratch export folders or partial files
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    # the graphs, ONNX Runtime's pre-optimized CPU graphs and the OpenVINO models, with their weights
    expected = {"manifest.json", *(f"{c}{suffix}" for c in COMPONENTS
                                   for suffix in (".onnx", ".ort-cpu.onnx", ".ort-cpu.onnx.data", ".openvino.xml",
                                                  ".openvino.bin"))}
    assert {f for f in files if not f.startswith("tokenizer/")} == expected
    assert "tokenizer/tokenizer.json" in files
    assert not [p for p in folder.rglob(".*")]


def test_manifest_io_specs_match_the_graphs(manifest, tiny_engine):
    for name, entry in manifest["components"].items():
        model = onnx.load(str(Path(tiny_engine) / entry["file"]), load_external_data=False)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
        graph_inputs = {i.name: dims(i) for i in model.graph.input}
        graph_outputs = {o.name: dims(o) for o in model.graph.output}
        assert graph_inputs == {i["name"]: i["shape"] for i in entry["inputs"]}, name
        assert graph_outputs == {o["name"]: o["shape"] for o in entry["outputs"]}, name
        assert all(o["dtype"] == "float32" for o in entry["outputs"])
        # static shapes everywhere except the UNet's cfg batch, which takes exactly the listed sizes
        symbolic = {d for shape in [*graph_inputs.values(), *graph_outputs.values()] for d in shape
                    if not isinstance(d, int) or d <= 0}
        if name == "unet":
            assert symbolic == {"unet_batch"} and entry["dim_values"] == {"unet_batch": [1, 2]}
        else:
            assert symbolic == set() and entry["dim_values"] == {}, name
    specs = manifest["components"]
    assert specs["text_encoder"]["inputs"] == [{"name": "input_ids", "shape": [1, 77], "dtype": "int64"}]
    assert specs["unet"]["inputs"] == [
        {"name": "sample", "shape": ["unet_batch", 4, 16, 16], "dtype": "float32"},
        {"name": "timestep", "shape": ["unet_batch"], "dtype": "float32"},  # one per sample
        {"name": "encoder_hidden_states", "shape": ["unet_batch", 77, 32], "dtype": "float32"}]
    assert specs["vae_decoder"]["outputs"][0]["shape"] == [1, 3, TINY_HEIGHT, TINY_WIDTH]
    assert [o["shape"] for o in specs["vae_encoder"]["outputs"]] == [[1, 4, 16, 16]] * 2


def test_validation_recorded(manifest):
    for name, entry in manifest["components"].items():
        v = entry["validation"]
        assert 0 <= v["max_abs_diff"] <= v["tolerance"], name
        assert v["max_abs_diff"] < 1e-4, name
        assert v["max_abs_reference"] > 0.1 and v["runtime"] == "onnxruntime-cpu"


def test_versions(manifest):
    v = manifest["versions"]
    for lib in ("torch", "diffusers", "peft", "transformers", "onnx", "onnxruntime"):
        assert v[lib] == metadata.version(lib)
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    import lcmrt

    assert v["lcmrt"] == lcmrt.__version__


def test_manifest_loads_and_verifies_in_the_runtime(tiny_engine):
    from lcmrt.manifest import load_manifest, verify_component

    manifest = load_manifest(tiny_engine)
    for name in COMPONENTS:
        assert verify_component(tiny_engine, manifest, name) == Path(tiny_engine) / f"{name}.onnx"


# ------------------------------------------------------------------------- each graph vs torch, anew

def test_text_encoder_graph_matches_fused_torch(tiny_engine, fused_pipe, base_pipe, rng):
    ids = rng.integers(0, fused_pipe.text_encoder.config.vocab_size, size=(1, 77), dtype=np.int64)
    prompt_ids = fused_pipe.tokenizer("a paper cut style landscape", padding="max_length", max_length=77,
                                      return_tensors="np").input_ids.astype(np.int64)
    sess = session(tiny_engine, "text_encoder")
    for x in (ids, prompt_ids):
        [got] = sess.run(None, {"input_ids": x})
        with torch.no_grad():
            want = fused_pipe.text_encoder(torch.from_numpy(x))[0].numpy()
            base = base_pipe.text_encoder(torch.from_numpy(x))[0].numpy()
        assert got.shape == (1, 77, 32)
        assert np.abs(got - want).max() < GRAPH_ATOL
        # the style LoRA's text-encoder part is in the graph
        assert np.abs(got - base).max() > 100 * GRAPH_ATOL


@pytest.mark.parametrize("batch", [1, 2])
def test_unet_graph_matches_fused_torch(tiny_engine, fused_pipe, base_pipe, rng, batch):
    sample = rng.standard_normal((batch, 4, 16, 16), dtype=np.float32)
    hidden = rng.standard_normal((batch, 77, 32), dtype=np.float32)
    sess = session(tiny_engine, "unet")
    for t in (999.0, 259.0):
        timestep = np.full(batch, t, dtype=np.float32)
        [got] = sess.run(None, {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden})
        args = (torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(hidden))
        with torch.no_grad():
            want = fused_pipe.unet(*args).sample.numpy()
            base = base_pipe.unet(*args).sample.numpy()
        assert got.shape == (batch, 4, 16, 16)
        assert np.abs(got - want).max() < GRAPH_ATOL
        assert np.abs(got - base).max() > 100 * GRAPH_ATOL  # LoRAs fused


def test_unet_graph_refuses_other_batches(tiny_engine):
    sess = session(tiny_engine, "unet")
    feed = {"sample": np.zeros((3, 4, 16, 16), np.float32), "timestep": np.zeros(3, np.float32),
            "encoder_hidden_states": np.zeros((3, 77, 32), np.float32)}
    try:
        [out] = sess.run(None, feed)
    except Exception:
        return  # the graph rejects it: fine
    assert out.shape[0] == 3  # or runs it correctly; the runtime only ever feeds the listed sizes


def test_vae_decoder_graph_includes_the_scaling_factor(tiny_engine, fused_pipe, rng):
    latents = rng.standard_normal((1, 4, 16, 16), dtype=np.float32)
    [got] = session(tiny_engine, "vae_decoder").run(None, {"latents": latents})
    vae = fused_pipe.vae
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor).sample.numpy()
        unscaled = vae.decode(torch.from_numpy(latents)).sample.numpy()
    assert got.shape == (1, 3, TINY_HEIGHT, TINY_WIDTH)
    assert np.abs(got - want).max() < GRAPH_ATOL
    assert np.abs(got - unscaled).max() > 100 * GRAPH_ATOL


def test_vae_encoder_graph_gives_latent_mean_and_std(tiny_engine, fused_pipe, rng):
    image = rng.uniform(-1, 1, size=(1, 3, TINY_HEIGHT, TINY_WIDTH)).astype(np.float32)
    mean, std = session(tiny_engine, "vae_encoder").run(["latent_mean", "latent_std"], {"image": image})
    with torch.no_grad():
        dist = fused_pipe.vae.encode(torch.from_numpy(image)).latent_dist
    assert mean.shape == std.shape == (1, 4, 16, 16)
    assert np.abs(mean - dist.mean.numpy()).max() < GRAPH_ATOL
    assert np.abs(std - dist.std.numpy()).max() < GRAPH_ATOL
    assert (std > 0).all()


def test_external_data_above_threshold(fused_pipe, tmp_path, monkeypatch):
    # a graph over the protobuf limit keeps its weights in one `.onnx.data` file; shrink the limit to see it
    from lcmrt.engines import graphs
    from lcmrt.export import onnx_export

    monkeypatch.setattr(graphs, "EXTERNAL_DATA_THRESHOLD", 1000)
    [spec] = [s for s in onnx_export.component_exports(fused_pipe, {
        "batch": 1, "latent_height": 16, "latent_width": 16, "latent_channels": 4, "text_length": 77,
        "height": TINY_HEIGHT, "width": TINY_WIDTH, "unet_batch_sizes": [1], "sizes": [[TINY_HEIGHT, TINY_WIDTH]]},
        FAMILIES["sd15"]) if s.name == "text_encoder"]
    entry = onnx_export.export_component(spec, tmp_path, vocab_size=fused_pipe.text_encoder.config.vocab_size)
    assert entry["file"] == "text_encoder.onnx"
    assert set(entry["sha256"]) == {"text_encoder.onnx", "text_encoder.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text_encoder.onnx", "text_encoder.onnx.data"]
    assert (tmp_path / "text_encoder.onnx").stat().st_size < (tmp_path / "text_encoder.onnx.data").stat().st_size
    assert entry["validation"]["max_abs_diff"] < GRAPH_ATOL


def test_validation_failure_fails_the_component(fused_pipe, tmp_path, monkeypatch):
    # a graph that differs from torch over tolerance is a build error
    from lcmrt.export import onnx_export

    monkeypatch.setattr(onnx_export, "VALIDATION_RTOL", 0.0)
    [spec] = [s for s in onnx_export.component_exports(fused_pipe, {
        "batch": 1, "latent_height": 16, "latent_width": 16, "latent_channels": 4, "text_length": 77,
        "height": TINY_HEIGHT, "width": TINY_WIDTH, "unet_batch_sizes": [1], "sizes": [[TINY_HEIGHT, TINY_WIDTH]]},
        FAMILIES["sd15"]) if s.name == "vae_decoder"]
    with pytest.raises(ExportError, match=r"vae_decoder graph differs from the torch module by .*tolerance 0"):
        onnx_export.export_component(spec, tmp_path, vocab_size=fused_pipe.text_encoder.config.vocab_size)


# ----------------------------------------------------------------- variants, through the CLI, --quiet

@pytest.fixture(scope="module")
def none_engine(tiny_model, tmp_path_factory):
    """guidance none, --batch 2, LCM-LoRA at 0.5, built by the installed CLI in a fresh process with --quiet."""
    out = tmp_path_factory.mktemp("engines") / "none-b2"
    cmd = [sys.executable, "-m", "lcmrt", "build", str(tiny_model["model"]), "--lcm-lora", str(tiny_model["lcm_lora"]),
           "--lcm-weight", "0.5", "--lora", f"style={tiny_model['style_lora']}:{STYLE_WEIGHT}",
           "--height", str(TINY_HEIGHT), "--width", str(TINY_WIDTH), "--batch", "2", "--guidance-mode", "none",
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    return out, proc


def test_quiet_prints_nothing(none_engine):
    out, proc = none_engine
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # no progress, no summary, no library chatter
    assert (out / "manifest.json").is_file()


def test_guidance_none_batch_2_shapes(none_engine):
    out, _ = none_engine
    m = manifest_of(out)
    assert m["guidance_mode"] == "none"
    assert m["shapes"]["batch"] == 2 and m["shapes"]["unet_batch_sizes"] == [2]
    comps = m["components"]
    assert comps["unet"]["dim_values"] == {}
    for name, entry in comps.items():
        model = onnx.load(str(out / entry["file"]), load_external_data=False)
        for vi in [*model.graph.input, *model.graph.output]:
            assert all(isinstance(d, int) and d > 0 for d in dims(vi)), (name, vi.name, dims(vi))
    unet = onnx.load(str(out / "unet.onnx"), load_external_data=False)
    assert {i.name: dims(i) for i in unet.graph.input} == {
        "sample": [2, 4, 16, 16], "timestep": [2], "encoder_hidden_states": [2, 77, 32]}
    assert dims(unet.graph.output[0]) == [2, 4, 16, 16]
    assert comps["text_encoder"]["inputs"][0]["shape"] == [1, 77]  # prompts are encoded one at a time
    assert comps["vae_decoder"]["inputs"][0]["shape"] == [2, 4, 16, 16]
    assert comps["vae_decoder"]["outputs"][0]["shape"] == [2, 3, TINY_HEIGHT, TINY_WIDTH]
    assert comps["vae_encoder"]["inputs"][0]["shape"] == [2, 3, TINY_HEIGHT, TINY_WIDTH]
    for entry in comps.values():
        assert entry["validation"]["max_abs_diff"] < 1e-4


def test_guidance_none_unet_runs_at_its_batch(none_engine, rng):
    out, _ = none_engine
    sess = session(out, "unet")
    feed = {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32), "timestep": np.array([499.0, 499.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    assert sess.run(None, feed)[0].shape == (2, 4, 16, 16)
    feed = {k: v[:1] for k, v in feed.items()}
    with pytest.raises(Exception):  # static batch 2
        sess.run(None, feed)


def test_lcm_weight_changes_the_unet(none_engine, tiny_engine, manifest, rng):
    out, _ = none_engine
    m = manifest_of(out)
    assert [(a["name"], a["weight"]) for a in m["adapters"]] == [("lcm", 0.5), ("style", STYLE_WEIGHT)]
    assert m["source"] == manifest["source"]
    # same work per call at the largest batch: cfg batch 1 and plain batch 2 both run the UNet on 2 latents
    assert m["components"]["unet"]["flops"] == manifest["components"]["unet"]["flops"]
    feed = {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32), "timestep": np.array([759.0, 759.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    [half] = session(out, "unet").run(None, feed)
    [full] = session(tiny_engine, "unet").run(None, feed)
    assert np.abs(half - full).max() > 1e-2
    # the text encoder only carries the style LoRA, at the same weight in both folders
    ids = {"input_ids": rng.integers(0, 700, size=(1, 77), dtype=np.int64)}
    np.testing.assert_allclose(session(out, "text_encoder").run(None, ids)[0],
                               session(tiny_engine, "text_encoder").run(None, ids)[0], atol=1e-6)


def test_summary_and_overwrite(tiny_model, tiny_engine, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lcmrt.cli import cli

    monkeypatch.setenv("COLUMNS", "400")  # rich would wrap the long temporary path otherwise
    out = tmp_path / "engine"
    shutil.copytree(tiny_engine, out)
    (out / "stale.txt").write_text("from an older build")
    result = CliRunner().invoke(cli, [
        "build", str(tiny_model["model"]), "--lcm-lora", str(tiny_model["lcm_lora"]),
        "--height", "64", "--width", "64", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    # replaced fully: nothing of the old folder is left
    assert not (out / "stale.txt").exists()
    m = manifest_of(out)
    assert m["shapes"]["height"] == 64 and m["guidance_mode"] == "none"
    assert [a["name"] for a in m["adapters"]] == ["lcm"]
    assert no_partial_siblings(out)

    text = result.stderr
    assert result.stdout == ""  # progress and summary go to stderr; stdout stays clean for scripts
    assert f"engine folder: {out}" in text
    for stage in ("load model", "fuse LoRAs", *(f"export {c}" for c in COMPONENTS)):
        assert f"done {stage}" in text
    for name, entry in m["components"].items():
        size_mb = sum((out / f).stat().st_size for f in entry["sha256"]) / 1e6
        row = next(line for line in text.splitlines() if re.search(rf"\b{name}\b", line) and "│" in line)
        assert f"{size_mb:.1f}" in row and f"{entry['validation']['max_abs_diff']:.2e}" in row, row
    assert re.search(r"adapters: lcm:1\b", text)


# ---------------------------------------------------------------------------------------- atomicity

def _fail_at_unet(monkeypatch, exc):
    """export_component that exports the text encoder as usual, then raises `exc` on the UNet."""
    from lcmrt.export import onnx_export

    real = onnx_export.export_component
    seen = {}

    def export_component(spec, out_dir, **kwargs):
        if spec.name == "unet":
            seen["dir"], seen["files"] = Path(out_dir), sorted(p.name for p in Path(out_dir).iterdir())
            raise exc
        return real(spec, out_dir, **kwargs)

    monkeypatch.setattr(onnx_export, "export_component", export_component)
    return seen


@pytest.mark.parametrize("exc", [ExportError("injected"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_build_leaves_nothing(tiny_model, tmp_path, monkeypatch, exc):
    out = tmp_path / "engine"
    seen = _fail_at_unet(monkeypatch, exc)
    with pytest.raises(type(exc)):
        build_tiny_engine(tiny_model, out, style_weight=None)
    # the failure was mid-build: a graph had been written, into the hidden sibling
    assert seen["dir"].parent == tmp_path and seen["dir"].name.startswith(".engine.partial-")
    assert "text_encoder.onnx" in seen["files"]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_folder(tiny_model, tiny_engine, tmp_path, monkeypatch):
    out = tmp_path / "engine"
    shutil.copytree(tiny_engine, out)
    before = {str(p.relative_to(out)): sha256(p) for p in out.rglob("*") if p.is_file()}
    _fail_at_unet(monkeypatch, ExportError("injected"))
    with pytest.raises(ExportError, match="injected"):
        build_tiny_engine(tiny_model, out, style_weight=None, overwrite=True)
    assert {str(p.relative_to(out)): sha256(p) for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]


# ----------------------------------------------------------------------------- one build API for every option

def test_build_request_builds_variants_in_one_call(tiny_model, tmp_path):
    """Everything `lcmrt build` can add (CPU graphs, OpenVINO models, fp16, int8 for ONNX Runtime and OpenVINO) is
    reachable from Python in one request."""
    from lcmrt.engines.build import EngineRequest

    out = tmp_path / "engine"
    build_tiny_engine(tiny_model, out, style_weight=None, engines=EngineRequest(fp16=True, int8=True))
    components = manifest_of(out)["components"]
    assert set(components["unet"]["variants"]) == {"ort-cpu", "openvino", "fp16", "int8", "openvino-int8"}
    assert set(components["text_encoder"]["variants"]) == {"ort-cpu", "openvino", "fp16"}
    assert "fp16" not in components["vae_decoder"]["variants"]  # only on request (fp16_vae)
    for entry in (components["unet"]["variants"][v] for v in ("fp16", "int8", "openvino-int8")):
        assert entry["fidelity"]["finite"] and (out / entry["file"]).is_file()


def test_failed_variant_step_leaves_no_folder(tiny_model, tmp_path, monkeypatch):
    """fp16/int8/TensorRT steps run inside the hidden folder: a failure there removes it like any other."""
    from lcmrt.engines import quantize
    from lcmrt.engines.build import EngineRequest

    def fail(*args, **kwargs):
        raise ExportError("injected")

    monkeypatch.setattr(quantize, "quantize_folder", fail)
    with pytest.raises(ExportError, match="injected"):
        build_tiny_engine(tiny_model, tmp_path / "engine", style_weight=None, engines=EngineRequest(int8=True))
    assert list(tmp_path.iterdir()) == []


def test_build_request_checks_engine_options_before_exporting(tiny_model, tmp_path, monkeypatch):
    from lcmrt.engines.build import EngineRequest
    from lcmrt.errors import BackendError, InputError
    from lcmrt.export import build as export_build

    monkeypatch.setattr(export_build, "_build", lambda *a: pytest.fail("exported before checking the request"))
    with pytest.raises(InputError, match="--int8 replaces the UNet's weights"):
        build_tiny_engine(tiny_model, tmp_path / "a", refittable=True, engines=EngineRequest(int8=True))
    with pytest.raises(InputError, match="backend 'openvino' is not one of onnxruntime, tensorrt"):
        build_tiny_engine(tiny_model, tmp_path / "b", engines=EngineRequest(backend="openvino"))
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(BackendError, match="needs TensorRT and CuPy"):
            build_tiny_engine(tiny_model, tmp_path / "c", engines=EngineRequest(backend="tensorrt"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- --overwrite replaces engine folders only

def _build_cli(tiny_model, out, lcm_lora=None):
    from click.testing import CliRunner

    from lcmrt.cli import cli

    return CliRunner().invoke(cli, ["build", str(tiny_model["model"]), "--lcm-lora", str(lcm_lora or tiny_model["lcm_lora"]),
                                    "--height", "64", "--width", "64", "--out", str(out), "--overwrite"])


def _tree(folder):
    return {str(p.relative_to(folder)): sha256(p) for p in folder.rglob("*") if p.is_file()}


def test_overwrite_refuses_a_folder_that_is_not_an_engine_folder(tiny_model, tmp_path):
    out = tmp_path / "documents"
    (out / "taxes").mkdir(parents=True)
    (out / "taxes" / "2026.txt").write_text("keep me")
    before = _tree(out)
    result = _build_cli(tiny_model, out)
    assert result.exit_code == 2 and "--overwrite only replaces an lcmrt engine folder" in result.output
    assert _tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["documents"]


def test_overwrite_refuses_an_engine_folder_holding_an_input(tiny_model, tiny_engine, tmp_path):
    out = tmp_path / "engine"
    shutil.copytree(tiny_engine, out)
    lora = out / "lcm-lora.safetensors"
    shutil.copy(tiny_model["lcm_lora"], lora)
    before = _tree(out)
    result = _build_cli(tiny_model, out, lcm_lora=lora)
    assert result.exit_code == 2 and "holds the build's input" in result.output and str(lora) in result.output
    assert _tree(out) == before
