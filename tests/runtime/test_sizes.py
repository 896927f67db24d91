"""Several sizes in one engine folder: built once with its weights stored once, each size giving the image of a
folder built for that size alone, on ONNX Runtime and on the TensorRT stand-in (one optimization profile per
size), through adapter swaps."""
from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lcmrt import Pipeline
from lcmrt.cli import cli
from lcmrt.errors import InputError
from lcmrt.manifest import read_manifest

from tiny_engines import CROSS_GRAPH_ATOL, build_tiny_engine  # noqa: E402

SIZES = [(128, 128), (96, 160)]  # (height, width): the default square and a landscape size
CALL = {"prompt": "a watercolor fox", "num_inference_steps": 3, "seed": 5, "output": "np"}


@pytest.fixture(scope="module")
def multi(tiny_model, tmp_path_factory):
    return build_tiny_engine(tiny_model, tmp_path_factory.mktemp("sizes") / "multi", refittable=True, sizes=SIZES)


@pytest.fixture(scope="module")
def singles(tiny_model, tmp_path_factory):
    return {size: build_tiny_engine(tiny_model, tmp_path_factory.mktemp("sizes") / f"{size[1]}x{size[0]}",
                                    refittable=True, sizes=[size]) for size in SIZES}


def test_one_graph_per_component_serves_every_size(multi, singles):
    manifest, single = read_manifest(multi), read_manifest(singles[SIZES[0]])
    assert manifest.shapes.sizes == tuple(SIZES) and (manifest.shapes.height, manifest.shapes.width) == SIZES[0]
    unet = manifest.component("unet")
    assert unet.inputs[0].shape == ("unet_batch", 4, "latent_height", "latent_width")
    assert unet.dim_values == {"latent_height": (16, 12), "latent_width": (16, 20), "unet_batch": (1, 2)}
    assert manifest.component("vae_decoder").outputs[0].shape == (1, 3, "height", "width")
    # validated against torch at each size
    assert [p["latent_width"] for p in unet.data["validation"]["profiles"]] == [16, 20]
    assert unet.data["validation"]["max_abs_diff"] <= unet.data["validation"]["tolerance"]
    # the weights once: the graph files are those of a one-size folder, give or take the shape nodes
    for name in ("unet", "vae_decoder", "text_encoder"):
        size = sum((multi / f).stat().st_size for f in manifest.component(name).graph_fp32.sha256)
        alone = sum((singles[SIZES[0]] / f).stat().st_size for f in single.component(name).graph_fp32.sha256)
        assert abs(size - alone) < 0.05 * alone, (name, size, alone)


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_each_size_gives_the_image_of_its_own_folder(multi, singles, guidance):
    """Also after an adapter swap: one refit serves every size."""
    pipe = Pipeline.load(multi)
    alone = {size: Pipeline.load(folder) for size, folder in singles.items()}
    call = {**CALL, "guidance_scale": guidance, **({"negative_prompt": "blurry"} if guidance > 1 else {})}
    for style in (None, 0.3):
        if style is not None:
            pipe.set_adapters({"style": style})
            for p in alone.values():
                p.set_adapters({"style": style})
        images = {}
        for height, width in SIZES:
            images[height, width] = pipe(**call, height=height, width=width)
            expected = alone[height, width](**call)
            assert images[height, width].shape == expected.shape == (1, height, width, 3)
            np.testing.assert_allclose(images[height, width], expected, atol=CROSS_GRAPH_ATOL, rtol=0)
        np.testing.assert_array_equal(pipe(**call), images[SIZES[0]])  # the default is the first size


def test_a_size_the_folder_does_not_serve_is_refused(multi):
    pipe = Pipeline.load(multi)
    for height, width in ((64, 64), (96, None), (96.0, 160), ("96", 160)):
        with pytest.raises(InputError, match=r"serves 128x128, 160x96 \(width x height\).*--size WIDTHxHEIGHT"):
            pipe("a fox", height=height, width=width)
    latents = np.zeros((1, 4, 16, 16), np.float32)  # the default size's latents, for the other size
    with pytest.raises(Exception, match=r"latents has shape \[1, 4, 16, 16\].*needs \[1, 4, 12, 20\]"):
        pipe("a fox", height=96, width=160, latents=latents)


