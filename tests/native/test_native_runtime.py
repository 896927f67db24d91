"""The native runtime (lcmrt/csrc) against the Python runtime on the same tiny engine folders: same seed, same image
(guided and unguided, several images, explicit noise, after adapter swaps), A -> B -> A exact, errors as status codes
with the Python runtime's messages, one pipeline shared by threads, and the CLI's PNG."""
import ctypes
import json
import subprocess
import threading

import numpy as np
import pytest

from lcmrt.errors import EngineFolderError
from lcmrt.images import read_png_metadata
from lcmrt.noise import FIRST_STEP_NOISE, LATENTS, standard_normal
from lcmrt.pipeline import Pipeline
from native_api import NativeError, NativeLibrary, Request

PROMPT = "a watercolor fox in the snow"
IMAGE_ATOL = 1e-5  # the bound; both runtimes feed the same graphs to the same ONNX Runtime
OK, INVALID_ARGUMENT, ENGINE_FOLDER, ADAPTER, GENERATION = 0, 1, 2, 3, 4


@pytest.fixture(scope="module")
def native(native_build):
    return NativeLibrary(native_build)


def _python(folder):
    return Pipeline.load(folder, backend="onnxruntime")


def _assert_close(native_images, python_images):
    assert native_images.shape == python_images.shape
    assert np.abs(native_images - python_images).max() <= IMAGE_ATOL


@pytest.mark.parametrize("guidance,negative", [(1.0, None), (1.8, None), (1.8, "blurry, dark")])
def test_same_seed_same_image(native, tiny_engine, guidance, negative):
    py, nat = _python(tiny_engine), native.load(tiny_engine)
    images = []
    for seed in (0, 2 ** 64 - 1):
        expected = py(PROMPT, negative_prompt=negative, guidance_scale=guidance, seed=seed, output="np")
        got = nat.generate(PROMPT, negative, 4, guidance, seed)
        _assert_close(got, expected)
        images.append(got)
    assert np.abs(images[0] - images[1]).max() > 0.05  # the seed matters: the comparison can fail


def test_several_images_and_explicit_noise(native, tiny_engine):
    py, nat = _python(tiny_engine), native.load(tiny_engine)
    _assert_close(nat.generate(PROMPT, steps=3, seed=5, num_images=3), py(PROMPT, num_inference_steps=3, seed=5,
                                                                         num_images=3, output="np"))
    rng = np.random.default_rng(1)  # another generator's draws, as a diffusers comparison passes them
    latents = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    step_noise = [rng.standard_normal((2, 4, 16, 16), dtype=np.float32) for _ in range(2)]
    got = nat.generate(PROMPT, steps=3, num_images=2, latents=latents, step_noise=step_noise)
    _assert_close(got, py(PROMPT, num_inference_steps=3, num_images=2, latents=latents, step_noise=step_noise,
                          output="np"))
    # the seed's own draws are lcmrt.noise's
    seeded = nat.generate(PROMPT, steps=3, seed=9, num_images=2)
    shape = (2, 4, 16, 16)
    np.testing.assert_array_equal(seeded, nat.generate(
        PROMPT, steps=3, num_images=2, latents=standard_normal(9, LATENTS, shape),
        step_noise=[standard_normal(9, FIRST_STEP_NOISE + i, shape) for i in range(2)]))


def test_adapter_swaps_match_python_and_a_b_a_is_exact(native, two_adapter_folder):
    py, nat = _python(two_adapter_folder), native.load(two_adapter_folder)
    assert nat.adapters() == {"lcm": (1.0, False), "lcm2": (0.0, True), "style": (0.8, True), "style2": (0.0, True)}
    seen = {}
    for name, adapters in [("A", {"style": 0.8}), ("B", {"style2": 0.5, "lcm2": 0.3}), ("none", {}),
                           ("A", {"style": 0.8})]:
        py.set_adapters(adapters)
        nat.set_adapters(adapters)
        got = nat.generate(PROMPT, guidance_scale=1.5, seed=3)
        _assert_close(got, py(PROMPT, guidance_scale=1.5, seed=3, output="np"))
        if name in seen:
            np.testing.assert_array_equal(got, seen[name])  # A -> B -> none -> A: A bit for bit
        seen[name] = got
    assert np.abs(seen["A"] - seen["B"]).max() > 1e-3 and np.abs(seen["A"] - seen["none"]).max() > 1e-3
    assert nat.adapters()["style"] == (0.8, True) and nat.adapters()["style2"] == (0.0, True)


