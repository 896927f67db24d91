"""Pre-optimized ONNX Runtime CPU graphs: written at build time, used only on a matching CPU, the same image
up to float32 rounding."""
import json
import shutil

import numpy as np
import pytest

import lcmrt
import lcmrt.backends.onnxruntime as ort_backend

from tiny_engines import CROSS_GRAPH_ATOL


def test_build_writes_keyed_cpu_graphs(tiny_engine):
    manifest = json.loads((tiny_engine / "manifest.json").read_text())
    for name, entry in manifest["components"].items():
        variant = entry["variants"]["ort-cpu"]
        assert variant["file"] == f"{name}.ort-cpu.onnx" and (tiny_engine / variant["file"]).is_file()
        assert variant["key"] == ort_backend.cpu_graph_key()


def test_pre_optimized_graphs_give_the_same_image(tiny_engine, monkeypatch):
    pipe = lcmrt.Pipeline.load(tiny_engine)
    assert all(s.path.name.endswith(".ort-cpu.onnx") for s in pipe.sessions.values())
    image = pipe("a fox", seed=4, output="np")
    # another CPU or ONNX Runtime version: the plain graphs, optimized at load
    monkeypatch.setattr(ort_backend, "cpu_graph_key", lambda: {"onnxruntime": "0.0", "machine": "x", "isa": []})
    plain = lcmrt.Pipeline.load(tiny_engine)
    assert all(s.path.name == f"{n}.onnx" for n, s in plain.sessions.items())
    # not bitwise: ONNX Runtime does not promise that the saved rewrite and the one made at load run the
    # same kernels in the same order
    np.testing.assert_allclose(plain("a fox", seed=4, output="np"), image, rtol=0, atol=CROSS_GRAPH_ATOL)


def test_refittable_components_keep_plain_graphs(tiny_refit_engine):
    manifest = json.loads((tiny_refit_engine / "manifest.json").read_text())
    assert "ort-cpu" not in manifest["components"]["unet"].get("variants", {})
    assert "ort-cpu" not in manifest["components"]["text_encoder"].get("variants", {})
    assert "ort-cpu" in manifest["components"]["vae_decoder"]["variants"]


def test_modified_optimized_graph_is_detected(tiny_engine, tmp_path):
    from lcmrt.errors import EngineFolderError

    folder = tmp_path / "engine"
    shutil.copytree(tiny_engine, folder)
    data = folder / "unet.ort-cpu.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(EngineFolderError, match="unet.ort-cpu.onnx.data"):
        lcmrt.Pipeline.load(folder)
