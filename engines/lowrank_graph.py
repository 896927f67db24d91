"""A low-rank branch beside a graph's weights, its factors graph inputs: adapters swap by binding small arrays.

LoRA (arXiv 2106.09685) changes a weight by a low-rank product. For the adapters i active at a module, with
down_i [r_i, in(, kh, kw)], up_i [out, r_i(, 1, 1)] and weight w_i, scale s_i, stack them along the rank:

    D = concat_i(down_i)                 [R, in(, kh, kw)]   (rows of an adapter that is off: zeros)
    U = concat_i(w_i * s_i * up_i)       [out, R(, 1, 1)]    (R = the sum of the ranks built for)

so that U @ D = sum_i w_i * s_i * up_i @ down_i and the module's output becomes, without touching W:

    Linear  (MatMul x @ W^T, or Gemm with W or W^T):   y = x W^T (+ b) + (x D^T) U^T
    Conv2d  (Conv with W):                             y = conv(x, W) (+ b) + conv1x1(conv(x, D), U)

where conv(x, D) has W's strides, pads and dilations. The graph takes D^T [in, R] and U^T [R, out] for a
Linear (plain MatMuls), D and U as they are for a Conv2d. The branch adds R * (in * kh * kw + out) multiply-adds
per output position to the module's in * kh * kw * out; the base weights stay constant initializers, so ONNX
Runtime still pre-packs them. Equal to the merged weight W + U @ D up to float32 rounding.

Pure: edits a ModelProto (loaded without its external data) in memory, reads no file.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from ..errors import AdapterError

_LINEAR, _CONV = "linear", "conv"


@dataclass(frozen=True)
class Branch:
    """One module to give a branch: the initializer holding its weight, whether that is stored as W^T (the refit
    map's `transpose`), and the total rank R."""
    module: str
    weight: str
    transpose: bool
    rank: int


def factor_names(module: str) -> tuple[str, str]:
    """The graph input names of a module's down and up factors."""
    return f"{module}.lora_down", f"{module}.lora_up"


def add_lowrank_branches(model: onnx.ModelProto, branches: list[Branch]) -> dict[str, tuple[str, str]]:
    """Give each module in `branches` its low-rank branch, factors as graph inputs; return {module: (down, up)}.
    Raises AdapterError naming the module where its weight is not used as the module's Linear or Conv2d."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)
    added, new_nodes = {}, {}
    for branch in branches:
        init = initializers.get(branch.weight)
        users = consumers.get(branch.weight, [])
        if init is None or len(users) != 1:
            raise AdapterError(f"{branch.module}: its weight {branch.weight!r} is not one node's initializer in the "
                               "graph, so it cannot take a low-rank branch. Load with refit='background' instead.")
        node = users[0]
        kind = _kind(node, branch)
        down, up = factor_names(branch.module)
        dims = list(init.dims)
        if kind == _LINEAR:
            fan_in, fan_out = (dims[0], dims[1]) if branch.transpose else (dims[1], dims[0])
            shapes = ([fan_in, branch.rank], [branch.rank, fan_out])
        else:
            shapes = ([branch.rank, *dims[1:]], [dims[0], branch.rank, 1, 1])
        for name, shape in zip((down, up), shapes):
            graph.input.append(helper.make_tensor_value_info(name, init.data_type, shape))
        base = f"{node.output[0]}/base"
        hidden, delta = f"{branch.module}/lora_hidden", f"{branch.module}/lora_delta"
        if kind == _LINEAR:
            nodes = [helper.make_node("MatMul", [node.input[0], down], [hidden]),
                     helper.make_node("MatMul", [hidden, up], [delta])]
        else:
            spatial = [a for a in node.attribute if a.name in ("strides", "pads", "dilations", "auto_pad")]
            nodes = [helper.make_node("Conv", [node.input[0], down], [hidden]),
                     helper.make_node("Conv", [hidden, up], [delta])]
            nodes[0].attribute.extend(spatial)
        # the base node writes `base`; the sum takes over its output name, so no consumer needs rewiring
        nodes.append(helper.make_node("Add", [base, delta], [node.output[0]]))
        node.output[0] = base
        new_nodes[id(node)] = nodes
        added[branch.module] = (down, up)
    ordered = []  # each branch right after its base node: the graph stays topologically sorted
    for node in graph.node:
        ordered.append(node)
        ordered.extend(new_nodes.get(id(node), ()))
    graph.ClearField("node")
    graph.node.extend(ordered)
    return added


def _kind(node: onnx.NodeProto, branch: Branch) -> str:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" and list(node.input).index(branch.weight) == 1 and branch.transpose:
        return _LINEAR
    if (node.op_type == "Gemm" and list(node.input).index(branch.weight) == 1 and not attrs.get("transA", 0)
            and attrs.get("alpha", 1.0) == 1.0 and bool(attrs.get("transB", 0)) != branch.transpose):
        return _LINEAR
    if node.op_type == "Conv" and list(node.input).index(branch.weight) == 1 and attrs.get("group", 1) == 1:
        return _CONV
    raise AdapterError(f"{branch.module}: its weight {branch.weight!r} feeds a {node.op_type} node "
                       f"({node.name or 'unnamed'}) that lcmrt cannot give a low-rank branch (it takes MatMul x @ W^T, "
                       "Gemm and ungrouped Conv). Load with refit='background' instead.")
