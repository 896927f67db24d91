"""lcmrt/image_inputs.py against diffusers' VaeImageProcessor and the inpaint pipeline's torch steps."""
import numpy as np
import pytest
from PIL import Image

from lcmrt.errors import InputError
from lcmrt.image_inputs import image_size, load_image, load_mask, mask_to_latent_size, masked_image

torch = pytest.importorskip("torch")
image_processor = pytest.importorskip("diffusers.image_processor")
loading_utils = pytest.importorskip("diffusers.utils.loading_utils")

H, W = 48, 64  # the target size of most tests: height 48, width 64


@pytest.fixture(scope="module")
def processors():
    """The img2img/inpaint pipelines' image_processor and the inpaint pipelines' mask_processor."""
    vae_image_processor = image_processor.VaeImageProcessor
    return (vae_image_processor(vae_scale_factor=8),
            vae_image_processor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True))


def _pixels(height, width, channels=3, seed=0):
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _soft_mask(height, width):
    """A gray ramp over every 8-bit level plus noise: many pixels near 0.5, where binarizing decides."""
    ramp = np.linspace(0, 255, height * width).reshape(height, width)
    noise = np.random.default_rng(1).normal(0, 20, (height, width))
    return np.clip(ramp + noise, 0, 255).round().astype(np.uint8)


def _theirs(processor, image, height=H, width=W):
    return processor.preprocess(image, height=height, width=width).numpy()


def _assert_same(ours, theirs, shape, atol=0.0):
    assert ours.dtype == np.float32 and ours.shape == shape and theirs.shape == shape
    assert np.abs(ours - theirs).max() <= atol


@pytest.mark.parametrize("size", [(W, H), (100, 75), (37, 90)], ids=["target-size", "larger", "other-aspect"])
def test_image_pil_rgb(processors, size):
    pil = Image.fromarray(_pixels(size[1], size[0]))
    ours = load_image(pil, H, W)
    _assert_same(ours, _theirs(processors[0], pil), (1, 3, H, W))
    assert ours.min() >= -1 and ours.max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_image_pil_other_modes_as_rgb(processors, mode):
    pil = Image.fromarray(_pixels(60, 80, 4))
    pil.putalpha(Image.fromarray(_pixels(60, 80, 1, seed=2)))  # transparency must not change the RGB values
    pil = pil.convert(mode) if mode != "RGBA" else pil
    _assert_same(load_image(pil, H, W), _theirs(processors[0], pil.convert("RGB")), (1, 3, H, W))


def test_image_arrays(processors):
    pixels = _pixels(H, W)
    theirs = _theirs(processors[0], Image.fromarray(pixels))
    # uint8 arrays read as the PIL image of the same pixels
    _assert_same(load_image(pixels, H, W), theirs, (1, 3, H, W))
    _assert_same(load_image(pixels[None], H, W), theirs, (1, 3, H, W))
    floats = np.random.default_rng(3).random((1, H, W, 3))  # float64, as diffusers takes it
    _assert_same(load_image(floats, H, W), _theirs(processors[0], floats), (1, 3, H, W), atol=1e-6)
    floats32 = floats[0].astype(np.float32)
    _assert_same(load_image(floats32, H, W), _theirs(processors[0], floats32), (1, 3, H, W))


def test_image_paths(processors, tmp_path):
    rgba = Image.fromarray(_pixels(90, 100, 4))
    for name, pil in [("rgb.png", Image.fromarray(_pixels(90, 100))), ("rgba.png", rgba)]:
        pil.save(tmp_path / name)
        theirs = _theirs(processors[0], loading_utils.load_image(str(tmp_path / name)))
        _assert_same(load_image(tmp_path / name, H, W), theirs, (1, 3, H, W))
        _assert_same(load_image(str(tmp_path / name), H, W), theirs, (1, 3, H, W))


def test_exif_orientation(processors, tmp_path):
    """Files are turned upright as diffusers' load_image turns them; image_size reads that from the header."""
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation  # EXIF Orientation
        path = tmp_path / f"turned-{orientation}.png"
        Image.fromarray(_pixels(40, 56)).save(path, exif=exif)
        upright = loading_utils.load_image(str(path))
        assert image_size(path) == (upright.height, upright.width) == ((40, 56) if orientation < 5 else (56, 40))
        _assert_same(load_image(path, H, W), _theirs(processors[0], upright), (1, 3, H, W))


