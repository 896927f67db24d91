"""refit="factors": adapters swap by binding their low-rank factors to the refit-factors graph at once, and a
background session with the merged weights baked in takes over (engines/lowrank_graph.py, refit_factors.py)."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import lcmrt
from lcmrt.errors import AdapterError, EngineFolderError
from lcmrt.manifest import REFIT_FACTORS, read_manifest

# The factor branch x D^T U^T against the merged weight x (W + U D)^T: float32 rounding only (the tiny UNet's
# activations are O(1); measured ~1e-6)
FACTOR_ATOL = 1e-5
KW = dict(seed=9, output="np", guidance_scale=1.5)


def _unet(pipe, feeds):
    return pipe.sessions["unet"].run(feeds)["noise_pred"]


@pytest.fixture(scope="module")
def two_adapter_engine(tiny_refit_engine, tiny_model, tmp_path_factory):
    """The tiny refit folder with a second adapter (the LCM-LoRA, added at weight 0): branches of two ranks."""
    from lcmrt.export.adapters import add_adapter
    from lcmrt.export.lora import LoraSpec

    folder = tmp_path_factory.mktemp("factors") / "engine"
    shutil.copytree(tiny_refit_engine, folder)
    add_adapter(folder, LoraSpec(tiny_model["lcm_lora"], name="lcm2"))
    return folder


@pytest.fixture(scope="module")
def unet_feeds(tiny_refit_engine):
    from benchmarks.refit_strategies import unet_feeds

    return unet_feeds(read_manifest(tiny_refit_engine))


def test_variant_is_recorded_with_the_adapters_ranks(two_adapter_engine):
    manifest = read_manifest(two_adapter_engine)
    packs = {a.name: load_file(str(two_adapter_engine / a.pack)) for a in manifest.adapters if not a.fused}
    for component in ("text_encoder", "unet"):
        variant = manifest.component(component).variants[REFIT_FACTORS]
        expected = {}
        for pack in packs.values():
            for key, down in pack.items():
                module = key.removesuffix(".down")
                if key.endswith(".down") and manifest.refit_map[module].component == component:
                    expected[module] = expected.get(module, 0) + down.shape[0]
        assert {m: f.rank for m, f in variant.factors.items()} == expected
    lcmrt.Pipeline.load(two_adapter_engine, refit="factors")  # every file verified against its hash


@pytest.mark.parametrize("adapters", [{"style": 0.8}, {"style": 0.0}, {"style": 0.3, "lcm2": 0.7},
                                      {"lcm2": 1.0}, {"style": -1.2, "lcm2": 0.0}])
def test_factor_path_matches_merged_weights(two_adapter_engine, unet_feeds, adapters, monkeypatch):
    from lcmrt.backends.onnxruntime import OrtSession

    monkeypatch.setattr(OrtSession, "_fuse_in_background", lambda self: None)  # runs stay on the factor graph
    factors = lcmrt.Pipeline.load(two_adapter_engine, refit="factors", adapters=adapters)
    merged = lcmrt.Pipeline.load(two_adapter_engine, refit="session", adapters=adapters)
    base = lcmrt.Pipeline.load(two_adapter_engine, refit="session", adapters={})
    assert factors.sessions["unet"].path.name.startswith("unet.refit-factors")
    got, want = _unet(factors, unet_feeds), _unet(merged, unet_feeds)
    np.testing.assert_allclose(got, want, rtol=0, atol=FACTOR_ATOL)
    if any(adapters.values()):  # the adapters reached the output
        assert np.abs(want - _unet(base, unet_feeds)).max() > 100 * FACTOR_ATOL
    np.testing.assert_allclose(factors("a fox", **KW), merged("a fox", **KW), rtol=0, atol=FACTOR_ATOL)


def test_swap_is_visible_at_once_and_settles_to_the_session_images(two_adapter_engine, unet_feeds):
    pipe = lcmrt.Pipeline.load(two_adapter_engine, refit="factors")
    assert pipe.settle(timeout=120)
    reference = {}
    for adapters in ({"style": 0.5, "lcm2": 0.5}, {"style": 0.8}):
        reference[str(adapters)] = lcmrt.Pipeline.load(two_adapter_engine, refit="session", adapters=adapters)
    first = pipe("a fox", **KW)
    np.testing.assert_array_equal(first, lcmrt.Pipeline.load(two_adapter_engine, refit="session")("a fox", **KW))
    pipe.set_adapters({"style": 0.5, "lcm2": 0.5})
    session = pipe.sessions["unet"]
    assert session._fused is None  # the swap runs on the factor graph until the background session is built
    np.testing.assert_allclose(_unet(pipe, unet_feeds), _unet(reference["{'style': 0.5, 'lcm2': 0.5}"], unet_feeds),
                               rtol=0, atol=FACTOR_ATOL)
    assert pipe.settle(timeout=120)
    np.testing.assert_array_equal(pipe("a fox", **KW), reference["{'style': 0.5, 'lcm2': 0.5}"]("a fox", **KW))
    pipe.set_adapters({"style": 0.8})  # A -> B -> A: the first set again, bit for bit, once settled
    assert pipe.settle(timeout=120)
    np.testing.assert_array_equal(pipe("a fox", **KW), first)


def test_failed_swap_keeps_the_previous_set(two_adapter_engine, unet_feeds, monkeypatch):
    pipe = lcmrt.Pipeline.load(two_adapter_engine, refit="factors", adapters={"style": 0.8})
    assert pipe.settle(timeout=120)
    before = _unet(pipe, unet_feeds)
    session = pipe.sessions["unet"]

    def broken(factors, merged):
        raise RuntimeError("bind failed")

    monkeypatch.setattr(session, "refit_factors", broken)
    with pytest.raises(AdapterError, match="previous set .*'style': 0.8.* is still active"):
        pipe.set_adapters({"style": 0.2, "lcm2": 1.0})
    monkeypatch.undo()
    assert pipe.adapters.get("style") == 0.8 and "lcm2" not in pipe.adapters
    assert pipe.settle(timeout=120)
    np.testing.assert_array_equal(_unet(pipe, unet_feeds), before)
    with pytest.raises(AdapterError, match="not in"):
        pipe.set_adapters({"nope": 1.0})
    np.testing.assert_array_equal(_unet(pipe, unet_feeds), before)


def test_outgrown_branch_names_the_rebuild(two_adapter_engine, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(two_adapter_engine, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    variant = manifest["components"]["unet"]["variants"][REFIT_FACTORS]
    module = sorted(variant["factors"])[0]
    del variant["factors"][module]  # as if the folder's adapters outgrew its refit-factors graph
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AdapterError, match=r"lcmrt build --engines-only .*engine"):
        lcmrt.Pipeline.load(folder, refit="factors", adapters={"style": 0.8, "lcm2": 0.5})


def test_engines_only_rewrites_a_stale_or_missing_variant(two_adapter_engine, tmp_path):
    from lcmrt.engines.build import EngineRequest, add_engines

    folder = tmp_path / "engine"
    shutil.copytree(two_adapter_engine, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    expected = {c: manifest["components"][c]["variants"][REFIT_FACTORS]["factors"] for c in ("text_encoder", "unet")}
    for component in expected:
        del manifest["components"][component]["variants"][REFIT_FACTORS]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineFolderError, match=r"lcmrt build --engines-only .*refit='background'"):
        lcmrt.Pipeline.load(folder, refit="factors")
    add_engines(folder, EngineRequest(ort_cpu_graphs=False, openvino=False, choose_backends=False))
    rebuilt = json.loads((folder / "manifest.json").read_text())["components"]
    assert {c: rebuilt[c]["variants"][REFIT_FACTORS]["factors"] for c in expected} == expected
    lcmrt.Pipeline.load(folder, refit="factors", adapters={"lcm2": 0.5})


def test_damaged_pack_fails_the_swap_not_the_image(two_adapter_engine, unet_feeds, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(two_adapter_engine, folder)
    pipe = lcmrt.Pipeline.load(folder, refit="factors", adapters={"style": 0.8})
    before = _unet(pipe, unet_feeds)
    pack = folder / "adapters" / "lcm2.safetensors"
    tensors = load_file(str(pack))
    save_file({k: v * 2 for k, v in tensors.items()}, str(pack))
    with pytest.raises(AdapterError, match="lcmrt adapter add"):
        pipe.set_adapters({"lcm2": 1.0})
    np.testing.assert_array_equal(_unet(pipe, unet_feeds), before)
