"""lcmrt/engines/quantize.py: INT8 graph variants of the tiny engine folder, their fidelity against the fp32
graphs, and loading them with precision="int8"."""
import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import lcmrt
from lcmrt.backends import onnxruntime as ort_backend
from lcmrt.backends.onnxruntime import cpu_graph_key
from lcmrt.cli import cli
from lcmrt.engines.fp16 import psnr
from lcmrt.engines.openvino_int8 import compress_folder
from lcmrt.engines.quantize import INT8_SUFFIX, quantize_folder
from lcmrt.errors import EngineFolderError, ExportError
from lcmrt.manifest import file_sha256, load_manifest

from tiny_engines import EMULATED_AVX2_CPU, engine_with_variant, run_on_emulated_avx2

# Whole-image bound on the tiny model (4 steps, [0, 1] images): the int8 UNet moves the image by ~2e-3
# (measured 68.8 dB); 30 dB still catches a broken graph (those land near 10 dB).
MIN_IMAGE_PSNR_DB = 30.0
# UNet output vs the fp32 graph on the seeded inputs, relative to the output's peak: 7-bit weights measured
# 0.59-0.70% (3 seeds) on AVX-512 VNNI and on an emulated AVX2 CPU; full-range weights saturating on AVX2
# measured 5.4-6.5%. 2% holds on every x86 CPU and still catches saturation.
MAX_UNET_RELATIVE_DIFF = 0.02


@pytest.fixture(scope="module")
def int8_engine(tiny_engine, tmp_path_factory):
    return engine_with_variant(tiny_engine, tmp_path_factory.mktemp("int8") / "engine", quantize_folder)


def test_variant_is_written_and_recorded(int8_engine):
    manifest = load_manifest(int8_engine)
    entry = manifest["components"]["unet"]["variants"]["int8"]
    assert entry["file"] == f"unet{INT8_SUFFIX}" and entry["precision"] == "int8"
    assert entry["sha256"] == {entry["file"]: file_sha256(int8_engine / entry["file"])}
    assert entry["source_sha256"] == manifest["components"]["unet"]["sha256"]["unet.onnx"]
    assert entry["quantization"]["op_types"] == ["MatMul", "Gemm"] and entry["quantization"]["quantized_nodes"] > 0
    assert entry["quantization"]["reduce_range"] is True
    assert entry["fidelity"]["measured_on"] == cpu_graph_key()
    fidelity = entry["fidelity"]["outputs"]["noise_pred"]
    print(f"tiny UNet int8 vs fp32: max abs diff {fidelity['max_abs_diff']:.2e} ({fidelity['relative']:.2%} of peak)")
    assert 0 < fidelity["relative"] < MAX_UNET_RELATIVE_DIFF
    assert entry["fidelity"]["finite"]
    # only the UNet by default; the fp32 graph is untouched
    assert all("int8" not in c.get("variants", {}) for name, c in manifest["components"].items() if name != "unet")
    assert file_sha256(int8_engine / "unet.onnx") == manifest["components"]["unet"]["sha256"]["unet.onnx"]
    # the int8 graph's weights really are int8
    import onnx

    model = onnx.load(str(int8_engine / entry["file"]))
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    assert (int8_engine / entry["file"]).stat().st_size < (int8_engine / "unet.onnx").stat().st_size


@pytest.fixture(scope="module")
def full_range_int8_engine(tiny_engine, tmp_path_factory):
    """An int8 variant with full-range weights, as lcmrt quantized before it used 7-bit weights."""
    def full_range(folder, manifest):
        quantize_folder(folder, manifest, reduce_range=False)
        del manifest["components"]["unet"]["variants"]["int8"]["quantization"]["reduce_range"]  # older folders lack it

    return engine_with_variant(tiny_engine, tmp_path_factory.mktemp("int8-full-range") / "engine", full_range)


# Measures a folder's int8 UNet against its fp32 graph with the same code the build uses.
_EMULATED_FIDELITY = """
import json, sys
from pathlib import Path
from lcmrt.engines.quantize import int8_fidelity
from lcmrt.manifest import load_manifest
result = {}
for folder in map(Path, sys.argv[1:]):
    manifest = load_manifest(folder)
    fidelity = int8_fidelity(folder, manifest, "unet", manifest["components"]["unet"]["variants"]["int8"])
    result[str(folder)] = fidelity["outputs"]["noise_pred"]["relative"]
print(json.dumps(result))
"""


@pytest.mark.slow
def test_int8_is_accurate_on_an_avx2_cpu_without_vnni(int8_engine, full_range_int8_engine):
    """Whatever CPU runs the suite, measure the int8 graphs on an emulated AVX2-only CPU, where u8s8 products
    saturate: 7-bit weights stay within the bound, full-range weights do not (so the bound can fail)."""
    stdout = run_on_emulated_avx2(_EMULATED_FIDELITY, str(int8_engine), str(full_range_int8_engine))
    result = json.loads(stdout.strip().splitlines()[-1])
    seven_bit, full_range = result[str(int8_engine)], result[str(full_range_int8_engine)]
    print(f"emulated {EMULATED_AVX2_CPU}: int8 UNet vs fp32, 7-bit weights {seven_bit:.2%} of peak, "
          f"full-range {full_range:.2%}")
    assert 0 < seven_bit < MAX_UNET_RELATIVE_DIFF
    assert full_range > MAX_UNET_RELATIVE_DIFF


