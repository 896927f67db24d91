"""Image inputs for img2img and inpainting: PIL images, files or arrays to the arrays the VAE and UNet take.

Mirrors diffusers' `VaeImageProcessor` (diffusers/image_processor.py) with the settings of its SD pipelines:
images as `image_processor` (resize with LANCZOS, scale to [-1, 1]), masks as the inpaint pipelines'
`mask_processor` (resize with LANCZOS, grayscale, binarize at 0.5), the masked image and the latent-size
mask as `StableDiffusionInpaintPipeline` makes them. A file path is read as diffusers' `load_image` reads it.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageFilter, ImageOps

from .errors import InputError

ImageInput = Image.Image | str | os.PathLike | np.ndarray

MASK_THRESHOLD = 0.5  # VaeImageProcessor.binarize and the inpaint pipeline's `init_image * (mask < 0.5)`
_RESAMPLE = Image.Resampling.LANCZOS  # VaeImageProcessor's default resample="lanczos"
_BLURRABLE = ("L", "LA", "RGB", "RGBA")  # PIL's GaussianBlur refuses palette, 1-bit, 16/32-bit modes
_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height (transpose, rotate 90/270, transverse)


def load_image(image: ImageInput, height: int, width: int) -> np.ndarray:
    """The img2img / inpaint init image as float32 [1, 3, height, width] in [-1, 1].

    PIL images and files are converted to RGB and resized to exactly width x height with LANCZOS (aspect
    ratio not kept, never cropped): `pipe.image_processor.preprocess(image.convert("RGB"), height, width)`.
    Arrays are [H, W, 3] or [1, H, W, 3], uint8 (0-255) or float (0-1), already at that size."""
    _check_size(height, width)
    if isinstance(image, (str, os.PathLike)):
        image = _open(image, "image")
    if isinstance(image, Image.Image):
        pixels = _pil_to_numpy(image.convert("RGB").resize((width, height), resample=_RESAMPLE))
    elif isinstance(image, np.ndarray):
        image = _rgb_array(image)
        _check_array_size(image.shape[:2], height, width, "image")
        pixels = _array_to_unit(image, "image")
    else:
        raise InputError(_wrong_type("image", image))
    pixels = 2.0 * pixels - 1.0  # VaeImageProcessor.normalize
    # [H, W, 3] -> [1, 3, H, W]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[None], dtype=np.float32)


def image_size(image: ImageInput) -> tuple[int, int]:
    """(height, width) of an image input as `load_image` reads it, before any resizing; a file's size is read
    from its header, turned as its EXIF orientation says."""
    if isinstance(image, (str, os.PathLike)):
        path = _existing_file(image, "image")
        try:
            with Image.open(path) as file:
                turned = file.getexif().get(ExifTags.Base.Orientation) in _TURNED
                return (file.width, file.height) if turned else (file.height, file.width)
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise InputError(f"Cannot read the image file {path} as an image: {e}") from e
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return _rgb_array(image).shape[:2]
    raise InputError(_wrong_type("image", image))


def load_mask(mask: ImageInput, height: int, width: int, blur: float = 0) -> np.ndarray:
    """The inpaint mask as float32 [1, 1, height, width] of 0 and 1: 1 (white) = repaint, 0 (black) = keep.

    PIL images and files are resized in their own mode with LANCZOS to width x height, then made grayscale
    and binarized (< 0.5 -> 0, else 1), as `pipe.mask_processor.preprocess(mask, height, width)` does.
    Arrays are [H, W], [H, W, 1] or [1, H, W], uint8 (0-255) or float (0-1), already at that size.

    `blur` > 0 is the radius of a Gaussian blur on the mask at its own size, before resizing: diffusers'
    pipelines never blur, its users call `mask = pipe.mask_processor.blur(mask, blur_factor=blur)` before
    the pipeline, and this reproduces that. Arrays are blurred as 8-bit images (`numpy_to_pil` rounding)."""
    _check_size(height, width)
    if isinstance(blur, bool) or not isinstance(blur, numbers.Real) or not math.isfinite(blur) or blur < 0:
        raise InputError(f"blur must be a number >= 0 (the Gaussian blur radius in pixels, 0 for none), "
                         f"got {blur!r}.")
    if isinstance(mask, (str, os.PathLike)):
        mask = _open(mask, "mask")
    if isinstance(mask, Image.Image):
        if blur:
            mask = _blur(mask if mask.mode in _BLURRABLE else mask.convert("L"), blur)
        values = _pil_to_numpy(mask.resize((width, height), resample=_RESAMPLE).convert("L"))
    elif isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        elif mask.ndim == 3 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.ndim != 2:
            raise InputError(f"A mask array must be [H, W], [H, W, 1] or [1, H, W], got shape {mask.shape}.")
        _check_array_size(mask.shape, height, width, "mask")
        values = _array_to_unit(mask, "mask")
        if blur:
            eight_bit = mask if mask.dtype == np.uint8 else (values * 255).round().astype(np.uint8)
            values = _pil_to_numpy(_blur(Image.fromarray(eight_bit), blur))
    else:
        raise InputError(_wrong_type("mask", mask))
    binary = np.where(values < MASK_THRESHOLD, 0.0, 1.0).astype(np.float32)  # VaeImageProcessor.binarize
    return binary[None, None]


def masked_image(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The inpainting UNet's masked image: `image` [N, 3, H, W] with the repainted pixels set to 0, as
    diffusers' `init_image * (mask < 0.5)`; `mask` is [N or 1, 1, H, W]."""
    if image.ndim != 4 or mask.ndim != 4 or mask.shape[1] != 1 or image.shape[2:] != mask.shape[2:]:
        raise InputError(f"masked_image takes an image [N, 3, H, W] and a mask [N, 1, H, W] of the same H and W, "
                         f"got {image.shape} and {mask.shape}.")
    return image * (mask < MASK_THRESHOLD)