@pytest.mark.parametrize("adapters,fragment", [({"nope": 1.0}, "is not in"), ({"lcm": 0.5}, "is fused"),
                                               ({"style": float("nan")}, "finite numbers")])
def test_a_refused_swap_keeps_the_set(native, two_adapter_folder, adapters, fragment):
    nat = native.load(two_adapter_folder)
    before = nat.generate(PROMPT, steps=2, seed=1)
    with pytest.raises(NativeError) as error:
        nat.set_adapters(adapters)
    assert error.value.status == ADAPTER and fragment in error.value.message
    np.testing.assert_array_equal(nat.generate(PROMPT, steps=2, seed=1), before)


def _python_message(folder) -> str:
    with pytest.raises(EngineFolderError) as error:
        Pipeline.load(folder, backend="onnxruntime")
    return str(error.value)


def test_bad_folders_are_status_codes_with_python_messages(native, tiny_engine, tmp_path):
    import shutil

    cases = {}
    cases["missing"] = tmp_path / "missing"
    (tmp_path / "empty").mkdir()
    cases["empty"] = tmp_path / "empty"
    for name, edit in [("bad-json", lambda m: "{not json"),
                       ("newer-format", lambda m: json.dumps({**json.loads(m), "format_version": 99}))]:
        folder = tmp_path / name
        shutil.copytree(tiny_engine, folder)
        (folder / "manifest.json").write_text(edit((folder / "manifest.json").read_text()))
        cases[name] = folder
    for name, victim in [("modified-graph", "unet.ort-cpu.onnx.data"), ("missing-graph", "vae_decoder.ort-cpu.onnx")]:
        folder = tmp_path / name
        shutil.copytree(tiny_engine, folder)
        if name.startswith("missing"):
            (folder / victim).unlink()
        else:
            with open(folder / victim, "r+b") as f:
                f.seek(100)
                f.write(b"\x00\x01\x02\x03")
        cases[name] = folder
    for name, folder in cases.items():
        with pytest.raises(NativeError) as error:
            native.load(folder)
        assert error.value.status == ENGINE_FOLDER, name
        expected = _python_message(folder)
        if name == "bad-json":  # the parser's own words differ; what is wrong and the fix do not
            head, tail = expected.split("(", 1)[0], expected.rsplit(")", 1)[1]
            assert error.value.message.startswith(head) and error.value.message.endswith(tail)
        else:
            assert error.value.message == expected, name


def test_bad_arguments_are_status_codes(native, tiny_engine):
    nat = native.load(tiny_engine)
    for kwargs, status, fragment in [({"steps": 0}, GENERATION, "num_inference_steps=0 is outside 1..50"),
                                     ({"num_images": 0}, INVALID_ARGUMENT, "num_images=0"),
                                     ({"guidance_scale": float("nan")}, INVALID_ARGUMENT, "finite")]:
        with pytest.raises(NativeError) as error:
            nat.generate(PROMPT, **kwargs)
        assert error.value.status == status and fragment in error.value.message, error.value.message
    lib, images, request = nat.lib, ctypes.c_void_p(), Request()
    lib.lcmrt_request_init(ctypes.byref(request))
    assert lib.lcmrt_generate(nat.handle, ctypes.byref(request), ctypes.byref(images)) == INVALID_ARGUMENT  # no prompt
    assert b"prompt" in lib.lcmrt_last_error()
    request.prompt = b"a \xff fox"
    assert lib.lcmrt_generate(nat.handle, ctypes.byref(request), ctypes.byref(images)) == INVALID_ARGUMENT
    assert b"UTF-8" in lib.lcmrt_last_error()
    request.prompt = PROMPT.encode()
    assert lib.lcmrt_generate(None, ctypes.byref(request), ctypes.byref(images)) == INVALID_ARGUMENT
    assert lib.lcmrt_generate(nat.handle, None, ctypes.byref(images)) == INVALID_ARGUMENT
    assert lib.lcmrt_pipeline_load(None, None, ctypes.byref(ctypes.c_void_p())) == INVALID_ARGUMENT
    assert lib.lcmrt_set_adapters(nat.handle, None, None, 1) == INVALID_ARGUMENT
    assert not lib.lcmrt_images_pixels(None, 0)
    assert nat.generate(PROMPT, steps=1).shape == (1, 128, 128, 3)  # still usable after every refusal