def test_full_range_int8_warns_on_a_cpu_without_vnni(full_range_int8_engine, int8_engine, monkeypatch):
    from lcmrt import cpu

    avx2 = {"machine": "x86_64", "isa": ["avx", "avx2", "f16c", "fma"]}
    vnni = {"machine": "x86_64", "isa": ["avx", "avx2", "avx512bw", "avx512f", "avx512_vnni", "f16c", "fma"]}
    monkeypatch.setattr(ort_backend, "cpu_description", lambda: avx2)
    with pytest.warns(UserWarning, match=r"no VNNI.*lcmrt build --engines-only .* --int8"):
        lcmrt.Pipeline.load(full_range_int8_engine, backend="onnxruntime", precision="int8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lcmrt.Pipeline.load(int8_engine, backend="onnxruntime", precision="int8")  # 7-bit weights: accurate
        lcmrt.Pipeline.load(full_range_int8_engine, backend="onnxruntime")  # fp32 graphs
        monkeypatch.setattr(ort_backend, "cpu_description", lambda: vnni)
        lcmrt.Pipeline.load(full_range_int8_engine, backend="onnxruntime", precision="int8")
    assert cpu.int8_saturates(avx2["isa"]) and not cpu.int8_saturates(vnni["isa"])
    assert not cpu.int8_saturates(["avx2", "avx_vnni"]) and not cpu.int8_saturates(["asimd"])


def test_int8_pipeline_image_is_close_to_fp32(tiny_engine, int8_engine):
    fp32 = lcmrt.Pipeline.load(tiny_engine, backend="onnxruntime")
    int8 = lcmrt.Pipeline.load(int8_engine, backend="onnxruntime", precision="int8")
    assert {name: s.precision for name, s in int8.sessions.items()} == {
        "text_encoder": "fp32", "unet": "int8", "vae_decoder": "fp32"}
    a = fp32("a watercolor fox", seed=5, num_inference_steps=4, output="np")
    b = int8("a watercolor fox", seed=5, num_inference_steps=4, output="np")
    db = psnr(a, b)
    print(f"tiny model, 4 steps, int8 UNet vs fp32: image PSNR {db:.1f} dB, max abs diff {np.abs(a - b).max():.2e}")
    assert 0 < np.abs(a - b).max() and db > MIN_IMAGE_PSNR_DB


def test_int8_graph_hash_is_verified(int8_engine, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(int8_engine, folder)
    lcmrt.Pipeline.load(folder, backend="onnxruntime")  # fp32 does not read the int8 graph
    with open(folder / f"unet{INT8_SUFFIX}", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineFolderError, match="does not match the hash"):
        lcmrt.Pipeline.load(folder, backend="onnxruntime", precision="int8")


def test_int8_on_a_folder_without_int8_graphs_is_an_error(tiny_engine, tmp_path):
    """It used to run fp32 and record nothing (issue 11)."""
    with pytest.raises(EngineFolderError, match=r"has no int8 graphs.*lcmrt build --engines-only .* --int8"):
        lcmrt.Pipeline.load(tiny_engine, backend="onnxruntime", precision="int8")
    result = CliRunner().invoke(cli, ["generate", str(tiny_engine), "a fox", "--precision", "int8",
                                      "-o", str(tmp_path / "fox.png")])
    assert result.exit_code != 0 and "has no int8 graphs" in result.output
    assert not (tmp_path / "fox.png").exists()


def test_png_records_the_precision_that_ran(int8_engine, tmp_path):
    from lcmrt.images import read_png_metadata

    result = CliRunner().invoke(cli, ["generate", str(int8_engine), "a fox", "--precision", "int8", "--steps", "2",
                                      "-o", str(tmp_path / "fox.png")])
    assert result.exit_code == 0, result.output
    assert read_png_metadata(tmp_path / "fox.png")["precision"] == {
        "text_encoder": "fp32", "unet": "int8", "vae_decoder": "fp32"}


@pytest.mark.parametrize("write_int8", [quantize_folder, compress_folder], ids=["onnxruntime", "openvino"])
def test_refit_and_missing_components_are_refused(write_int8, tiny_refit_engine, tiny_engine):
    with pytest.raises(ExportError, match="refit at run time"):
        write_int8(tiny_refit_engine, load_manifest(tiny_refit_engine))
    with pytest.raises(ExportError, match="no 'controlnet' component"):
        write_int8(tiny_engine, load_manifest(tiny_engine), ("controlnet",))


def test_cli_engines_only_int8(tiny_engine, tmp_path):
    folder = tmp_path / "engine"
    shutil.copytree(tiny_engine, folder)
    result = CliRunner().invoke(cli, ["build", "--engines-only", str(folder), "--no-ort-cpu-graphs", "--int8"])
    assert result.exit_code == 0, result.output
    assert "unet int8 vs fp32" in result.output
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["components"]["unet"]["variants"]["int8"]["precision"] == "int8"


def test_cli_int8_with_refittable_is_refused(tiny_model, tmp_path):
    result = CliRunner().invoke(cli, ["build", str(tiny_model["model"]), "--lcm-lora", str(tiny_model["lcm_lora"]),
                                      "--out", str(tmp_path / "x"), "--refittable", "--int8"])
    assert result.exit_code == 2 and "--int8" in result.output
    assert not (tmp_path / "x").exists()
