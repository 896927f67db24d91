"""lcmrt.engines.fp16: fp16 graphs with fp32 islands and fp32 I/O, and their measured fidelity (CPU)."""
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lcmrt.engines.fp16 import (convert_folder, convert_model, fp32_nodes,
                                measure_fidelity, psnr)
from lcmrt.manifest import load_manifest


def _types(model):
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def _toy(scale: float = 1.0):
    """timestep -> Mul(freq) -> Sin -> MatMul(w_t); x -> MatMul(w) -> LayerNorm -> Softmax -> Add -> out."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32) * scale, "w"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w_t"),
             numpy_helper.from_array(np.ones(8, np.float32), "ln_scale"),
             numpy_helper.from_array(np.zeros(8, np.float32), "ln_bias")]
    freq = helper.make_node("Constant", [], ["freq"], name="freq",
                            value=numpy_helper.from_array(np.linspace(1e-4, 1, 8).astype(np.float32)))
    nodes = [freq,
             helper.make_node("Mul", ["timestep", "freq"], ["targ"], name="t_mul"),
             helper.make_node("Sin", ["targ"], ["tsin"], name="t_sin"),
             helper.make_node("MatMul", ["tsin", "w_t"], ["temb"], name="t_proj"),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("LayerNormalization", ["h", "ln_scale", "ln_bias"], ["hn"], name="ln", axis=-1),
             helper.make_node("Softmax", ["hn"], ["p"], name="softmax", axis=-1),
             helper.make_node("Add", ["p", "temb"], ["out"], name="add")]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
                                             helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_islands_io_and_names(tmp_path):
    model = _toy()
    assert fp32_nodes(model, "unet") == {"ln", "softmax", "t_mul", "t_sin"}  # cone stops at the MatMul
    fp16 = convert_model(_toy(), "unet")
    onnx.checker.check_model(fp16)
    types = _types(fp16)
    assert types["x"] == types["timestep"] == types["out"] == TensorProto.FLOAT  # runtime I/O unchanged
    assert types["w"] == types["w_t"] == TensorProto.FLOAT16  # weights keep their names, become fp16
    assert types["ln_scale"] == TensorProto.FLOAT  # read only by the fp32 LayerNorm
    assert types["freq"] == TensorProto.FLOAT  # the timestep embedding's constants stay exact
    assert types["hn"] == types["targ"] == TensorProto.FLOAT and types["h"] == TensorProto.FLOAT16
    onnx.save(_toy(), tmp_path / "a.onnx")
    onnx.save(fp16, tmp_path / "b.onnx")
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32),
             "timestep": np.array([999.0], np.float32)}
    report = measure_fidelity(tmp_path / "a.onnx", tmp_path / "b.onnx", feeds)
    assert report["finite"] and report["max_abs_diff"] < 1e-2


def test_overflow_is_reported(tmp_path):
    onnx.save(_toy(scale=1e5), tmp_path / "a.onnx")  # x @ w reaches ~1e5: past fp16's 65504
    onnx.save(convert_model(_toy(scale=1e5), "unet"), tmp_path / "b.onnx")
    feeds = {"x": np.full((2, 8), 1.0, np.float32), "timestep": np.array([1.0], np.float32)}
    report = measure_fidelity(tmp_path / "a.onnx", tmp_path / "b.onnx", feeds)
    assert not report["finite"] and report["fp16_overflow"] == ["h"] and report["fp16_activation_peak"] > 65504


def test_psnr():
    a = np.zeros((4, 4, 3))
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 0.1) == pytest.approx(20.0)
    assert math.isnan(psnr(a, a * np.nan))


@pytest.mark.slow
def test_tiny_folder_fp16(tiny_folder):
    entries = convert_folder(tiny_folder, components=("text_encoder", "unet", "vae_decoder"))
    manifest = load_manifest(tiny_folder)
    for component, entry in entries.items():
        fidelity = entry["fidelity"]
        assert fidelity["finite"], component
        scale = max(o["max_abs_reference"] for o in fidelity["outputs"].values())
        # fp16 keeps ~3 significant digits; weights and activations both rounded: well under 1% of scale
        assert fidelity["max_abs_diff"] < 1e-2 * max(1.0, scale), (component, fidelity)
        fp32 = onnx.load(str(tiny_folder / manifest["components"][component]["file"]))
        fp16 = onnx.load(str(tiny_folder / entry["file"]))
        # refit map names stay valid: every fp32 weight is still an initializer of the fp16 graph
        names16 = {t.name: t.data_type for t in fp16.graph.initializer}
        big = [t.name for t in fp32.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2]
        assert big and all(n in names16 for n in big)
        assert sum(names16[n] == TensorProto.FLOAT16 for n in big) > len(big) // 2
    assert entries["vae_decoder"]["fidelity"]["outputs"]["image"]["psnr_db"] > 40
