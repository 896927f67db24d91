"""FP16 graphs: convert an engine folder's fp32 ONNX graphs to `<component>.fp16.onnx`, and measure them.

Weights and activations go to float16 except where fp16 is known to fail, which stay float32 "islands":
- normalization statistics (InstanceNormalization, which torch's GroupNorm exports to, LayerNormalization,
  GroupNormalization): mean and variance over thousands of values lose most of their digits in fp16;
- Softmax: the exp-sum accumulator of attention;
- the UNet's timestep embedding, from the `timestep` input up to its first linear layer: t * freq with t up
  to 999 rounds to 0.5 in fp16, an error of half a radian in sin/cos (diffusers also computes it in fp32).
Graph inputs and outputs stay float32 (a Cast at each end), so the runtime feeds and reads the same arrays
for both precisions. Initializer names are kept, so the refit map names the same weights in both graphs
(an fp16 graph's refittable weights are float16).

The VAE decoder stays fp32 by default: its activations reach the fp16 range in real SD VAEs (the SDXL VAE
overflows to NaN, black images), and it is cheap to keep exact next to a 4-step UNet on a GPU.

Fidelity is measured on the CPU in ONNX Runtime, fp16 graph against fp32 graph on the same seeded inputs.
ONNX Runtime's CPU provider computes most fp16 nodes in fp32 (it inserts casts around nodes that have no
fp16 kernel), so the numbers measure fp16 storage of weights and activations, overflow included, but not a
GPU's fp16 accumulation; `benchmarks/gpu_check.sh` measures that on the GPU.
"""
from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import ExportError
from ..folder_update import commit, fresh_graph_name
from ..manifest import FP16, FP16_SUFFIX, Manifest, file_sha256, read_manifest, size_dims
from .graphs import EXTERNAL_DATA_THRESHOLD, compare_graphs, psnr, save_graph
from .graphs import example_inputs as graph_inputs

# Ops whose statistics or accumulators need fp32 (see the module docstring).
FP32_OPS = frozenset({"InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax",
                      "ReduceMean", "ReduceSumSquare"})
# Graph inputs whose forward cone, up to the first weighted op, stays fp32.
FP32_CONE_INPUTS = {"unet": ("timestep", "time_ids")}  # time_ids: SDXL's sizes, embedded like the timestep
_CONE_STOPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})
# Inputs that ONNX fixes to float32 whatever the node's data type (Resize: roi, scales; opset >= 11).
_ALWAYS_FP32_INPUTS = {"Resize": (1, 2)}
FP16_MAX = 65504.0
# Protobuf cannot hold more than 2 GB (as in lcmrt.export.onnx_export).
FIDELITY_SEED = 1234
# 8-bit images: PSNR against the fp32 image; above ~40 dB differences are invisible.


# --- conversion ------------------------------------------------------------------------------------------

def fp32_nodes(model, component: str) -> set[str]:
    """Names of the nodes that stay float32 in `model` (an onnx ModelProto with named nodes)."""
    nodes = {n.name for n in model.graph.node if n.op_type in FP32_OPS}
    consumers = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    for start in FP32_CONE_INPUTS.get(component, ()):
        todo = [start]
        while todo:
            for node in consumers[todo.pop()]:
                if node.op_type in _CONE_STOPS or node.name in nodes:
                    continue
                nodes.add(node.name)
                todo.extend(node.output)
    return nodes


