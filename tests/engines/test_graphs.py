"""lcmrt.engines.graphs: saving a graph whose weights an exporter scattered over many files, streamed into one
aligned data file without loading them; seeded example inputs."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lcmrt.engines.graphs import DATA_ALIGNMENT, example_inputs, save_graph


def _matmul_chain(rng, n=3):
    """y = x @ W0 @ W1 @ ...: weights of different sizes, plus a tiny inline bias."""
    weights = [rng.standard_normal((8, 8), dtype=np.float32) * (i + 1) for i in range(n)]
    nodes, inits, last = [], [], "x"
    for i, w in enumerate(weights):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"h{i}"]))
        last = f"h{i}"
    inits.append(numpy_helper.from_array(np.full((8,), 0.5, np.float32), "b"))
    nodes.append(helper.make_node("Add", [last, "b"], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_scattered_external_data_is_gathered_into_one_aligned_file(tmp_path):
    rng = np.random.default_rng(0)
    model = _matmul_chain(rng)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # as torch's exporter leaves a large model: one file per weight, the small ones inline
    scattered_copy = onnx.ModelProto()
    scattered_copy.CopyFrom(model)  # saving with external data moves the values out of the model
    onnx.save_model(scattered_copy, str(scratch / "g.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=64)
    loaded = onnx.load(str(scratch / "g.onnx"), load_external_data=False)
    scattered = {t.name for t in loaded.graph.initializer if t.external_data}
    assert {"w0", "w1", "w2"} <= scattered and len(list(scratch.iterdir())) == 1 + len(scattered)
    out = tmp_path / "out"
    out.mkdir()
    assert save_graph(loaded, out, "g.onnx", data_dir=scratch) == ["g.onnx", "g.onnx.data"]

    gathered = onnx.load(str(out / "g.onnx"), load_external_data=False)
    entries = {t.name: {e.key: e.value for e in t.external_data} for t in gathered.graph.initializer}
    assert {n for n, e in entries.items() if e} == scattered  # what was inline stays inline
    assert {entries[n]["location"] for n in scattered} == {"g.onnx.data"}
    assert all(int(entries[n]["offset"]) % DATA_ALIGNMENT == 0 for n in scattered)
    full = onnx.load(str(out / "g.onnx"))
    for tensor, original in zip(full.graph.initializer, model.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), numpy_helper.to_array(original))
    x = rng.standard_normal((2, 8), dtype=np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out / "g.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, expected)


def test_external_data_must_stay_inside_the_scratch_folder(tmp_path):
    model = _matmul_chain(np.random.default_rng(1), n=1)
    (tmp_path / "scratch").mkdir()
    onnx.save_model(model, str(tmp_path / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=64)
    loaded = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    for tensor in loaded.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"  # a graph naming a file beside the scratch folder
    with pytest.raises(ValueError, match="outside"):
        save_graph(loaded, tmp_path, "h.onnx", data_dir=tmp_path / "scratch")


def test_example_inputs_take_named_dimensions_and_natural_ranges():
    inputs = [("input_ids", (1, 77), "int64"), ("sample", ("unet_batch", 4, "latent_height", 20), "float32"),
              ("timestep", (1,), "float32"), ("time_ids", ("unet_batch", 6), "float32"),
              ("image", (1, 3, "height", 8), "float32")]
    arrays = example_inputs(inputs, {"unet_batch": 2, "latent_height": 12, "height": 16}, seed=3, vocab_size=100)
    assert arrays["sample"].shape == (2, 4, 12, 20) and arrays["image"].shape == (1, 3, 16, 8)
    assert arrays["input_ids"].dtype == np.int64 and 0 <= arrays["input_ids"].min() and arrays["input_ids"].max() < 100
    assert 0 <= arrays["timestep"][0] < 1000 and arrays["timestep"][0] == int(arrays["timestep"][0])
    assert arrays["time_ids"].max() < 1024 and -1 <= arrays["image"].min() and arrays["image"].max() <= 1
    again = example_inputs(inputs, {"unet_batch": 2, "latent_height": 12, "height": 16}, seed=3, vocab_size=100)
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)  # seeded
