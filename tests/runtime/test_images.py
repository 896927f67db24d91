"""lcmrt/images.py: rounding like diffusers, PNG metadata round-trip."""
import numpy as np
import pytest
from PIL import Image

from lcmrt.errors import InputError
from lcmrt.images import read_png_metadata, save_png, to_pil


def _images():
    rng = np.random.default_rng(0)
    images = rng.random((2, 5, 7, 3)).astype(np.float32)
    # values on and next to the rounding boundaries, and the ends of the range
    images[0, 0, :, 0] = np.array([0.5, 1.5, 2.5, 127.5, 254.5, 0, 255], np.float32) / 255
    images[0, 1, :, 0] = np.nextafter(images[0, 0, :, 0], np.float32(1))
    return images


def test_to_pil_rounds_like_diffusers():
    pil_utils = pytest.importorskip("diffusers.utils.pil_utils")
    images = _images()
    ours = to_pil(images)
    theirs = pil_utils.numpy_to_pil(images)
    assert len(ours) == 2
    for a, b in zip(ours, theirs):
        assert a.mode == "RGB" and a.size == (7, 5)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_to_pil_values():
    images = np.zeros((1, 1, 4, 3), np.float32)
    images[0, 0, :, 0] = [0.0, 0.5, 1.0, 1.02]  # 1.02 must not wrap around to a dark pixel
    assert np.asarray(to_pil(images)[0])[0, :, 0].tolist() == [0, 128, 255, 255]


def test_to_pil_rejects_wrong_layout():
    with pytest.raises(InputError, match=r"\[N, H, W, 3\]"):
        to_pil(np.zeros((1, 3, 8, 8), np.float32))


def test_png_metadata_round_trip(tmp_path):
    metadata = {
        "prompt": "a watercolor fox in the snow, 雪の中の狐 🦊",
        "negative_prompt": None,
        "seed": 1234,
        "steps": 4,
        "guidance_scale": 1.0,
        "adapters": {"lcm": 1.0, "papercut": 0.8},
        "size": [512, 512],
        "ok": True,
        "number_as_text": "42",
    }
    image = to_pil(_images())[0]
    path = save_png(image, tmp_path / "a" / "b" / "fox.png", metadata)
    assert path == tmp_path / "a" / "b" / "fox.png" and path.is_file()
    assert read_png_metadata(path) == metadata
    with Image.open(path) as png:
        np.testing.assert_array_equal(np.asarray(png), np.asarray(image))
        text = png.text
        # readable keys for image viewers: strings as they are, other values as JSON
        assert text["prompt"] == metadata["prompt"]
        assert text["seed"] == "1234"
        assert text["negative_prompt"] == "null"
        assert text["adapters"] == '{"lcm": 1.0, "papercut": 0.8}'


def test_png_from_elsewhere_gives_its_text(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a fox, Steps: 4")
    Image.new("RGB", (2, 2)).save(tmp_path / "x.png", pnginfo=info)
    assert read_png_metadata(tmp_path / "x.png") == {"parameters": "a fox, Steps: 4"}


def test_bad_metadata_keys(tmp_path):
    image = Image.new("RGB", (2, 2))
    with pytest.raises(InputError, match="lcmrt"):
        save_png(image, tmp_path / "x.png", {"lcmrt": 1})
    with pytest.raises(InputError, match="PNG text key"):
        save_png(image, tmp_path / "x.png", {"k" * 80: 1})
    with pytest.raises(InputError, match="JSON values"):
        save_png(image, tmp_path / "x.png", {"seed": np.int64(3)})
    assert not (tmp_path / "x.png").exists()
