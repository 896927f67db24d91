"""The openvino backend on the tiny folders: the same images as ONNX Runtime (txt2img with and without guidance,
img2img, several sizes), adapter swaps that are exact and all or nothing, OpenVINO's saved models and model
cache, concurrent generations, and clear errors."""
from __future__ import annotations

import json
import shutil
import sys
import threading

import numpy as np
import pytest

import lcmrt
from lcmrt.errors import AdapterError, BackendError, EngineFolderError
from lcmrt.manifest import OPENVINO, read_manifest

from tiny_engines import CROSS_GRAPH_ATOL, edit_image

OPENVINO_ATOL = 1e-4  # the bound between backends; measured <= 1.1e-6 on the tiny folders
CALL = {"prompt": "a watercolor fox", "num_inference_steps": 3, "seed": 5, "output": "np"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


def load(folder, cache, **options):
    return lcmrt.Pipeline.load(folder, backend="openvino", cache_dir=cache, **options)


def test_images_match_onnxruntime(tiny_engine, cache):
    manifest = read_manifest(tiny_engine)
    assert all(OPENVINO in manifest.component(c).variants for c in manifest.components)  # saved by the build
    ort, ov = lcmrt.Pipeline.load(tiny_engine), load(tiny_engine, cache)
    assert ov.backend == "openvino" and ov.sessions["unet"].path.name == "unet.openvino.xml"
    for call in ({}, {"guidance_scale": 1.5, "negative_prompt": "blurry"},
                 {"image": edit_image(), "strength": 0.6, "num_inference_steps": 4}):
        a, b = ort(**{**CALL, **call}), ov(**{**CALL, **call})
        diff = np.abs(a - b).max()
        print(f"openvino vs onnxruntime {sorted(call)}: max abs diff {diff:.2e}")
        assert diff <= OPENVINO_ATOL and a.std() > 0.01


def test_adapter_swaps_are_exact_and_match_onnxruntime(tiny_refit_engine, cache):
    ort, ov = lcmrt.Pipeline.load(tiny_refit_engine), load(tiny_refit_engine, cache)
    first = ov(**CALL)
    for weight in (0.0, 1.3, 0.8):
        ort.set_adapters({"style": weight})
        ov.set_adapters({"style": weight})
        image = ov(**CALL)
        diff = np.abs(image - ort(**CALL)).max()
        print(f"openvino vs onnxruntime, style at {weight}: max abs diff {diff:.2e}")
        assert diff <= OPENVINO_ATOL
        if weight != 0.8:
            assert np.abs(image - first).max() > 100 * CROSS_GRAPH_ATOL  # the swap reached the image
    np.testing.assert_array_equal(image, first)  # A -> B -> A, bit for bit
    # loading with a set equals switching to it
    np.testing.assert_array_equal(load(tiny_refit_engine, cache, adapters={"style": 1.3})(**CALL),
                                  (ov.set_adapters({"style": 1.3}), ov(**CALL))[1])


def test_a_failed_swap_keeps_the_previous_set(tiny_refit_engine, cache, monkeypatch):
    pipe = load(tiny_refit_engine, cache)
    before = pipe(**CALL)

    def fail(weights):
        raise BackendError("simulated failure")

    monkeypatch.setattr(pipe.sessions["unet"], "refit", fail)  # the text encoder switches first, then this fails
    with pytest.raises(AdapterError, match="still active"):
        pipe.set_adapters({"style": 0.2})
    monkeypatch.undo()
    assert pipe.adapters == {"lcm": 1.0, "style": 0.8}
    np.testing.assert_array_equal(pipe(**CALL), before)


def test_bad_refit_weights_are_refused_before_any_is_bound(tiny_refit_engine, cache):
    session = load(tiny_refit_engine, cache).sessions["unet"]
    name, (shape, dtype) = next(iter(session._weight_specs.items()))
    version = session._version
    with pytest.raises(BackendError, match="not refittable weights"):
        session.refit({name: np.zeros(shape, dtype), "no-such-weight": np.zeros(1, np.float32)})
    with pytest.raises(BackendError, match=r"expected float32\["):
        session.refit({name: np.zeros((1, *shape), dtype)})
    assert session._version == version


def test_several_sizes(tiny_model, tmp_path, cache):
    from tiny_engines import build_tiny_engine

    folder = build_tiny_engine(tiny_model, tmp_path / "sizes", sizes=[(128, 128), (96, 160)])
    ort, ov = lcmrt.Pipeline.load(folder), load(folder, cache)
    for height, width in ((128, 128), (96, 160)):
        a, b = ort(**CALL, height=height, width=width), ov(**CALL, height=height, width=width)
        assert a.shape == b.shape == (1, height, width, 3) and np.abs(a - b).max() <= OPENVINO_ATOL


def test_reads_the_onnx_graph_of_a_folder_without_openvino_models(tiny_engine, tmp_path, cache):
    folder = tmp_path / "no-openvino"
    shutil.copytree(tiny_engine, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["components"].values():
        entry["variants"].pop(OPENVINO)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pipe = load(folder, cache)
    assert pipe.sessions["unet"].path.name == "unet.onnx"
    assert np.abs(pipe(**CALL) - load(tiny_engine, cache)(**CALL)).max() <= CROSS_GRAPH_ATOL


def test_a_second_load_reads_the_model_cache(tiny_engine, tmp_path):
    cache = tmp_path / "cache"
    first = load(tiny_engine, cache)(**CALL)
    blobs = sorted(p.name for p in cache.iterdir())
    assert len(blobs) == 3  # text encoder, UNet, VAE decoder (the encoder loads with the first img2img call)
    second = load(tiny_engine, cache)(**CALL)
    assert sorted(p.name for p in cache.iterdir()) == blobs  # nothing compiled again
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(lcmrt.Pipeline.load(tiny_engine, backend="openvino", cache=False)(**CALL), first)


def test_concurrent_generations_equal_serial_ones(tiny_refit_engine, cache):
    pipe = load(tiny_refit_engine, cache)
    seeds = [1, 2, 3, 4]
    serial = {seed: pipe(**{**CALL, "seed": seed}) for seed in seeds}
    results = {}

    def work(seed):
        results[seed] = pipe(**{**CALL, "seed": seed})

    threads = [threading.Thread(target=work, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seed in seeds:
        np.testing.assert_array_equal(results[seed], serial[seed])


def test_damaged_model_files_are_refused(tiny_engine, tmp_path, cache):
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_engine, folder)
    with open(folder / "unet.openvino.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(EngineFolderError, match="unet.openvino.bin"):
        load(folder, cache)


def test_clear_errors(tiny_engine, monkeypatch):
    with pytest.raises(BackendError, match="precision 'fp16' is an ONNX Runtime option"):
        lcmrt.Pipeline.load(tiny_engine, backend="openvino", precision="fp16")
    with pytest.raises(BackendError, match="threads must be a positive integer"):
        lcmrt.Pipeline.load(tiny_engine, backend="openvino", threads=0)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    with pytest.raises(BackendError, match=r'pip install "lcmrt\[openvino\]"'):
        lcmrt.Pipeline.load(tiny_engine, backend="openvino")


def test_build_flags(tiny_model, tmp_path, monkeypatch):
    from lcmrt.engines.build import EngineRequest
    from tiny_engines import build_tiny_engine

    folder = build_tiny_engine(tiny_model, tmp_path / "plain", engines=EngineRequest(openvino=False))
    manifest = read_manifest(folder)
    assert not any(OPENVINO in manifest.component(c).variants for c in manifest.components)
    assert not list(folder.glob("*.openvino.*"))
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendError, match="--openvino needs OpenVINO"):
        build_tiny_engine(tiny_model, tmp_path / "asked", engines=EngineRequest(openvino=True))
    assert not (tmp_path / "asked").exists()


def test_cli_generate_with_the_openvino_backend(tiny_engine, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from lcmrt.cli import cli

    out = tmp_path / "fox.png"
    result = CliRunner().invoke(cli, ["generate", str(tiny_engine), "a watercolor fox", "--seed", "5", "--steps", "3",
                                      "--backend", "openvino", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.text["backend"] == "openvino"
        pixels = np.asarray(image, dtype=np.float32) / 255
    reference = lcmrt.Pipeline.load(tiny_engine)(**CALL)[0]
    assert np.abs(pixels - reference).max() <= 1 / 255 + OPENVINO_ATOL  # 8-bit rounding of the same image


def test_bench_times_the_openvino_unet(tiny_engine, cache):
    from lcmrt.bench import measure

    result = measure(tiny_engine, backend="openvino", steps=3, warm_runs=1, cache_dir=cache)
    assert result["backend"] == "openvino"
    for record in (result["first"], *result["warm"]):
        assert len(record["unet_run"]) == 3 and all(0 < s <= u for s, u in zip(record["unet_run"], record["unet_steps"]))
