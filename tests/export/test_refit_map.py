"""The refit map of `lcmrt.export.adapters`: derived by value, checked against the graphs and the torch weights."""
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lcmrt.errors import AdapterError
from lcmrt.manifest import file_sha256


from tiny_engines import build_tiny_engine  # noqa: E402


@pytest.fixture(scope="module")
def manifest(tiny_refit_engine):
    return json.loads((tiny_refit_engine / "manifest.json").read_text())


@pytest.fixture(scope="module")
def lcm_fused_weights(tiny_model):
    """{module: weight} of the tiny model with the LCM-LoRA fused at 1.0: the base the refit folder holds."""
    from lcmrt.export.adapters import module_weights
    from lcmrt.export.build import library_output_silenced
    from lcmrt.export.loading import load_model
    from lcmrt.export.lora import LoraSpec, fuse_loras

    with library_output_silenced():
        pipe = load_model(str(tiny_model["model"])).pipe
        fuse_loras(pipe, [LoraSpec(tiny_model["lcm_lora"], weight=1.0, name="lcm", role="lcm")])
    return {m: w.numpy().copy() for m, w in module_weights(pipe).items()}


def test_every_adapter_target_is_mapped(manifest):
    style = next(a for a in manifest["adapters"] if a["name"] == "style")
    assert not style["fused"] and style["targets"]
    assert {c for c in (t.split(".")[0] for t in style["targets"])} == {"unet", "text_encoder"}
    assert set(style["targets"]) <= set(manifest["refit_map"])
    assert not any("base_layer" in m or "lora_" in m for m in manifest["refit_map"])


def test_entries_hold_the_graph_initializer_and_the_fused_torch_weight(tiny_refit_engine, manifest,
                                                                         lcm_fused_weights):
    refit_map = manifest["refit_map"]
    assert set(refit_map) == set(lcm_fused_weights)  # every Linear/Conv2d weight of UNet and text encoder
    for comp in ("text_encoder", "unet"):
        graph = onnx.load(str(tiny_refit_engine / manifest["components"][comp]["file"]))  # with external data
        inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
        entries = {m: e for m, e in refit_map.items() if e["component"] == comp}
        assert entries
        assert len({e["weight"] for e in entries.values()}) == len(entries)  # one graph weight per module
        for module, e in entries.items():
            torch_w = lcm_fused_weights[module]
            assert e["shape"] == list(torch_w.shape), module
            layout = torch_w.T if e["transpose"] else torch_w
            assert e["dtype"] == "float32" and e["length"] == layout.nbytes, module
            raw = (tiny_refit_engine / e["file"]).read_bytes()[e["offset"]:e["offset"] + e["length"]]
            stored = np.frombuffer(raw, np.float32).reshape(layout.shape)
            assert np.array_equal(stored, inits[e["weight"]]), module
            assert np.array_equal(stored, layout), module
    # constant folding stores the text encoder's Linear weights transposed; both layouts must occur
    assert {e["transpose"] for e in refit_map.values()} == {True, False}


def test_graph_hashes_match_the_rewritten_files(tiny_refit_engine, manifest):
    for comp in ("text_encoder", "unet"):
        hashes = manifest["components"][comp]["sha256"]
        assert f"{manifest['components'][comp]['file']}.data" in hashes  # the map points into external data
        for name, digest in hashes.items():
            assert file_sha256(tiny_refit_engine / name) == digest, name


def test_adapter_pack_keys_are_the_targets(tiny_refit_engine, manifest):
    from safetensors.numpy import load_file

    style = next(a for a in manifest["adapters"] if a["name"] == "style")
    tensors = load_file(str(tiny_refit_engine / style["pack"]))
    assert {k.rsplit(".", 1)[0] for k in tensors} == set(style["targets"])


def test_a_perturbed_targeted_weight_fails_the_build_naming_the_module(tiny_model, tmp_path, monkeypatch):
    """An exporter that changes a targeted weight (here: adds to it) leaves no graph weight equal to the
    module's weight: the build must fail naming the module, and leave no partial folder."""
    from lcmrt.export import onnx_export

    target = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    original = onnx_export.export_component

    def perturbing_export(spec, out_dir, vocab_size):
        if spec.name != "unet":
            return original(spec, out_dir, vocab_size)
        weight = spec.module.unet.get_submodule(target.removeprefix("unet.")).weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_(1e-3)
        try:
            return original(spec, out_dir, vocab_size)
        finally:
            with torch.no_grad():
                weight.copy_(saved)

    monkeypatch.setattr(onnx_export, "export_component", perturbing_export)
    out = tmp_path / "broken"
    with pytest.raises(AdapterError, match=target.replace(".", r"\.")):
        build_tiny_engine(tiny_model, out, refittable=True)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no hidden partial folder either
