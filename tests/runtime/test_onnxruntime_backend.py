"""lcmrt/backends/onnxruntime.py on small hand-made graphs: specs, exact runs, input checks, refit."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lcmrt.backends import BACKEND_NAMES, get_backend
from lcmrt.backends.base import TensorSpec
from lcmrt.backends.onnxruntime import OnnxRuntimeBackend, read_initializers
from lcmrt.errors import BackendError

IR_VERSION = 10  # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most 13

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)  # stored [out, in]; the graph transposes it
B = RNG.standard_normal(4).astype(np.float32)
SCALE = np.array(2.0, np.float32)


def _save_graph(folder, external=True):
    """y = (x @ W.T + B) * scale, x: [batch, 3] float32; n: int64[2] passes through to `count`.

    W goes through a Transpose that ONNX Runtime constant-folds: refit has to reach the folded value.
    """
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"]),
        helper.make_node("MatMul", ["x", "Wt"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["xwb"]),
        helper.make_node("Mul", ["xwb", "scale"], ["y"]),
        helper.make_node("Identity", ["n"], ["count"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("count", TensorProto.INT64, [2])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B"), numpy_helper.from_array(SCALE, "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    if external:
        onnx.save(model, folder / "tiny.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                  location="tiny.onnx.data", size_threshold=0)
    else:
        onnx.save(model, folder / "tiny.onnx")
    return _manifest(folder)


def _manifest(folder):
    """A manifest with just the tiny graph, hashed as the build would."""
    from lcmrt.manifest import file_sha256

    files = [name for name in ("tiny.onnx", "tiny.onnx.data") if (folder / name).is_file()]
    return {"components": {"tiny": {"file": "tiny.onnx", "precision": "fp32",
                                    "sha256": {name: file_sha256(folder / name) for name in files}}}}


def _reference(x, w=W, b=B, scale=SCALE):
    return (x @ w.T + b) * scale


@pytest.fixture
def session(tmp_path):
    manifest = _save_graph(tmp_path)
    return OnnxRuntimeBackend("cpu", threads=1).load(tmp_path, manifest, "tiny")


def _feeds(batch=2):
    return {"x": RNG.standard_normal((batch, 3)).astype(np.float32), "n": np.array([7, -3], np.int64)}


def test_specs_include_symbolic_batch(session):
    assert session.inputs == {
        "x": TensorSpec("x", ("batch", 3), np.dtype(np.float32)),
        "n": TensorSpec("n", (2,), np.dtype(np.int64)),
    }
    assert session.outputs == {
        "y": TensorSpec("y", ("batch", 4), np.dtype(np.float32)),
        "count": TensorSpec("count", (2,), np.dtype(np.int64)),
    }


def test_cpu_sessions_keep_no_memory_arena(session, tmp_path):
    """The arena would keep every run's activations (GBs at full size); prepacking is on unless asked off."""
    from lcmrt.backends.onnxruntime import OrtSession

    assert session._session.get_session_options().enable_cpu_mem_arena is False
    mapped = OrtSession(session.path, "tiny", ["CPUExecutionProvider"], None, optimize=False, prepack=False)
    options = mapped._session.get_session_options()
    assert options.get_session_config_entry("session.disable_prepacking") == "1"
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feeds = _feeds()
    np.testing.assert_allclose(mapped.run(feeds)["y"], session.run(feeds)["y"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_run_matches_numpy(session, batch):
    feeds = _feeds(batch)
    out = session.run(feeds)
    assert set(out) == {"y", "count"}
    np.testing.assert_allclose(out["y"], _reference(feeds["x"]), rtol=1e-6, atol=1e-6)
    assert out["y"].dtype == np.float32 and out["y"].shape == (batch, 4)
    np.testing.assert_array_equal(out["count"], [7, -3])


def test_wrong_dtype_names_input_expected_and_got(session):
    feeds = _feeds()
    feeds["x"] = feeds["x"].astype(np.float64)
    with pytest.raises(BackendError, match=r"'x': expected float32\[batch, 3\], got float64\[2, 3\]"):
        session.run(feeds)


@pytest.mark.parametrize("shape", [(2, 5), (3,), (2, 3, 1)])
def test_wrong_shape_names_input_expected_and_got(session, shape):
    feeds = _feeds()
    feeds["x"] = np.zeros(shape, np.float32)
    got = ", ".join(map(str, shape))
    with pytest.raises(BackendError, match=rf"'x': expected float32\[batch, 3\], got float32\[{got}\]"):
        session.run(feeds)


def test_wrong_static_dim(session):
    feeds = _feeds()
    feeds["n"] = np.array([1, 2, 3], np.int64)
    with pytest.raises(BackendError, match=r"'n': expected int64\[2\], got int64\[3\]"):
        session.run(feeds)


def test_missing_and_unknown_inputs(session):
    feeds = _feeds()
    del feeds["n"]
    with pytest.raises(BackendError, match="missing: n"):
        session.run(feeds)
    feeds = {**_feeds(), "z": np.zeros(1, np.float32)}
    with pytest.raises(BackendError, match="not inputs of this graph: z"):
        session.run(feeds)


def test_non_array_input(session):
    feeds = _feeds()
    feeds["x"] = [[0.0, 0.0, 0.0]]
    with pytest.raises(BackendError, match=r"'x': expected float32\[batch, 3\], got list"):
        session.run(feeds)


def test_get_backend_names():
    assert get_backend().name in ("onnxruntime-cpu", "onnxruntime-cuda")
    assert get_backend("onnxruntime").name == "onnxruntime-cpu"
    backend = get_backend("onnxruntime-cpu", threads=2)
    assert isinstance(backend, OnnxRuntimeBackend) and backend.threads == 2
    with pytest.raises(BackendError) as err:
        get_backend("pytorch")
    for name in BACKEND_NAMES:
        assert name in str(err.value)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA provider installed")
@pytest.mark.parametrize("name", ["onnxruntime-cuda", "onnxruntime-trt"])
def test_gpu_backend_without_gpu_build(name):
    with pytest.raises(BackendError, match=r"lcmrt\[gpu\]") as err:
        get_backend(name)
    assert "CPUExecutionProvider" in str(err.value)  # says what is installed


def test_bad_threads():
    with pytest.raises(BackendError, match="threads"):
        OnnxRuntimeBackend("cpu", threads=0)


def test_read_initializers(tmp_path):
    _save_graph(tmp_path)
    table = read_initializers(tmp_path / "tiny.onnx")
    assert table == {
        "W": (TensorSpec("W", (4, 3), np.dtype(np.float32)), "tiny.onnx.data"),
        "B": (TensorSpec("B", (4,), np.dtype(np.float32)), "tiny.onnx.data"),
        "scale": (TensorSpec("scale", (), np.dtype(np.float32)), "tiny.onnx.data"),
    }
    inline = tmp_path / "inline"
    inline.mkdir()
    _save_graph(inline, external=False)
    assert {name: ext for name, (_, ext) in read_initializers(inline / "tiny.onnx").items()} == {
        "W": None, "B": None, "scale": None}


def test_refit_is_the_graph_with_new_values_and_restores_exactly(tmp_path, session):
    feeds = _feeds(3)
    before = session.run(feeds)

    w2 = RNG.standard_normal(W.shape).astype(np.float32)
    b2 = RNG.standard_normal(B.shape).astype(np.float32)
    session.refit({"W": w2, "B": b2})
    after = session.run(feeds)

    # oracle: the same graph saved with those initializer values
    other = tmp_path / "other"
    other.mkdir()
    graph = onnx.load(tmp_path / "tiny.onnx")
    for init in graph.graph.initializer:
        values = {"W": w2, "B": b2}.get(init.name)
        if values is not None:
            init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(graph, other / "tiny.onnx")
    expected = OnnxRuntimeBackend("cpu", threads=1).load(other, _manifest(other), "tiny").run(feeds)
    np.testing.assert_array_equal(after["y"], expected["y"])
    np.testing.assert_allclose(after["y"], _reference(feeds["x"], w2, b2), rtol=1e-6, atol=1e-6)
    assert not np.array_equal(after["y"], before["y"])

    # one weight at a time: the others keep their refit values
    session.refit({"scale": np.array(3.0, np.float32)})
    np.testing.assert_allclose(session.run(feeds)["y"], _reference(feeds["x"], w2, b2, 3.0), rtol=1e-6, atol=1e-6)

    session.refit({"W": W.copy(), "B": B.copy(), "scale": SCALE.copy()})
    restored = session.run(feeds)
    np.testing.assert_array_equal(restored["y"], before["y"])
    np.testing.assert_array_equal(restored["count"], before["count"])


def test_refit_unknown_names_lists_them_and_keeps_old_weights(session):
    feeds = _feeds()
    before = session.run(feeds)
    with pytest.raises(BackendError, match=r"2 weight\(s\) are not initializers of tiny.onnx: up.0, down.0"):
        session.refit({"W": W * 2, "up.0": W, "down.0": W})
    np.testing.assert_array_equal(session.run(feeds)["y"], before["y"])


def test_refit_wrong_shape_or_dtype(session):
    with pytest.raises(BackendError, match=r"'W' of tiny.onnx: expected float32\[4, 3\], got float32\[3, 4\]"):
        session.refit({"W": W.T.copy()})
    with pytest.raises(BackendError, match=r"'B' of tiny.onnx: expected float32\[4\], got float16\[4\]"):
        session.refit({"B": B.astype(np.float16)})


def test_refit_of_inline_weights_says_to_rebuild(tmp_path):
    manifest = _save_graph(tmp_path, external=False)
    session = OnnxRuntimeBackend("cpu", threads=1).load(tmp_path, manifest, "tiny")
    with pytest.raises(BackendError, match="external data"):
        session.refit({"W": W * 2})


def test_device_binding_reuses_buffers_per_shape(session):
    """The GPU providers' I/O binding path, exercised with CPU buffers: same results as a plain run, one
    binding (and CUDA graph id) per input shape, buffers updated in place between runs."""
    from lcmrt.backends.onnxruntime import DeviceBinding

    binding = DeviceBinding(session, "cpu", 0)
    for batch in (2, 2, 3, 2):
        feeds = _feeds(batch)
        got = binding.run(feeds)
        expected = session.run(feeds)
        np.testing.assert_array_equal(got["y"], expected["y"])
        np.testing.assert_array_equal(got["count"], expected["count"])
    assert len(binding._bindings) == 2
    graph_ids = sorted(b[3].get_run_config_entry("gpu_graph_id") for b in binding._bindings.values())
    assert graph_ids == ["1", "2"]