def test_image_size():
    assert image_size(Image.new("RGB", (64, 48))) == (48, 64)
    assert image_size(np.zeros((48, 64, 3), np.uint8)) == (48, 64)
    assert image_size(np.zeros((1, 48, 64, 3), np.float32)) == (48, 64)
    with pytest.raises(InputError, match=r"\[H, W, 3\]"):
        image_size(np.zeros((48, 64)))
    with pytest.raises(InputError, match="must be a PIL image"):
        image_size(None)


def test_mask_pil(processors):
    soft = _soft_mask(60, 80)
    for pil in [Image.fromarray(soft), Image.fromarray(np.stack([soft, 255 - soft, soft // 2], -1))]:
        for height, width in [(H, W), (56, 72), (128, 128)]:  # multiples of 8: diffusers rounds down to them
            ours = load_mask(pil, height, width)
            _assert_same(ours, _theirs(processors[1], pil, height, width), (1, 1, height, width))
            assert set(np.unique(ours)) == {0.0, 1.0}


def test_mask_white_is_repaint():
    pixels = np.zeros((H, W), np.uint8)
    pixels[:, W // 2:] = 255
    mask = load_mask(Image.fromarray(pixels), H, W)
    assert mask[0, 0, :, : W // 2].max() == 0 and mask[0, 0, :, W // 2:].min() == 1


def test_mask_arrays(processors):
    soft = _soft_mask(H, W)
    theirs = _theirs(processors[1], Image.fromarray(soft))
    for array in [soft, soft[..., None], soft[None]]:
        _assert_same(load_mask(array, H, W), theirs, (1, 1, H, W))
    floats = np.random.default_rng(4).random((H, W))
    floats[0, :4] = [0.5, np.nextafter(0.5, 0), 0.0, 1.0]
    for array in [floats, floats[..., None], floats[None], floats.astype(np.float32)]:
        _assert_same(load_mask(array, H, W), _theirs(processors[1], array), (1, 1, H, W))


def test_mask_path(processors, tmp_path):
    Image.fromarray(_soft_mask(60, 80)).save(tmp_path / "mask.png")
    theirs = _theirs(processors[1], loading_utils.load_image(str(tmp_path / "mask.png")))
    _assert_same(load_mask(tmp_path / "mask.png", H, W), theirs, (1, 1, H, W))


def test_mask_blur(processors, tmp_path):
    """blur=4 is `pipe.mask_processor.blur(mask, blur_factor=4)` before the pipeline's preprocess."""
    blocky = np.zeros((60, 80), np.uint8)
    blocky[15:45, 20:60] = 255
    blur = processors[1].blur
    masks = [Image.fromarray(blocky), Image.fromarray(np.stack([blocky] * 3, -1)), Image.fromarray(_soft_mask(60, 80))]
    for pil in masks:
        ours = load_mask(pil, H, W, blur=4)
        _assert_same(ours, _theirs(processors[1], blur(pil, blur_factor=4)), (1, 1, H, W))
        assert not np.array_equal(ours, load_mask(pil, H, W))  # the blur did something
    Image.fromarray(blocky).save(tmp_path / "mask.png")
    theirs = _theirs(processors[1], blur(loading_utils.load_image(str(tmp_path / "mask.png")), blur_factor=4))
    _assert_same(load_mask(tmp_path / "mask.png", H, W, blur=4), theirs, (1, 1, H, W))
    # arrays are blurred as the 8-bit image diffusers' numpy_to_pil makes of them
    floats = np.random.default_rng(5).random((H, W))
    theirs = _theirs(processors[1], blur(processors[1].numpy_to_pil(floats[..., None])[0], blur_factor=4))
    _assert_same(load_mask(floats, H, W, blur=4), theirs, (1, 1, H, W))
    _assert_same(load_mask(blocky[:H, :W], H, W, blur=4.0),
                 _theirs(processors[1], blur(Image.fromarray(blocky[:H, :W]), blur_factor=4)), (1, 1, H, W))


def test_masked_image(processors):
    pil = Image.fromarray(_pixels(H, W))
    mask_pil = Image.fromarray(_soft_mask(H, W))
    init_image, mask = _theirs(processors[0], pil), _theirs(processors[1], mask_pil)
    theirs = (torch.from_numpy(init_image) * (torch.from_numpy(mask) < 0.5)).numpy()
    ours = masked_image(load_image(pil, H, W), load_mask(mask_pil, H, W))
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)


@pytest.mark.parametrize("in_size,out_size", [
    ((512, 512), (64, 64)), ((768, 1024), (96, 128)), ((48, 64), (6, 8)),  # vae scale factor 8
    ((50, 70), (7, 9)), ((7, 3), (5, 11)), ((100, 33), (33, 100)), ((9, 10), (9, 20)), ((1, 5), (3, 1)),
])
def test_mask_to_latent_size_matches_torch(in_size, out_size):
    mask = np.random.default_rng(6).random((2, 1, *in_size)).astype(np.float32)
    theirs = torch.nn.functional.interpolate(torch.from_numpy(mask), size=out_size).numpy()
    ours = mask_to_latent_size(mask, *out_size)
    assert ours.shape == (2, 1, *out_size) and np.array_equal(ours, theirs)


def test_mask_to_latent_size_all_small_sizes():
    """Every in/out pair up to 70: float32 rounding in the index must agree with torch's everywhere."""
    for in_size in range(1, 71):
        mask = torch.arange(in_size, dtype=torch.float32).reshape(1, 1, 1, in_size)
        for out_size in range(1, 71):
            theirs = torch.nn.functional.interpolate(mask, size=(1, out_size)).numpy()
            assert np.array_equal(mask_to_latent_size(mask.numpy(), 1, out_size), theirs), (in_size, out_size)


@pytest.mark.parametrize("call,phrase", [
    (lambda: load_image(42, H, W), "must be a PIL image, a path to an image file"),
    (lambda: load_image([[0, 0, 0]], H, W), "got list"),
    (lambda: load_mask(3.5, H, W), "must be a PIL image"),
    (lambda: load_image(np.full((H, W, 3), np.nan), H, W), "NaN or inf"),
    (lambda: load_mask(np.full((H, W), np.inf), H, W), "NaN or inf"),
    (lambda: load_image(np.zeros((32, 32, 3), np.uint8), H, W), r"32x32 \(width x height\), but 64x48 is wanted"),
    (lambda: load_mask(np.zeros((32, 32), np.uint8), H, W), "pass a PIL image or an image file"),
    (lambda: load_image(np.full((H, W, 3), -0.5), H, W), r"values in \[-0.5, -0.5\].*must be in \[0, 1\]"),
    (lambda: load_mask(np.full((H, W), 2.0, np.float32), H, W), r"must be in \[0, 1\]"),
    (lambda: load_image(np.zeros((H, W, 3), np.int64), H, W), "must be uint8"),
    (lambda: load_image(np.zeros((H, W, 4), np.uint8), H, W), r"\[H, W, 3\]"),
    (lambda: load_mask(np.zeros((H, W, 3), np.uint8), H, W), r"\[H, W\], \[H, W, 1\]"),
    (lambda: load_mask(np.zeros((H, W), np.uint8), H, W, blur=-1), "blur must be a number >= 0"),
    (lambda: load_mask(np.zeros((H, W), np.uint8), H, W, blur="4"), "blur must be a number >= 0"),
    (lambda: load_mask(np.zeros((H, W), np.uint8), H, W, blur=True), "blur must be a number >= 0"),
    (lambda: load_image(np.zeros((H, W, 3), np.uint8), 0, W), "positive integers"),
    (lambda: load_image(np.zeros((H, W, 3), np.uint8), 48.0, W), "positive integers"),
    (lambda: masked_image(np.zeros((1, 3, H, W)), np.zeros((1, 1, 8, 8))), "same H and W"),
])
def test_errors(call, phrase):
    with pytest.raises(InputError, match=phrase):
        call()


def test_file_errors(tmp_path):
    with pytest.raises(InputError, match=r"image file .*nope\.png does not exist"):
        load_image(tmp_path / "nope.png", H, W)
    with pytest.raises(InputError, match=r"mask path .* is not a file"):
        load_mask(tmp_path, H, W)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"Cannot read the image file .*broken\.png as an image"):
        load_image(str(tmp_path / "broken.png"), H, W)
    with pytest.raises(InputError, match=r"Cannot read the image file .*broken\.png as an image"):
        image_size(tmp_path / "broken.png")
    with pytest.raises(InputError, match="does not exist"):
        image_size(tmp_path / "nope.png")
