"""The runtime commands of lcmrt/cli.py on the tiny engine folder: `lcmrt generate` and `lcmrt info`."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lcmrt import Pipeline
from lcmrt.cli import cli
from lcmrt.images import read_png_metadata
from lcmrt.manifest import load_manifest

ADAPTERS = {"lcm": 1.0, "style": 0.8}  # what the tiny_engine fixture fuses
PROMPT = "ein Bär im Schnee, 雪の中の狐 🦊"


def _invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def _assert_clean_error(result, *fragments):
    """Exit code 2 and one line `error: ...` naming the fragments, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def test_generate_writes_a_png_with_its_settings(tiny_engine, tmp_path):
    out = tmp_path / "images" / "fox.png"
    result = _invoke("generate", tiny_engine, PROMPT, "--negative-prompt", "unscharf, 模糊", "--steps", 3,
                     "--guidance", 1.5, "--seed", 42, "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines() == [str(out)]
    for stage in ("load", "text encoder", "UNet", "s/step x 3", "VAE decode", "total", "(seed 42)"):
        assert stage in result.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (128, 128) and image.mode == "RGB"
        pixels = np.asarray(image)
    meta = read_png_metadata(out)
    assert meta["prompt"] == PROMPT
    assert meta["negative_prompt"] == "unscharf, 模糊"
    assert meta["seed"] == 42 and meta["steps"] == 3 and meta["guidance"] == 1.5
    assert meta["adapters"] == ADAPTERS
    assert meta["engine_folder"] == str(tiny_engine) and meta["backend"]
    # the same call through the Python API gives the same pixels
    expected = Pipeline.load(tiny_engine)(PROMPT, negative_prompt="unscharf, 模糊", num_inference_steps=3,
                                          guidance_scale=1.5, seed=42)[0]
    np.testing.assert_array_equal(pixels, np.asarray(expected))


def test_generate_defaults_record_a_random_seed(tiny_engine, tmp_path):
    out = tmp_path / "out.png"
    result = _invoke("generate", tiny_engine, "a fox", "-o", out)
    assert result.exit_code == 0, result.output
    meta = read_png_metadata(out)
    assert meta["negative_prompt"] is None and meta["steps"] == 4 and meta["guidance"] == 1.0
    assert isinstance(meta["seed"], int) and f"(seed {meta['seed']})" in result.stderr
    # the recorded seed reproduces the image
    again = tmp_path / "again.png"
    assert _invoke("generate", tiny_engine, "a fox", "--seed", meta["seed"], "-o", again).exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_generate_several_images(tiny_engine, tmp_path):
    out = tmp_path / "cat.png"
    result = _invoke("generate", tiny_engine, "a cat", "--num-images", 2, "--steps", 2, "--seed", 1, "-o", out)
    assert result.exit_code == 0, result.output
    paths = [tmp_path / "cat-0.png", tmp_path / "cat-1.png"]
    assert result.stdout.strip().splitlines() == [str(p) for p in paths]
    assert not out.exists()
    first, second = (np.asarray(Image.open(p)).astype(int) for p in paths)
    assert np.abs(first - second).max() > 10
    for p in paths:
        assert read_png_metadata(p)["seed"] == 1


def test_generate_truncates_long_prompts_with_a_warning(tiny_engine, tmp_path):
    with pytest.warns(UserWarning, match="tokens were dropped"):
        result = _invoke("generate", tiny_engine, " ".join(["fox"] * 100), "--steps", 1, "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output


def test_generate_errors_are_one_line(tiny_engine, tmp_path):
    _assert_clean_error(_invoke("generate", tmp_path, "a fox", "-o", tmp_path / "x.png"),
                        "is not an lcmrt engine folder", "lcmrt build")
    _assert_clean_error(_invoke("generate", tmp_path / "missing", "a fox"), "is not a folder")
    _assert_clean_error(_invoke("generate", tiny_engine, "a fox", "--steps", 0, "-o", tmp_path / "x.png"),
                        "num_inference_steps=0 is outside 1..50")
    _assert_clean_error(_invoke("generate", tiny_engine, "a fox", "--seed", -3, "-o", tmp_path / "x.png"),
                        "seed=-3 must be an integer in [0, 2^64)")
    assert not (tmp_path / "x.png").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = _invoke("--debug", "generate", tmp_path, "a fox")
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "EngineFolderError"


def test_info_describes_the_folder(tiny_engine):
    result = _invoke("info", tiny_engine, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "sd15 engine folder, format 2" in text
    assert "128x128 px, batch 1, latent 4x16x16, UNet batches [1, 2]; guidance mode cfg" in text
    assert "LCMScheduler (scaled_linear 0.00085..0.012, epsilon, original_inference_steps 50" in text
    for name in ("text_encoder.onnx", "unet.onnx", "vae_decoder.onnx", "fp32", "ort-cpu, openvino"):
        assert name in text
    adapter_rows = {line.split("│")[1].strip(): line for line in text.splitlines()
                    if line.count("│") > 2 and line.split("│")[1].strip() in ADAPTERS}
    assert set(adapter_rows) == set(ADAPTERS)
    assert "│ 0.8 " in adapter_rows["style"] and "│ 1 " in adapter_rows["lcm"]


def test_info_json_is_the_manifest(tiny_engine):
    result = _invoke("info", tiny_engine, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == load_manifest(tiny_engine)


def test_info_errors_are_one_line(tmp_path):
    _assert_clean_error(_invoke("info", tmp_path), "is not an lcmrt engine folder")
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 999}))
    _assert_clean_error(_invoke("info", tmp_path), "format 999", "Upgrade lcmrt")


def test_generate_command_imports_no_torch(tiny_engine, tmp_path):
    out = tmp_path / "fox.png"
    script = textwrap.dedent(f"""
        import sys
        from lcmrt.cli import cli
        try:
            cli(["generate", {str(tiny_engine)!r}, "fox " * 100, "--steps", "2", "--seed", "0", "-o", {str(out)!r}],
                prog_name="lcmrt")
        except SystemExit as e:
            assert not e.code, e.code
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        print("heavy:", heavy)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "heavy: []" in done.stdout
    assert "tokens were dropped" in done.stderr  # the user sees the truncation
    assert read_png_metadata(out)["seed"] == 0
