"""The two ways ONNX Runtime takes adapter weights: as graph inputs fed with every run (CPU default) or baked
into a re-created session. Same images either way (up to float32 rounding); inputs swap without a new session."""
import json
import shutil

import numpy as np
import pytest

import lcmrt
from lcmrt.errors import BackendError

from tiny_engines import CROSS_GRAPH_ATOL


def test_modes_give_the_same_images_and_inputs_keep_the_session(tiny_refit_engine):
    inputs = lcmrt.Pipeline.load(tiny_refit_engine)
    session = lcmrt.Pipeline.load(tiny_refit_engine, refit="session")
    assert inputs.sessions["unet"].path.name == "unet.refit-inputs.onnx"
    assert session.sessions["unet"].path.name == "unet.onnx"
    kw = dict(seed=9, output="np", guidance_scale=1.5)
    # two graphs (weights as inputs, or folded and pre-packed): equal up to float32 rounding, not bitwise
    previous = inputs("a fox", **kw)
    np.testing.assert_allclose(previous, session("a fox", **kw), rtol=0, atol=CROSS_GRAPH_ATOL)
    ort_session = inputs.sessions["unet"]._session
    for weight in (0.3, 1.2):
        inputs.set_adapters({"style": weight})
        session.set_adapters({"style": weight})
        image = inputs("a fox", **kw)
        assert np.abs(image - previous).max() > 100 * CROSS_GRAPH_ATOL  # the refit reached the image
        np.testing.assert_allclose(image, session("a fox", **kw), rtol=0, atol=CROSS_GRAPH_ATOL)
        previous = image
    assert inputs.sessions["unet"]._session is ort_session  # no session was re-created


def test_refit_input_graphs_list_exactly_the_adapter_targets(tiny_refit_engine):
    manifest = json.loads((tiny_refit_engine / "manifest.json").read_text())
    style = next(a for a in manifest["adapters"] if a["name"] == "style")
    for component in ("text_encoder", "unet"):
        variant = manifest["components"][component]["variants"]["refit-inputs"]
        expected = {manifest["refit_map"][m]["weight"] for m in style["targets"]
                    if manifest["refit_map"][m]["component"] == component}
        assert set(variant["weight_inputs"]) == expected


def test_adapter_add_extends_the_weight_inputs(tiny_refit_engine, tiny_model, tmp_path):
    from lcmrt.export.adapters import add_adapter
    from lcmrt.export.lora import LoraSpec

    folder = tmp_path / "engine"
    shutil.copytree(tiny_refit_engine, folder)
    before = json.loads((folder / "manifest.json").read_text())["components"]["unet"]["variants"]["refit-inputs"]
    add_adapter(folder, LoraSpec(tiny_model["lcm_lora"], name="lcm2"))  # targets convs the style LoRA does not
    after = json.loads((folder / "manifest.json").read_text())["components"]["unet"]["variants"]["refit-inputs"]
    assert set(before["weight_inputs"]) < set(after["weight_inputs"])
    pipe = lcmrt.Pipeline.load(folder)
    pipe.set_adapters({"style": 0.8, "lcm2": 0.5})
    reference = lcmrt.Pipeline.load(folder, refit="session", adapters={"style": 0.8, "lcm2": 0.5})
    # not bitwise: convolution weights fed as inputs run ONNX Runtime's plain kernel, not its NCHWc one
    np.testing.assert_allclose(pipe("a fox", seed=1, output="np"), reference("a fox", seed=1, output="np"),
                               atol=CROSS_GRAPH_ATOL, rtol=0)


def test_unknown_refit_mode(tiny_refit_engine):
    with pytest.raises(BackendError, match="refit must be one of"):
        lcmrt.Pipeline.load(tiny_refit_engine, refit="sometimes")