def convert_model(model, component: str):
    """An fp16 copy of an fp32 onnx ModelProto (weights loaded), with fp32 islands and fp32 graph I/O.

    Why not a maintained converter (measured with onnxruntime 1.32, onnx 1.23, on these graphs):
    `onnxconverter_common.float16` 1.16 writes graphs ONNX Runtime refuses for all three SD1.5 components
    (fp16 weights behind the Identity nodes of fp32 islands, Casts left typed float32).
    `onnxruntime.transformers.float16` loads, but rounds every tensor that crosses into or between blocked
    nodes to fp16 and back (graph inputs, Constant values, each island node's output), which undoes the
    timestep-embedding island: full-size UNet, max abs diff vs fp32 relative to its peak 6.5e-3 against
    1.1e-3 here, and 79 s against 41 s to convert and save."""
    import onnx
    from onnx import TensorProto, helper

    model = _with_types(model)
    graph = model.graph
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"fp16_unnamed_{i}"
    keep32 = fp32_nodes(model, component)
    float_type = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.input, *graph.output]}
    initializers = {t.name: t for t in graph.initializer}
    consumers = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def is_float(name: str) -> bool:
        if name in initializers:
            return initializers[name].data_type == TensorProto.FLOAT
        return float_type.get(name) == TensorProto.FLOAT

    def wants16(node, index: int) -> bool:
        return node.name not in keep32 and index not in _ALWAYS_FP32_INPUTS.get(node.op_type, ())

    # Where each float tensor lives: a node's outputs in the node's precision, graph inputs in fp32, and
    # constants (initializers, Constant nodes) in fp16 only if some fp16 node reads them.
    stored16: dict[str, bool] = {i.name: False for i in graph.input if is_float(i.name)}
    for name, tensor in initializers.items():
        if tensor.data_type == TensorProto.FLOAT:
            stored16[name] = any(wants16(n, list(n.input).index(name)) for n in consumers[name])
    for node in graph.node:
        if node.op_type == "Constant":
            reads16 = any(wants16(n, list(n.input).index(node.output[0])) for n in consumers[node.output[0]])
            if is_float(node.output[0]):
                stored16[node.output[0]] = reads16
                if reads16:
                    for attr in node.attribute:
                        if attr.name == "value":
                            attr.t.CopyFrom(_tensor_to_fp16(attr.t))
            continue
        sixteen = node.name not in keep32
        for name in node.output:
            if is_float(name):
                stored16[name] = sixteen
        if sixteen:
            _retype_attributes(node, TensorProto)

    for name, tensor in initializers.items():
        if stored16.get(name):
            tensor.CopyFrom(_tensor_to_fp16(tensor))

    # Casts where a tensor's storage and a reader's precision differ (one cast per tensor and direction).
    casts, new_nodes = {}, []

    def cast(name: str, to16: bool) -> str:
        key = (name, to16)
        if key not in casts:
            out = f"{name}_{'fp16' if to16 else 'fp32'}"
            casts[key] = out
            new_nodes.append(helper.make_node("Cast", [name], [out], name=f"cast_{out}",
                                              to=TensorProto.FLOAT16 if to16 else TensorProto.FLOAT))
        return casts[key]

    for node in list(graph.node):
        for i, name in enumerate(node.input):
            if name and name in stored16 and stored16[name] != wants16(node, i):
                node.input[i] = cast(name, wants16(node, i))
    # fp32 graph outputs: the producer writes `<name>_fp16_out`, a Cast restores the name.
    for out in graph.output:
        if stored16.get(out.name):
            inner = f"{out.name}_fp16_out"
            for node in graph.node:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if o == out.name else o for o in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], name=f"cast_{out.name}_out",
                                              to=TensorProto.FLOAT))
    graph.node.extend(new_nodes)
    _topological_sort(graph)
    # types changed: drop the inferred value_info and infer again so the saved graph is consistent
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model) if model.ByteSize() < EXTERNAL_DATA_THRESHOLD else model
    return model


def _with_types(model):
    """Infer every tensor's type; the graph's structure only (weights may be external or >2 GB)."""
    import onnx

    structure = onnx.ModelProto()
    structure.CopyFrom(model)
    for tensor in structure.graph.initializer:  # shapes come from dims, so the data can go
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
    inferred = onnx.shape_inference.infer_shapes(structure, strict_mode=False)
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _tensor_to_fp16(tensor):
    from onnx import TensorProto, numpy_helper

    if tensor.data_type != TensorProto.FLOAT:
        return tensor
    values = numpy_helper.to_array(tensor)
    # out-of-range constants (attention masks use float32's min) become the largest finite fp16
    converted = numpy_helper.from_array(np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16), tensor.name)
    return converted


