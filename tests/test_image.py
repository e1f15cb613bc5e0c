"""ssd_jax.image: `resize` is bit-exact with the TensorFlow bilinear resize of evaluation, and
`read_image`/`decode_image` give uint8 RGB for every Pillow layout (and raise on garbage)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ssd_jax import image as image_lib


def _tf_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The reference: the TensorFlow resize of the evaluation pipeline."""
    import tensorflow as tf

    out = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8).numpy()


def _random_image(rng: np.random.Generator, h: int, w: int, smooth: bool = False) -> np.ndarray:
    """uint8 [h,w,3]; `smooth` gives a random walk along x (neighbours differ by <= 2, so many
    interpolated values land exactly on .5 and exercise round-half-to-even)."""
    if smooth:
        steps = rng.integers(-2, 3, (h, w, 3))
        return np.clip(128 + np.cumsum(steps, axis=1), 0, 255).astype(np.uint8)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(("h", "w", "size"), [
    (375, 500, 300),  # typical VOC image, downscale
    (500, 375, 300),
    (1000, 1500, 300),  # more than 2x smaller: only the rows read are interpolated
    (2, 3, 300),  # large upscale
    (1, 1, 7),  # a single pixel
    (1, 40, 16),  # one row
    (37, 1, 16),  # one column
    (300, 1, 300),  # one column, same height
    (299, 301, 300),  # off by one
    (150, 600, 512),  # non-square, up in y and down in x
    (17, 13, 1),  # to one pixel
    (64, 64, 32),  # exact 2x
    (64, 64, 128),
])
@pytest.mark.parametrize("smooth", [False, True])
def test_resize_matches_tensorflow(h, w, size, smooth):
    rng = np.random.default_rng(h * 10007 + w * 101 + size)
    img = _random_image(rng, h, w, smooth)
    ours = image_lib.resize(img, size)
    assert ours.dtype == np.uint8 and ours.shape == (size, size, 3)
    np.testing.assert_array_equal(ours, _tf_resize(img, size))


@settings(max_examples=80, deadline=None, database=None)
@given(h=st.integers(1, 160), w=st.integers(1, 160), size=st.integers(1, 160),
       smooth=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_resize_matches_tensorflow_random(h, w, size, smooth, seed):
    img = _random_image(np.random.default_rng(seed), h, w, smooth)
    np.testing.assert_array_equal(image_lib.resize(img, size), _tf_resize(img, size))


def test_resize_same_size_and_errors():
    img = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    assert image_lib.resize(img, 300) is img
    np.testing.assert_array_equal(_tf_resize(img, 300), img)  # TF leaves it unchanged too
    view = img[::-1, ::2]  # a non-contiguous view is fine
    np.testing.assert_array_equal(image_lib.resize(view, 120), _tf_resize(view, 120))
    with pytest.raises(ValueError, match="uint8"):
        image_lib.resize(img.astype(np.float32), 100)
    with pytest.raises(ValueError, match="uint8"):
        image_lib.resize(img[..., 0], 100)
    with pytest.raises(ValueError, match="positive"):
        image_lib.resize(img, 0)
    with pytest.raises(ValueError, match="empty"):
        image_lib.resize(img[:0], 10)


def test_image_module_imports_neither_tensorflow_nor_jax():
    code = ("import sys, ssd_jax.image; "
            "print(sorted(m for m in ('tensorflow', 'jax', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("mode", "fmt"), [
    ("RGB", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"),
    ("1", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "BMP"),
])
def test_read_image_layouts(tmp_path, mode, fmt):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    if mode == "P":
        src = rgb.quantize(colors=16)
    elif mode == "I;16":
        src = Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint16))  # 16-bit gray
    else:
        src = rgb.convert(mode)
    data = _encoded(src, fmt)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as decoded:
        if mode == "I;16":  # scaled to the top 8 bits (test_16_bit_grayscale_is_scaled_not_clipped)
            gray = (np.asarray(decoded).astype(np.int64) >> 8).astype(np.uint8)
            expected = np.repeat(gray[..., None], 3, axis=-1)
        else:
            expected = np.asarray(decoded.convert("RGB"))

    for out in (image_lib.read_image(path), image_lib.read_image(str(path)),
                image_lib.decode_image(data), image_lib.read_image(io.BytesIO(data))):
        assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
        np.testing.assert_array_equal(out, expected)
    if fmt == "PNG" and mode in ("RGB", "RGBA", "P"):  # lossless colour: the original pixels
        np.testing.assert_array_equal(image_lib.decode_image(data), np.asarray(src.convert("RGB")))
    if mode in ("L", "LA") and fmt == "PNG":  # gray replicated to the three channels
        out = image_lib.decode_image(data)
        np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_read_image_rejects_garbage(tmp_path):
    garbage = b"this is not an image" * 10
    path = tmp_path / "garbage.jpg"
    path.write_bytes(garbage)
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        image_lib.read_image(path)
    with pytest.raises(OSError):
        image_lib.decode_image(garbage)
    truncated = _encoded(Image.new("RGB", (64, 64), (10, 20, 30)), "PNG")[:60]
    with pytest.raises((OSError, SyntaxError)):  # Pillow: truncated data
        image_lib.decode_image(truncated)
    with pytest.raises(FileNotFoundError):
        image_lib.read_image(tmp_path / "missing.png")


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG ramp keeps its gradient (Pillow's convert("RGB") clipped it to white); the
    8-bit values are the top 8 bits, as TensorFlow's decoder gives them."""
    import tensorflow as tf

    ramp = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 31).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    got = image_lib.read_image(str(path))
    assert got.shape == (32, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], (ramp >> 8).astype(np.uint8))
    ref = tf.image.convert_image_dtype(tf.io.decode_png(path.read_bytes(), dtype=tf.uint16),
                                       tf.uint8).numpy()
    np.testing.assert_array_equal(got, np.repeat(ref, 3, axis=-1) if ref.shape[-1] == 1 else ref)
    assert (got < 255).mean() > 0.9


def _jpeg(pixels: np.ndarray, orientation: int | None) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


#: What a viewer does to the stored pixels for each EXIF orientation (the EXIF 2.3 spec's table).
_UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
            4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
            6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
            8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_photos_are_read_upright(orientation):
    """A phone photo (stored sideways, EXIF orientation 6 or 8) was read sideways: its boxes fell
    outside the picture. Every orientation is now applied as the EXIF table says, the same by
    read_image, decode_image (evaluation, prediction) and the training decoder."""
    from ssd_jax.data import pipeline
    from ssd_jax.data.tf_compat import tf

    stored = np.random.default_rng(orientation).integers(0, 256, (36, 24, 3), dtype=np.uint8)
    stored[:6] = (255, 0, 0)  # a red top band: where it lands tells the rotation
    plain = image_lib.decode_image(_jpeg(stored, None))  # the same compressed pixels, no tag
    data = _jpeg(stored, orientation)
    want = _UPRIGHT[orientation](plain)
    assert image_lib.exif_orientation(data) == orientation
    np.testing.assert_array_equal(image_lib.decode_image(data), want)
    np.testing.assert_array_equal(image_lib.read_image(io.BytesIO(data)), want)
    train, _ = pipeline.decode_train_image(tf.constant(data))
    if orientation == 1:  # untouched photos keep TensorFlow's fast decoder
        np.testing.assert_array_equal(train.numpy(), tf.io.decode_jpeg(data, channels=3).numpy())
    else:
        np.testing.assert_array_equal(train.numpy(), want)