def test_guidance_needs_a_cfg_folder(native, tiny_model, tmp_path_factory):
    from tiny_engines import build_tiny_engine

    folder = build_tiny_engine(tiny_model, tmp_path_factory.mktemp("engines") / "none", guidance_mode="none")
    nat = native.load(folder)
    with pytest.raises(NativeError) as error:
        nat.generate(PROMPT, guidance_scale=2.0)
    assert error.value.status == GENERATION and "--guidance-mode none" in error.value.message
    _assert_close(nat.generate(PROMPT, seed=2), _python(folder)(PROMPT, seed=2, output="np"))


def test_threads_share_one_pipeline(native, two_adapter_folder):
    """Generations from several threads run at once while another thread swaps adapters; each image is its seed's
    image under one of the two sets, never a mix."""
    nat = native.load(two_adapter_folder)
    sets = [{"style": 0.8}, {"style2": 0.6}]
    expected = {}
    for i, adapters in enumerate(sets):
        nat.set_adapters(adapters)
        for seed in range(3):
            expected[i, seed] = nat.generate(PROMPT, steps=2, seed=seed)
    results, errors = [], []

    def generate(seed):
        try:
            for _ in range(3):
                results.append((seed, nat.generate(PROMPT, steps=2, seed=seed)))
        except Exception as e:  # reported below: a thread's exception would otherwise vanish
            errors.append(e)

    def swap():
        try:
            for k in range(12):
                nat.set_adapters(sets[k % 2])
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=generate, args=(seed,)) for seed in range(3)] + [threading.Thread(target=swap)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 9
    for seed, image in results:
        assert any(np.array_equal(image, expected[i, seed]) for i in range(2)), seed


def test_cli_writes_the_png_python_writes(native_build, tiny_engine, tmp_path):
    cli = str(native_build / "lcmrt-generate")
    native_png, python_png = tmp_path / "native.png", tmp_path / "python.png"
    run = subprocess.run([cli, str(tiny_engine), PROMPT, "-o", str(native_png), "--steps", "3", "--seed", "4",
                          "--guidance", "1.5", "--adapter", "style:0.5"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: Adapter 'style' is fused"), run.stderr
    run = subprocess.run([cli, str(tiny_engine), PROMPT, "-o", str(native_png), "--steps", "3", "--seed", "4",
                          "--guidance", "1.5"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == str(native_png), run.stderr
    assert "UNet" in run.stderr and "(seed 4)" in run.stderr
    from click.testing import CliRunner

    from lcmrt.cli import cli as python_cli
    result = CliRunner().invoke(python_cli, ["generate", str(tiny_engine), PROMPT, "-o", str(python_png), "--steps",
                                             "3", "--seed", "4", "--guidance", "1.5", "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(native_png) as a, Image.open(python_png) as b:
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    assert read_png_metadata(native_png) == read_png_metadata(python_png)
    run = subprocess.run([cli, str(tiny_engine), PROMPT, "-o", str(native_png), "--steps", "2", "--repeat", "3"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr.count("UNet") == 3, run.stderr  # one timing line per generation
    for args, fragment in [([], "give the engine folder and the prompt"), (["x", "y", "--steps", "four"], "integer"),
                           (["x", "y", "--bogus", "1"], "unknown option"), (["x", "y", "-o", "a.jpg"], "*.png"),
                           (["x", "y", "--repeat", "0"], "positive")]:
        run = subprocess.run([cli, *args], capture_output=True, text=True)
        assert run.returncode == 2 and fragment in run.stderr
    run = subprocess.run([cli, str(tmp_path / "nowhere"), PROMPT], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "is not a folder" in run.stderr


def test_noise_is_lcmrt_noise(probe):
    for seed, stream, images, per_image in [(0, 0, 2, 1024), (2 ** 64 - 1, 17, 3, 4097), (123456789012, 1, 1, 7)]:
        native_values = np.frombuffer(probe("noise", seed, stream, images, per_image), np.float32)
        np.testing.assert_array_equal(native_values, standard_normal(seed, stream, (images, per_image)).ravel())


@pytest.fixture(scope="module", params=["sdxl", "ssd1b"])
def tiny_xl_refit_engine(request, tmp_path_factory):
    """A tiny SDXL-family folder: two text encoders, pooled text embeds, time ids; the style LoRA (UNet and both
    text encoders) refittable, guidance mode cfg."""
    from lcmrt.export.random_model import write_random_model
    from tiny_engines import build_tiny_engine

    model = write_random_model(tmp_path_factory.mktemp(request.param) / "tiny", arch=request.param, size="tiny", seed=0)
    return build_tiny_engine(model, tmp_path_factory.mktemp("engines") / f"{request.param}-refit", refittable=True)


def test_sdxl_families_match_python(native, tiny_xl_refit_engine):
    py, nat = _python(tiny_xl_refit_engine), native.load(tiny_xl_refit_engine)
    calls = [{"guidance_scale": 1.0}, {"guidance_scale": 1.5},  # no negative prompt: SDXL's zeros
             {"guidance_scale": 1.5, "negative_prompt": "blurry"}]
    for adapters in ({"style": 0.8}, {}, {"style": 0.4}):
        py.set_adapters(adapters)
        nat.set_adapters(adapters)
        for call in calls:
            expected = py(PROMPT, seed=6, num_inference_steps=3, output="np", **call)
            _assert_close(nat.generate(PROMPT, call.get("negative_prompt"), 3, call["guidance_scale"], 6), expected)


def test_a_batch_folder_runs_chunks_like_python(native, tiny_model, tmp_path_factory):
    """A folder built for batches of 2: three images run as two UNet batches, the second padded."""
    from tiny_engines import build_tiny_engine

    folder = build_tiny_engine(tiny_model, tmp_path_factory.mktemp("engines") / "batch2", batch=2)
    expected = _python(folder)(PROMPT, num_inference_steps=2, guidance_scale=1.5, seed=8, num_images=3, output="np")
    _assert_close(native.load(folder).generate(PROMPT, steps=2, guidance_scale=1.5, seed=8, num_images=3), expected)


def test_a_folder_of_several_sizes_matches_python(native, tiny_model, tmp_path_factory):
    from tiny_engines import build_tiny_engine

    folder = build_tiny_engine(tiny_model, tmp_path_factory.mktemp("engines") / "sizes", sizes=[(128, 128), (96, 160)])
    py, nat = _python(folder), native.load(folder)
    for height, width in [(128, 128), (96, 160)]:
        expected = py(PROMPT, num_inference_steps=2, seed=4, height=height, width=width, output="np")
        got = nat.generate(PROMPT, steps=2, seed=4, height=height, width=width)
        assert got.shape == (1, height, width, 3)
        _assert_close(got, expected)
    with pytest.raises(NativeError) as error:
        nat.generate(PROMPT, height=64, width=64)
    assert error.value.status == INVALID_ARGUMENT and "serves 128x128, 160x96" in error.value.message