def test_cli_builds_and_generates_sizes(multi, tiny_model, tmp_path):
    runner = CliRunner()
    out = tmp_path / "fox.png"
    result = runner.invoke(cli, ["generate", str(multi), "a fox", "--steps", "2", "--seed", "1", "--size", "160x96",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (160, 96)
    result = runner.invoke(cli, ["info", str(multi)])
    assert result.exit_code == 0 and "(sizes 128x128, 160x96)" in result.output
    model = str(tiny_model["model"])
    for args, words in (
        (["--size", "128x128", "--height", "256"], "either as --size WIDTHxHEIGHT .* or as --height/--width"),
        (["--size", "128"], "--size '128': expected WIDTHxHEIGHT"),
        (["--size", "128x100"], "height 100 of the size 128x100 is not a multiple of 8.*try 96"),
        (["--size", "128x128", "--size", "128X128"], "--size lists 128x128, 128x128: give 1 to 16 different"),
    ):
        result = runner.invoke(cli, ["build", model, "--lcm-lora", str(tiny_model["lcm_lora"]), "--out",
                                     str(tmp_path / "never"), *args])
        assert result.exit_code != 0 and not (tmp_path / "never").exists()
        assert re.search(words, " ".join(result.output.split())), result.output


@pytest.fixture(scope="module")
def trt_multi(multi, tmp_path_factory):
    from gpu_standin.fixtures import _built

    return _built(multi, tmp_path_factory, "multi")


def test_tensorrt_one_profile_per_size(gpu_standin_modules, trt_multi, multi):
    """One engine per component with a profile per size; the runtime switches profiles per size, and one refit
    updates the engine for every size."""
    trt = gpu_standin_modules.trt
    manifest = read_manifest(trt_multi)
    unet_entry = next(e for e in manifest.engines if e.component == "unet")
    assert unet_entry.data["sizes"] == [[128, 128], [96, 160]]
    header = trt.read_plan_header((trt_multi / unet_entry.file).read_bytes())
    assert header["extra_memory_targets"] == [1.0, 0.0]  # the second size adds no weight space
    assert [p["sample"] for p in header["profiles"]] == [[[1, 4, 16, 16], [2, 4, 16, 16], [2, 4, 16, 16]],
                                                         [[1, 4, 12, 20], [2, 4, 12, 20], [2, 4, 12, 20]]]
    gpu, cpu = Pipeline.load(trt_multi, backend="tensorrt"), Pipeline.load(multi)
    call = {**CALL, "guidance_scale": 1.5}
    for style in (None, 0.3):
        if style is not None:
            gpu.set_adapters({"style": style})
            cpu.set_adapters({"style": style})
        for height, width in SIZES + SIZES[:1]:  # back to the first: its profile again, its graphs re-captured
            np.testing.assert_allclose(gpu(**call, height=height, width=width),
                                       cpu(**call, height=height, width=width), atol=CROSS_GRAPH_ATOL, rtol=0)
    assert gpu.sessions["unet"].context.profile_switches >= 4


def test_tensorrt_shapes_outside_the_profiles_and_refusals(gpu_standin_modules, trt_multi, monkeypatch):
    from lcmrt.backends.tensorrt import TensorRTBackend
    from lcmrt.engines.fp16 import example_inputs
    from lcmrt.errors import BackendError

    manifest = read_manifest(trt_multi)
    unet = TensorRTBackend().load(trt_multi, manifest, "unet")
    feeds = example_inputs(manifest, "unet", size=(96, 160))
    assert unet.run(feeds)["noise_pred"].shape == (2, 4, 12, 20)
    unlisted = {**feeds, "sample": np.zeros((2, 4, 12, 16), np.float32)}  # fits the buffer, in no profile
    with pytest.raises(BackendError, match=r"outside the engine's optimization profiles.*lcmrt build --engines-only"):
        unet.run(unlisted)
    first = example_inputs(manifest, "unet")
    monkeypatch.setattr(unet.context, "set_optimization_profile_async", lambda index, stream: False)
    with pytest.raises(BackendError, match="refused optimization profile 0 of unet"):
        unet.run(first)
    monkeypatch.undo()
    monkeypatch.setattr(unet.context, "set_input_shape", lambda name, shape: False)
    with pytest.raises(BackendError, match=r"refused the shape \[2, 4, 16, 16\] of sample"):
        unet.run(first)


def test_fp16_and_int8_graphs_serve_every_size(tiny_model, tmp_path):
    """fp16 and int8 graphs are converted from the one graph, so they keep its size axes; their fidelity is
    measured at the first size."""
    from lcmrt.engines.build import EngineRequest

    folder = build_tiny_engine(tiny_model, tmp_path / "multi", sizes=SIZES,
                               engines=EngineRequest(fp16=True, int8=True, ort_cpu_graphs=False))
    fp32 = Pipeline.load(folder)
    for precision in ("fp16", "int8"):
        pipe = Pipeline.load(folder, backend="onnxruntime", precision=precision)
        assert pipe.sessions["unet"].precision == precision
        assert "fidelity" in read_manifest(folder).component("unet").variants[precision].data
        for height, width in SIZES:
            image = pipe(**CALL, height=height, width=width)
            diff = float(np.abs(image - fp32(**CALL, height=height, width=width)).max())
            assert image.shape == (1, height, width, 3) and 0 < diff < 0.1, (precision, height, width, diff)