def mask_to_latent_size(mask: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
    """`mask` [N, C, H, W] resized to [N, C, latent_height, latent_width] exactly as torch's
    `F.interpolate(mask, size=(latent_height, latent_width))` (mode "nearest") does in the inpaint pipeline."""
    if mask.ndim != 4:
        raise InputError(f"mask_to_latent_size takes a mask [N, 1, H, W], got shape {mask.shape}.")
    _check_size(latent_height, latent_width)
    rows = _nearest_source(mask.shape[2], latent_height)
    cols = _nearest_source(mask.shape[3], latent_width)
    return np.ascontiguousarray(mask[:, :, rows[:, None], cols[None, :]])


def _nearest_source(in_size: int, out_size: int) -> np.ndarray:
    """torch's nearest source index, min(floor(i * in / out), in - 1), with its float32 scale and product."""
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """An image file as diffusers' `load_image` reads it: EXIF orientation applied, converted to RGB."""
    path = _existing_file(path, what)
    try:
        with Image.open(path) as file:
            return ImageOps.exif_transpose(file).convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"Cannot read the {what} file {path} as an image: {e}") from e


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"The {what} file {path} does not exist.")
    if not path.is_file():
        raise InputError(f"The {what} path {path} is not a file; give an image file (PNG, JPEG, WebP, ...).")
    return path


def _rgb_array(array: np.ndarray) -> np.ndarray:
    """An image array as [H, W, 3]."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[-1] != 3:
        raise InputError(f"An image array must be [H, W, 3] or [1, H, W, 3] (RGB), got shape {array.shape}.")
    return array


def _blur(image: Image.Image, radius: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))  # VaeImageProcessor.blur


def _pil_to_numpy(image: Image.Image) -> np.ndarray:
    return np.array(image).astype(np.float32) / 255.0  # VaeImageProcessor.pil_to_numpy


def _array_to_unit(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 0-255 or float 0-1 pixels as floats in [0, 1]; float arrays keep their dtype, as in diffusers."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise InputError(f"A {what} array must be uint8 (0-255) or float (0-1), got dtype {array.dtype}.")
    if not np.isfinite(array).all():
        raise InputError(f"The {what} array has NaN or inf values; give pixel values in [0, 1].")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise InputError(f"The {what} array has values in [{low:g}, {high:g}], but float arrays must be in [0, 1] "
                         f"(uint8 arrays 0-255); scale it, e.g. (x + 1) / 2 for an array in [-1, 1].")
    return array


def _check_size(height: int, width: int) -> None:
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise InputError(f"height and width must be positive integers, got height={height!r}, width={width!r}.")


def _check_array_size(shape: tuple[int, ...], height: int, width: int, what: str) -> None:
    if tuple(shape) != (height, width):
        raise InputError(f"The {what} array is {shape[1]}x{shape[0]} (width x height), but {width}x{height} is "
                         f"wanted. Resize it to that size, or pass a PIL image or an image file, which are resized "
                         f"with LANCZOS as diffusers does.")


def _wrong_type(what: str, value: object) -> str:
    return (f"The {what} must be a PIL image, a path to an image file (str or pathlib.Path) or a numpy array, "
            f"got {type(value).__name__}.")