def _retype_attributes(node, TensorProto) -> None:
    """Attributes that make float32 tensors inside an fp16 node: Cast's target, ConstantOfShape's value."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16
        elif node.op_type == "ConstantOfShape" and attr.name == "value":
            attr.t.CopyFrom(_tensor_to_fp16(attr.t))


def _topological_sort(graph) -> None:
    produced = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:
            raise ExportError("FP16 conversion produced a graph with a cycle or a missing input; "
                              "this is a bug in lcmrt.engines.fp16, please report it.")
        ready_ids = {id(n) for n in ready}
        for node in ready:
            ordered.append(node)
            produced.update(node.output)
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def convert_component(folder: str | Path, manifest: Manifest | dict, component: str) -> dict:
    """Write `<component>.fp16.onnx` next to the fp32 graph (under a name the manifest does not use yet); return
    its file entry (file, sha256, fp32 nodes)."""
    import onnx

    folder = Path(folder)
    fp32 = Manifest.of(manifest).component(component).graph_fp32
    source = folder / fp32.file
    model = onnx.load(str(source), load_external_data=True)
    fp16 = convert_model(model, component)
    graph_name = fresh_graph_name(folder, Manifest.of(manifest), component, FP16)
    files = save_graph(fp16, folder, graph_name)
    return {
        "file": graph_name,
        "sha256": {name: file_sha256(folder / name) for name in files},
        "precision": FP16,
        "io_dtype": "float32",
        "fp32_ops": sorted(FP32_OPS),
        "fp32_nodes": len(fp32_nodes(fp16, component)),
        "source_sha256": fp32.sha256[fp32.file],
    }


def example_inputs(manifest: Manifest | dict, component: str, seed: int = FIDELITY_SEED, vocab_size: int = 49408,
                   size: tuple[int, int] | None = None, smallest_batch: bool = False) -> dict[str, np.ndarray]:
    """Seeded inputs for a component's graphs at one of the folder's sizes (default: the first), with a varying
    batch at its largest (or smallest: the UNet's batch without guidance)."""
    manifest = Manifest.of(manifest)
    entry = manifest.component(component)
    dims = manifest.dims(component, size)
    if smallest_batch:
        sized = size_dims(*(size or manifest.shapes.sizes[0]))
        dims.update({d: min(v) for d, v in entry.dim_values.items() if d not in sized})
    return graph_inputs([(t.name, t.shape, t.dtype) for t in entry.inputs], dims, seed, vocab_size)


def island_inputs(fp16_model) -> list[str]:
    """Tensors computed in fp16 and read by an fp32 island or a graph output (the Casts to fp32): where
    activations too large for fp16 show up first (residual streams before normalization)."""
    from onnx import TensorProto

    names = []
    for node in fp16_model.graph.node:
        if node.op_type == "Cast" and node.name.startswith("cast_") and node.input[0] not in names:
            if any(a.name == "to" and a.i == TensorProto.FLOAT for a in node.attribute):
                names.append(node.input[0].removesuffix("_fp16_out"))
    return names


def activation_peaks(fp32_path: str | Path, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Max finite |value| of the fp32 graph's tensors `names` on `feeds` (a copy of the graph with them as outputs,
    written next to it so external data still resolves)."""
    import onnx
    import onnxruntime as ort

    fp32_path = Path(fp32_path)
    model = onnx.load(str(fp32_path), load_external_data=False)
    present = {o.name for o in model.graph.output}
    produced = {o for n in model.graph.node for o in n.output}
    probes = [n for n in names if n in produced and n not in present]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in probes)
    with tempfile.NamedTemporaryFile(dir=fp32_path.parent, prefix=".probe-", suffix=".onnx") as tmp:
        onnx.save_model(model, tmp.name)
        session = ort.InferenceSession(tmp.name, providers=["CPUExecutionProvider"])
        values = session.run(probes, feeds) if probes else []
    # infinities the fp32 graph makes on purpose (attention masks) are infinities in fp16 too: not overflow
    finite = [np.abs(v[np.isfinite(v)]) for v in values]
    return {n: float(f.max()) if f.size else 0.0 for n, f in zip(probes, finite)}


def measure_fidelity(fp32_path: str | Path, fp16_path: str | Path, feeds: dict[str, np.ndarray],
                     image_outputs: tuple[str, ...] = ()) -> dict:
    """Run both graphs in ONNX Runtime (CPU) on `feeds`; max abs diff per output, the PSNR of outputs that
    are images in [-1, 1] (mapped to [0, 1] as the pipeline does), and the largest fp32 activation where
    the fp16 graph stores it in fp16 (ONNX Runtime's CPU provider removes Cast pairs fp16 -> fp32 around
    its fp32 kernels, so it does not itself overflow where a GPU would: the peak is the overflow check)."""
    import onnx

    report = compare_graphs(fp32_path, fp16_path, feeds, image_outputs)
    peaks = activation_peaks(fp32_path, island_inputs(onnx.load(str(fp16_path), load_external_data=False)), feeds)
    peak = max(peaks.values(), default=0.0)
    report["fp16_activation_peak"] = peak
    report["fp16_overflow"] = sorted(n for n, v in peaks.items() if not v < FP16_MAX)
    if report["fp16_overflow"]:
        report["finite"] = False
    return report


# Outputs compared as images (PSNR) as well.
IMAGE_OUTPUTS = {"vae_decoder": ("image",)}


def default_fp16_components(manifest: Manifest) -> tuple[str, ...]:
    """The components that get an fp16 graph by default: the text encoders and the UNet (the VAE decoder stays
    fp32; see the module docstring)."""
    return (*manifest.family_info.text_encoders, "unet")


def convert_folder(folder: str | Path, components: tuple[str, ...] | None = None,
                   seed: int = FIDELITY_SEED) -> dict[str, dict]:
    """Write fp16 graphs for `components` (default: `default_fp16_components`) of an engine folder and measure
    each against its fp32 graph.

    Returns component -> manifest entry for the fp16 graph, with its "fidelity"; the caller records them
    as the components' fp16 variants (`record_variants`).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    vocab, graphs = _vocab_size(folder, manifest), manifest.components
    components = default_fp16_components(manifest) if components is None else components
    entries = {}
    for component in components:
        if component not in graphs:
            raise ExportError(f"{folder} has no {component!r} component to convert to fp16 "
                              f"(it has {', '.join(graphs)}).")
        entry = convert_component(folder, manifest, component)
        feeds = example_inputs(manifest, component, seed, vocab)
        fidelity = measure_fidelity(folder / graphs[component].file, folder / entry["file"],
                                    feeds, IMAGE_OUTPUTS.get(component, ()))
        fidelity["seed"] = seed
        entry["fidelity"] = fidelity
        entries[component] = entry
    return entries


def record_variants(folder: str | Path, entries: dict[str, dict]) -> dict:
    """Store fp16 graph entries in the folder's manifest (`components[c]["variants"]["fp16"]`); return it."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for component, entry in entries.items():
        manifest.set_variant(component, entry["precision"], entry)
    commit(folder, manifest)
    return manifest.data


def _vocab_size(folder: Path, manifest: Manifest | dict) -> int:
    """Token ids for fidelity inputs must index the embedding: read the tokenizer's vocabulary size."""
    import json

    path = folder / Manifest.of(manifest).tokenizer.path / "tokenizer.json"
    try:
        return len(json.loads(path.read_text())["model"]["vocab"])
    except (OSError, KeyError, ValueError):
        return 49408  # CLIP's vocabulary


def image_fidelity(reference: np.ndarray, test: np.ndarray) -> dict:
    """Whole-image fidelity of an fp16 pipeline against the fp32 one: images [N, H, W, 3] in [0, 1]."""
    reference, test = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    return {"max_abs_diff": float(np.max(np.abs(reference - test))), "psnr_db": psnr(reference, test)}


__all__ = ["default_fp16_components", "FP16_SUFFIX", "FP32_OPS", "convert_component", "convert_folder",
           "convert_model", "example_inputs", "fp32_nodes", "image_fidelity", "measure_fidelity", "psnr", "record_variants"]

