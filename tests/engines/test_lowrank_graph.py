"""The low-rank branch graph edit (engines/lowrank_graph.py) on hand-built MatMul, Gemm and Conv graphs: with
factors bound, the outputs equal the graph with merged weights W + U @ D; unsupported uses are refused."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lcmrt.engines.lowrank_graph import Branch, add_lowrank_branches
from lcmrt.errors import AdapterError

RANK = 3
ATOL = 1e-5  # float32 rounding of a sum of O(1) products over <= 48 terms


def _model(op: str, weight: np.ndarray, x_shape: list, **attrs) -> onnx.ModelProto:
    inputs = ["x", "w"] + (["b"] if op != "MatMul" else [])
    inits = [numpy_helper.from_array(weight, "w")]
    if op != "MatMul":
        out = weight.shape[0] if op == "Conv" or attrs.get("transB") else weight.shape[1]
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, out, dtype=np.float32), "b"))
    graph = helper.make_graph([helper.make_node(op, inputs, ["y"], **attrs), helper.make_node("Relu", ["y"], ["z"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [f"d{i}" for i in range(len(x_shape))])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


CASES = {  # module weight W [out, in(, kh, kw)] and how the graph stores and uses it
    "matmul x @ W^T": ("MatMul", (6, 5), True, [2, 4, 5], {}),
    "gemm W, transB": ("Gemm", (6, 5), False, [4, 5], {"transB": 1}),
    "gemm W^T": ("Gemm", (6, 5), True, [4, 5], {}),
    "conv 3x3 stride 2 pad 1": ("Conv", (6, 4, 3, 3), False, [1, 4, 9, 9], {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
}


@pytest.mark.parametrize("case", CASES)
def test_branch_equals_merged_weight(case):
    op, shape, transpose, x_shape, attrs = CASES[case]
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    down = rng.standard_normal((RANK, *shape[1:])).astype(np.float32)  # [R, in(, kh, kw)]
    up = rng.standard_normal((shape[0], RANK) + ((1, 1) if op == "Conv" else ())).astype(np.float32)
    up[:, -1] = 0  # a rank slot left over (an adapter switched off)
    merged = w + (up.reshape(shape[0], RANK) @ down.reshape(RANK, -1)).reshape(shape)
    stored = lambda m: np.ascontiguousarray(m.T) if transpose else m  # noqa: E731
    x = rng.standard_normal(x_shape).astype(np.float32)
    model = _model(op, stored(w), x_shape, **attrs)
    names = add_lowrank_branches(model, [Branch("m", "w", transpose, RANK)])
    onnx.checker.check_model(model)
    d_name, u_name = names["m"]
    if op == "Conv":
        feeds = {d_name: down, u_name: up}
    else:
        feeds = {d_name: np.ascontiguousarray(down.T), u_name: np.ascontiguousarray(up.T)}
    got = _run(model, {"x": x, **feeds})
    want = _run(_model(op, stored(merged), x_shape, **attrs), {"x": x})
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    zeros = {name: np.zeros_like(value) for name, value in feeds.items()}  # every branch off: the base, exactly
    np.testing.assert_array_equal(_run(model, {"x": x, **zeros}), _run(_model(op, stored(w), x_shape, **attrs), {"x": x}))


def test_unsupported_uses_are_refused_naming_the_module():
    w = np.ones((4, 2, 3, 3), np.float32)
    grouped = _model("Conv", w, [1, 4, 5, 5], group=2)
    with pytest.raises(AdapterError, match=r"unet\.conv: .*Conv node .*refit='background'"):
        add_lowrank_branches(grouped, [Branch("unet.conv", "w", False, 2)])
    not_transposed = _model("MatMul", np.ones((5, 6), np.float32), [2, 5])
    with pytest.raises(AdapterError, match=r"unet\.fc: .*MatMul"):
        add_lowrank_branches(not_transposed, [Branch("unet.fc", "w", False, 2)])
    with pytest.raises(AdapterError, match=r"unet\.gone: its weight 'nope' is not one node's initializer"):
        add_lowrank_branches(not_transposed, [Branch("unet.gone", "nope", True, 2)])
