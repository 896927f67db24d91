"""The native runtime's PNG writer (lcmrt/csrc/src/png.cpp) against lcmrt/images.py: its metadata reads back
through `read_png_metadata` as the same dict, its "lcmrt" chunk is byte for byte Python's json.dumps, and PIL reads
its pixels."""
import json
import random
import struct

import numpy as np
from PIL import Image

from lcmrt.images import read_png_metadata

METADATA = {
    "prompt": "a photo of a cat, 猫, café, emoji 😀, quote \" backslash \\ newline \n tab \t control \x01 del \x7f",
    "seed": 2**60 + 1,
    "negative": -(2**63),
    "unsigned": 2**64 - 1,
    "steps": 4,
    "floats": [0.1, 1.0, 1e-7, 123456789.0, -0.0, 1e16, 1e15, 0.0001, 1e-05, 5e-324, 1.7976931348623157e308, 2.5],
    "nested": {"z": [1, {"b": None, "a": [True, False]}], "a": {}, "empty": []},
    "none": None,
    "flag": True,
    "size": [512, 768],
}


def _random_floats(count: int) -> list[float]:
    """Doubles from random bit patterns (every exponent), the finite ones: Python's repr of each is the spec."""
    rng = random.Random(0)
    values = (struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0] for _ in range(count))
    return [v for v in values if np.isfinite(v)]


def _gradient(height: int, width: int) -> np.ndarray:
    """The image `lcmrt-probe png` writes: pixel (y, x) = (x % 256, y % 256, (x + 2y) % 256)."""
    y, x = np.mgrid[:height, :width]
    return np.stack([x % 256, y % 256, (x + 2 * y) % 256], axis=-1).astype(np.uint8)


def _save(probe, path, metadata, height=5, width=300):
    probe("png", path, height, width, stdin=json.dumps(metadata).encode())
    return path


def test_metadata_reads_back_as_python_wrote_it(probe, tmp_path):
    path = _save(probe, tmp_path / "out.png", METADATA)
    assert read_png_metadata(path) == METADATA
    with Image.open(path) as image:
        assert image.text["lcmrt"] == json.dumps(METADATA, ensure_ascii=False)
        for key, value in METADATA.items():  # one chunk per field, strings as they are
            assert image.text[key] == (value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        assert list(image.text) == ["lcmrt", *METADATA]


def test_floats_are_written_as_python_repr(probe, tmp_path):
    metadata = {"floats": _random_floats(3000)}
    path = _save(probe, tmp_path / "floats.png", metadata)
    with Image.open(path) as image:
        assert image.text["lcmrt"] == json.dumps(metadata, ensure_ascii=False)


def test_pixels(probe, tmp_path):
    height, width = 7, 300  # wider than 256: the red channel wraps
    path = _save(probe, tmp_path / "sub" / "folder" / "pixels.png", {"seed": 1}, height, width)
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (width, height)
        np.testing.assert_array_equal(np.asarray(image), _gradient(height, width))
