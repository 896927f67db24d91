"""lcmrt.backends.engine_keys: where engines live, and the errors for engines this machine cannot use."""
import pytest

from lcmrt.backends.engine_keys import (EngineKey, engine_entry, rebuild_command, replace_engine_entries,
                                        select_engine)
from lcmrt.errors import EngineFolderError
from lcmrt.manifest import file_sha256

KEY = EngineKey("8.6", "10.3.0")


def test_layout():
    assert KEY.dirname == "trt/sm86-10.3.0"
    assert KEY.plan_path("unet") == "trt/sm86-10.3.0/unet.plan"
    assert KEY.timing_cache_path == "trt/sm86-10.3.0/timing.cache"
    assert EngineKey("10.0", "11.4.0.106").sm == "sm100"
    with pytest.raises(ValueError):
        EngineKey("86", "10.3")
    with pytest.raises(ValueError):
        EngineKey("8.6", "10.3/../x")


def _folder(tmp_path, key=KEY, precision="fp16"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "unet.onnx").write_bytes(b"fp32 graph")
    (tmp_path / "unet.fp16.onnx").write_bytes(b"fp16 graph")
    (tmp_path / key.dirname).mkdir(parents=True)
    plan = tmp_path / key.plan_path("unet")
    plan.write_bytes(b"plan")
    manifest = {"components": {"unet": {
        "file": "unet.onnx", "precision": "fp32", "sha256": {"unet.onnx": file_sha256(tmp_path / "unet.onnx")},
        "variants": {"fp16": {"file": "unet.fp16.onnx",
                              "sha256": {"unet.fp16.onnx": file_sha256(tmp_path / "unet.fp16.onnx")}}}}}}
    src = "unet.fp16.onnx" if precision == "fp16" else "unet.onnx"
    manifest["engines"] = [engine_entry(key, "unet", src, file_sha256(tmp_path / src), file_sha256(plan), precision)]
    return manifest


def test_select_ok(tmp_path):
    manifest = _folder(tmp_path)
    assert select_engine(tmp_path, manifest, "unet", KEY).file == "trt/sm86-10.3.0/unet.plan"
    manifest = _folder(tmp_path / "b", precision="fp32")
    assert select_engine(tmp_path / "b", manifest, "unet", KEY).source_file == "unet.onnx"


@pytest.mark.parametrize("other, words", [
    (EngineKey("8.9", "10.3.0"), ["built for compute capability 8.6 with TensorRT 10.3.0",
                                  "compute capability 8.9 (sm89) with TensorRT 10.3.0"]),
    (EngineKey("8.6", "10.4.0"), ["TensorRT 10.4.0"]),
])
def test_other_gpu_or_version(tmp_path, other, words):
    manifest = _folder(tmp_path)
    with pytest.raises(EngineFolderError) as e:
        select_engine(tmp_path, manifest, "unet", other)
    message = str(e.value)
    assert rebuild_command(tmp_path) in message and "lcmrt build --engines-only" in message
    for w in words:
        assert w in message


def test_no_engine(tmp_path):
    manifest = _folder(tmp_path)
    manifest["engines"] = []
    with pytest.raises(EngineFolderError, match="no TensorRT engine for unet.*--engines-only"):
        select_engine(tmp_path, manifest, "unet", KEY)


def test_graph_changed_after_build(tmp_path):
    manifest = _folder(tmp_path)
    manifest["components"]["unet"]["variants"]["fp16"]["sha256"]["unet.fp16.onnx"] = "0" * 64
    with pytest.raises(EngineFolderError, match="different unet graph"):
        select_engine(tmp_path, manifest, "unet", KEY)


def test_plan_missing_or_modified(tmp_path):
    manifest = _folder(tmp_path)
    (tmp_path / KEY.plan_path("unet")).write_bytes(b"other plan")
    with pytest.raises(EngineFolderError, match="does not match the hash"):
        select_engine(tmp_path, manifest, "unet", KEY)
    select_engine(tmp_path, manifest, "unet", KEY, check_plan_hash=False)
    (tmp_path / KEY.plan_path("unet")).unlink()
    with pytest.raises(EngineFolderError, match="missing"):
        select_engine(tmp_path, manifest, "unet", KEY)


def test_replace_entries():
    a = engine_entry(KEY, "unet", "u.onnx", "1", "p1", "fp16")
    b = engine_entry(EngineKey("8.9", "10.3.0"), "unet", "u.onnx", "1", "p2", "fp16")
    a2 = engine_entry(KEY, "unet", "u.onnx", "2", "p3", "fp16")
    assert replace_engine_entries([a, b], [a2]) == [b, a2]


def test_engine_for_other_sizes(tmp_path):
    """An engine records the sizes its optimization profiles serve; a folder serving others needs new engines."""
    manifest = _folder(tmp_path)
    shapes = {"batch": 1, "height": 64, "width": 64, "latent_channels": 4, "latent_height": 8, "latent_width": 8,
              "text_length": 77, "unet_batch_sizes": [1], "sizes": [[64, 64], [48, 80]]}
    manifest["shapes"] = shapes
    manifest["engines"][0]["sizes"] = [[64, 64], [48, 80]]
    assert select_engine(tmp_path, manifest, "unet", KEY).data["sizes"] == [[64, 64], [48, 80]]
    manifest["engines"][0]["sizes"] = [[64, 64]]
    with pytest.raises(EngineFolderError, match=r"profiles for the sizes \[\[64, 64\]\].*serves \[\[64, 64\], "
                                                r"\[48, 80\]\].*lcmrt build --engines-only"):
        select_engine(tmp_path, manifest, "unet", KEY)
