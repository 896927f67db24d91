"""The two ways ONNX Runtime takes adapter weights: as graph inputs fed with every run (CPU default) or baked
into a re-created session. Same images either way (up to float32 rounding); inputs swap without a new session."""
import json
import shutil
import threading

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


def _gated_builds(monkeypatch):
    """Hold refit="background" session builds (those of the plain graph) until the returned event is set; the
    list collects the weight sets they bake in."""
    from lcmrt.backends.onnxruntime import OrtSession

    gate, built, create = threading.Event(), [], OrtSession._create

    def gated(self, weights, path=None):
        if path is not None and path != self.path:
            assert gate.wait(60)
            built.append(dict(weights))
        return create(self, weights, path)

    monkeypatch.setattr(OrtSession, "_create", gated)
    return gate, built


def test_background_swaps_at_once_then_runs_the_baked_in_session(tiny_refit_engine, monkeypatch):
    gate, built = _gated_builds(monkeypatch)
    background = lcmrt.Pipeline.load(tiny_refit_engine, refit="background")
    inputs = lcmrt.Pipeline.load(tiny_refit_engine, refit="inputs")
    session = lcmrt.Pipeline.load(tiny_refit_engine, refit="session")
    kw = dict(seed=9, output="np", guidance_scale=1.5)
    first = session("a fox", **kw)
    assert not background.settle(timeout=0.2)  # the build is held: runs go through the weight inputs
    np.testing.assert_array_equal(background("a fox", **kw), inputs("a fox", **kw))
    for pipe in (background, inputs, session):
        pipe.set_adapters({"style": 1.2})  # the build under way now bakes in stale weights
    np.testing.assert_array_equal(background("a fox", **kw), inputs("a fox", **kw))  # the swap is in at once
    gate.set()
    assert background.settle(timeout=60)
    unet = background.sessions["unet"]
    assert unet._fused is not None and unet._fused[0] == unet._weight_version and unet._fuser is None
    assert len(built) >= 2  # the stale build was thrown away and the current weights built again
    # settled: the plain graph with the weights baked in, as refit="session" runs it
    image = background("a fox", **kw)
    np.testing.assert_array_equal(image, session("a fox", **kw))
    assert np.abs(image - first).max() > 100 * CROSS_GRAPH_ATOL
    background.set_adapters({"style": 0.8})
    assert background.settle(timeout=60)
    np.testing.assert_array_equal(background("a fox", **kw), first)  # A -> B -> A, bit for bit, once settled


def test_a_failed_background_build_keeps_the_weight_inputs(tiny_refit_engine, monkeypatch):
    from lcmrt.backends.onnxruntime import OrtSession

    create = OrtSession._create

    def failing(self, weights, path=None):
        if path is not None and path != self.path:
            raise BackendError("simulated: out of memory")
        return create(self, weights, path)

    monkeypatch.setattr(OrtSession, "_create", failing)
    background = lcmrt.Pipeline.load(tiny_refit_engine, refit="background")
    with pytest.raises(BackendError, match="simulated: out of memory.*runs go on with the weights as inputs"):
        background.settle(timeout=60)
    background.set_adapters({"style": 0.3})
    inputs = lcmrt.Pipeline.load(tiny_refit_engine, refit="inputs", adapters={"style": 0.3})
    np.testing.assert_array_equal(background("a fox", seed=2, output="np"), inputs("a fox", seed=2, output="np"))


def test_background_is_a_cpu_mode_and_other_modes_are_settled(tiny_refit_engine, ort_cuda_standin):
    assert lcmrt.Pipeline.load(tiny_refit_engine).settle(timeout=0)  # nothing runs in the background
    with pytest.raises(BackendError, match="refit='background' is for the CPU provider"):
        lcmrt.Pipeline.load(tiny_refit_engine, backend="onnxruntime-cuda", refit="background")


def test_background_builds_at_load_without_adapter_weights(tiny_refit_engine):
    """The style switched off at load: no weights to feed, yet the baked-in session is built and taken."""
    background = lcmrt.Pipeline.load(tiny_refit_engine, refit="background", adapters={"style": 0.0})
    session = lcmrt.Pipeline.load(tiny_refit_engine, refit="session", adapters={"style": 0.0})
    assert background.settle(timeout=60) and background.sessions["unet"]._fused is not None
    np.testing.assert_array_equal(background("a fox", seed=4, output="np"), session("a fox", seed=4, output="np"))


def test_background_refuses_a_plain_graph_that_keeps_weights_inline(tiny_refit_engine, monkeypatch):
    from lcmrt.backends import onnxruntime as backend

    read = backend.read_initializers

    def inline(path):  # as if the plain graph stored every weight inside the .onnx file
        return {name: (spec, None) for name, (spec, _) in read(path).items()}

    monkeypatch.setattr(backend, "read_initializers", inline)
    with pytest.raises(BackendError, match="cannot take .* weight input.*refit='inputs'"):
        lcmrt.Pipeline.load(tiny_refit_engine, refit="background")
