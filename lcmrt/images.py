"""Image output: decoded arrays to PIL images, and PNG files that carry their generation settings.

Settings go in PNG text chunks (iTXt, UTF-8): key "lcmrt" holds the whole metadata dict as JSON, which is
what `read_png_metadata` returns, and each field also gets its own key (strings as they are, anything else
as JSON) so that image viewers show "prompt", "seed", ... directly.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import InputError

METADATA_KEY = "lcmrt"
_MAX_KEY = 79  # PNG keywords are 1-79 Latin-1 characters (PNG spec, 11.3.4)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """[N, H, W, 3] floats in [0, 1] -> RGB images, rounded as diffusers' `numpy_to_pil` rounds them."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"to_pil takes images as [N, H, W, 3] floats in [0, 1], got an array of shape {images.shape}.")
    if not np.isfinite(images).all():  # NaN would turn into arbitrary pixels in the uint8 cast
        raise InputError("to_pil got images with NaN or inf values: there is no right pixel for them.")
    # clip first: a value just over 1 would otherwise wrap around to a dark pixel in uint8
    pixels = (np.clip(images, 0.0, 1.0) * 255).round().astype("uint8")
    return [Image.fromarray(image) for image in pixels]


def check_png_path(path: str | Path) -> Path:
    """Refuse, before any work, a path `save_png` could not write: it must be named *.png (a PNG under
    another name would mislead viewers), must not be a folder, and its nearest existing parent must be a
    writable folder (the missing ones are created)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name ending in .png.")
    if path.suffix.lower() != ".png":
        raise InputError(f"{path}: lcmrt writes PNG files (the settings go in PNG text chunks), so name it *.png.")
    parent = path.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"Cannot write {path}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"Cannot write {path}: {parent} is not writable.")
    return path


def save_png(image: Image.Image, path: str | Path, metadata: dict) -> Path:
    """Write `image` as a PNG at `path` (*.png; parent folders created) with `metadata` in text chunks."""
    path = check_png_path(path)
    info = png_info(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def png_bytes(image: Image.Image, metadata: dict) -> bytes:
    """`image` as the bytes of the PNG `save_png` writes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(metadata))
    return buffer.getvalue()


def png_info(metadata: dict) -> PngInfo:
    """The text chunks of `metadata` (see the module docstring), checked to be JSON values under PNG keys."""
    info = PngInfo()
    if METADATA_KEY in metadata:
        raise InputError(f"metadata may not have a field named {METADATA_KEY!r}: that key holds the whole dict.")
    try:
        info.add_itxt(METADATA_KEY, json.dumps(metadata, ensure_ascii=False))
    except TypeError as e:
        raise InputError(f"PNG metadata must be JSON values (str, int, float, bool, None, list, dict): {e}") from None
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= _MAX_KEY or not key.isascii():
            raise InputError(f"metadata key {key!r} cannot be a PNG text key: use 1-{_MAX_KEY} ASCII characters.")
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    return info


def read_png_metadata(path: str | Path) -> dict:
    """The metadata dict `save_png` wrote; for a PNG from elsewhere, its text chunks as strings."""
    try:
        with Image.open(path) as image:
            text = {key: str(value) for key, value in image.text.items()}
    except (OSError, SyntaxError) as e:  # PIL raises SyntaxError for some corrupt PNG chunks
        raise InputError(f"Cannot read {path} as a PNG: {e}") from e
    if METADATA_KEY in text:
        return json.loads(text[METADATA_KEY])
    return text
