"""The CPU backend per component, chosen at build time: what the build measures and records, the rule that
picks a backend, backend "auto" following the choice (images and adapter swaps as on one backend), and the
cases where it does not follow it (another CPU, a backend not installed, options of one backend), each said."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

import lcmrt
from lcmrt.backends.chosen import CPU_BACKENDS
from lcmrt.backends.openvino import OvSession
from lcmrt.backends.onnxruntime import OrtSession
from lcmrt.cli import cli
from lcmrt.cpu import cpu_class
from lcmrt.engines.backend_choice import MARGIN, ROUNDS, RUNS, pick
from lcmrt.engines.build import EngineRequest, add_engines
from lcmrt.errors import BackendError, EngineFolderError
from lcmrt.manifest import MANIFEST_NAME, read_manifest

from tiny_engines import edit_image

OPENVINO_ATOL = 1e-4  # as in test_openvino.py: the bound between the two CPU backends
CALL = {"prompt": "a watercolor fox", "num_inference_steps": 3, "seed": 5, "output": "np"}
MEASURE = EngineRequest(ort_cpu_graphs=False, openvino=False, choose_backends=True)  # the OpenVINO models exist


@pytest.fixture(scope="module")
def measured(tiny_refit_engine, tmp_path_factory):
    """A refittable tiny folder whose build measured its CPU backends."""
    folder = shutil.copytree(tiny_refit_engine, tmp_path_factory.mktemp("choice") / "engine")
    add_engines(folder, MEASURE)
    return folder


def with_choice(folder, tmp_path, backends: dict | None = None, **fields):
    """A copy of `folder` whose recorded choice runs `backends` (component -> backend; the others on ONNX
    Runtime) and has `fields` replaced."""
    copy = shutil.copytree(folder, tmp_path / "copy")
    data = json.loads((copy / MANIFEST_NAME).read_text())
    for component, entry in data["backend_choice"]["components"].items():
        entry["backend"] = (backends or {}).get(component, "onnxruntime")
    data["backend_choice"].update(fields)
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    return copy


def test_the_build_records_each_component_on_each_backend(measured):
    choice = read_manifest(measured).backend_choice
    assert choice.cpu == cpu_class() and set(choice.data["versions"]) == set(CPU_BACKENDS)
    assert (choice.data["runs"], choice.data["rounds"]) == (RUNS, ROUNDS)
    assert set(choice.components) == set(read_manifest(measured).components)
    for name, entry in choice.components.items():
        assert set(entry.seconds) == set(entry.ratios) == set(CPU_BACKENDS) and entry.ratios["onnxruntime"] == 1.0
        assert all(s > 0 for s in entry.seconds.values()) and set(entry.resident_bytes) == set(CPU_BACKENDS)
        assert entry.max_abs_diff["openvino"] <= OPENVINO_ATOL  # the same outputs, measured on the same inputs
        assert entry.backend == pick(entry.ratios, entry.max_abs_diff, 1.0)
        print(f"{name}: {entry.seconds} -> {entry.backend}")


def test_the_rule_takes_a_clearly_faster_backend_with_the_same_outputs():
    assert pick({"onnxruntime": 1.0, "openvino": 0.9}, {"openvino": 1e-6}, 1.0) == "openvino"  # time ratios
    # within the margin: not worth a second runtime
    assert pick({"onnxruntime": 1.0, "openvino": MARGIN + 0.01}, {"openvino": 1e-6}, 1.0) == "onnxruntime"
    assert pick({"onnxruntime": 1.0, "openvino": 2.0}, {"openvino": 1e-6}, 1.0) == "onnxruntime"
    # faster but wrong: never chosen; the limit scales with the output's peak
    assert pick({"onnxruntime": 1.0, "openvino": 0.5}, {"openvino": 0.1}, 1.0) == "onnxruntime"
    assert pick({"onnxruntime": 1.0, "openvino": 0.5}, {"openvino": 0.1}, 1000.0) == "openvino"
    assert pick({"onnxruntime": 1.0}, {}, 1.0) == "onnxruntime"


def test_auto_follows_the_choice_with_the_same_images_and_exact_swaps(measured, tmp_path):
    folder = with_choice(measured, tmp_path, {"unet": "openvino", "vae_decoder": "openvino"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # following the choice says nothing
        auto = lcmrt.Pipeline.load(folder)
    ort = lcmrt.Pipeline.load(folder, backend="onnxruntime")
    assert auto.backend == "auto(text_encoder=onnxruntime, unet=openvino, vae_decoder=openvino, vae_encoder=onnxruntime)"
    assert isinstance(auto.sessions["unet"], OvSession) and isinstance(auto.sessions["text_encoder"], OrtSession)
    for call in ({}, {"guidance_scale": 1.5}, {"image": edit_image(), "strength": 0.6}):
        a, b = auto(**CALL, **call), ort(**CALL, **call)
        assert np.abs(a - b).max() <= OPENVINO_ATOL and a.std() > 0.01
    assert isinstance(auto.sessions["vae_encoder"], OrtSession)  # loaded on first use, on its own backend
    first = auto(**CALL)
    auto.set_adapters({"style": 1.4})  # the text encoder refits on ONNX Runtime, the UNet on OpenVINO
    ort.set_adapters({"style": 1.4})
    swapped = auto(**CALL)
    assert np.abs(swapped - first).max() > 1e-3 and np.abs(swapped - ort(**CALL)).max() <= OPENVINO_ATOL
    auto.set_adapters({"style": 0.8})
    np.testing.assert_array_equal(auto(**CALL), first)  # A -> B -> A, bit for bit


def test_auto_runs_onnx_runtime_where_it_chose_onnx_runtime_everywhere(measured, tmp_path):
    folder = with_choice(measured, tmp_path, {})
    assert lcmrt.Pipeline.load(folder).backend == "onnxruntime-cpu"


def test_another_cpu_gets_onnx_runtime_and_a_warning_with_the_fix(measured, tmp_path):
    folder = with_choice(measured, tmp_path, {"unet": "openvino"},
                         cpu={"machine": "x86_64", "model": "Some Other CPU", "isa": ["avx", "avx2", "fma"]})
    with pytest.warns(UserWarning, match="another CPU \\(Some Other CPU.*`lcmrt build --engines-only"):
        pipe = lcmrt.Pipeline.load(folder)
    assert pipe.backend == "onnxruntime-cpu"
    result = CliRunner().invoke(cli, ["info", str(folder)])
    assert result.exit_code == 0 and "another CPU" in result.output


def test_a_chosen_backend_not_installed_gets_onnx_runtime_and_a_warning(measured, tmp_path, monkeypatch):
    folder = with_choice(measured, tmp_path, {"unet": "openvino"})
    monkeypatch.setattr("lcmrt.backends.chosen.installed_cpu_backends", lambda: ("onnxruntime",))
    with pytest.warns(UserWarning, match="chose openvino for unet, which is not installed here.*lcmrt\\[openvino\\]"):
        assert lcmrt.Pipeline.load(folder).backend == "onnxruntime-cpu"


def test_explicit_backends_and_onnx_runtime_options_ignore_the_choice(measured, tmp_path):
    folder = with_choice(measured, tmp_path, {"unet": "openvino"})
    assert lcmrt.Pipeline.load(folder, backend="onnxruntime").backend == "onnxruntime-cpu"
    assert lcmrt.Pipeline.load(folder, refit="session").backend == "onnxruntime-cpu"  # an ONNX Runtime option
    assert lcmrt.Pipeline.load(folder, threads=1).backend.startswith("auto(")  # an option both take


@pytest.mark.parametrize("change, message", [
    ({"components": {"nope": {"backend": "onnxruntime", "seconds": {"onnxruntime": 1.0}}}}, "names no component"),
    ({"components": {"unet": {"backend": "tensorrt", "seconds": {"onnxruntime": 1.0}}}}, "did not measure"),
    ({"components": {"unet": {"backend": "onnxruntime", "seconds": {"onnxruntime": "fast"}}}}, "finite number"),
    ({"cpu": "AMD"}, "expected an object"),
])
def test_a_damaged_choice_is_a_clear_error(measured, tmp_path, change, message):
    folder = with_choice(measured, tmp_path, **change)
    with pytest.raises(EngineFolderError, match=f"backend_choice.*{message}.*--choose-backends"):
        lcmrt.Pipeline.load(folder)


def test_choosing_needs_a_second_backend(tiny_engine, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_engine, tmp_path / "engine")
    monkeypatch.setattr("lcmrt.backends.chosen.installed_cpu_backends", lambda: ("onnxruntime",))
    with pytest.raises(BackendError, match="only ONNX Runtime is installed.*lcmrt\\[openvino\\]"):
        add_engines(folder, MEASURE)
    assert read_manifest(folder).backend_choice is None


def test_the_cli_measures_and_info_shows_the_choice(tiny_engine, tmp_path):
    folder = shutil.copytree(tiny_engine, tmp_path / "engine")
    result = CliRunner().invoke(cli, ["info", str(folder)])
    assert result.exit_code == 0 and "not measured" in result.output
    result = CliRunner().invoke(cli, ["build", "--engines-only", str(folder), "--no-ort-cpu-graphs", "--no-openvino",
                                      "--choose-backends"])
    assert result.exit_code == 0, result.output
    assert "unet: onnxruntime" in result.output and "choose CPU backends" in result.output
    choice = read_manifest(folder).backend_choice
    result = CliRunner().invoke(cli, ["info", str(folder)])
    assert result.exit_code == 0 and "backend 'auto' follows it on this machine" in result.output
    assert all(f"{name} " in result.output and entry.backend in result.output
               for name, entry in choice.components.items())
    assert "openvino MB held" in result.output


def test_the_harness_measures_auto_where_it_mixes_backends(measured, tmp_path):
    from benchmarks.compare import lcmrt_backends

    mixed = lcmrt_backends(with_choice(measured, tmp_path / "mixed", {"unet": "openvino"}))
    assert mixed[-1] == "auto" and {"onnxruntime-cpu", "openvino"} <= set(mixed)
    assert "auto" not in lcmrt_backends(with_choice(measured, tmp_path / "plain", {}))
