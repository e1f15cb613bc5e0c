"""Host-side image reading and the one resize used by both prediction and evaluation.

  read_image(path_or_file)  image file -> uint8 [H,W,3] RGB (Pillow), upright
  decode_image(data)        encoded bytes -> uint8 [H,W,3] RGB (Pillow), upright
  exif_orientation(data)    the EXIF orientation tag of encoded bytes (1 = as stored)
  resize(image, size)       uint8 [H,W,3] -> uint8 [size,size,3], bilinear

Upright: a photo whose EXIF orientation tag says the camera was turned (every phone photo held
upright: tag 6 or 8) is rotated / mirrored the way every viewer shows it (Pillow's
`ImageOps.exif_transpose`), because that is the image annotation tools show and their boxes
refer to.

`resize` is bit-exact with TensorFlow's bilinear resize as the evaluation pipeline used to run it

    out = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear")
    out = tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

(half-pixel centers, no antialiasing; tests/test_image.py checks it). It replays TF's CPU kernel
in float32 numpy, with TF's order of operations. Evaluation (`ssd_jax.data.host_augment.eval_resize`,
through tf.numpy_function) and prediction both call it, so both see the same pixels. This module
imports only numpy and Pillow.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

__all__ = ["decode_image", "decode_image_and_mode", "exif_orientation", "image_id_from_name",
           "read_image", "resize"]

#: EXIF orientation (tag 0x0112) values whose upright image swaps width and height.
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112


def _to_rgb(img: Image.Image) -> np.ndarray:
    """uint8 [H,W,3] RGB of an opened image. Grayscale, alpha, palette and CMYK images go through
    Pillow's `convert("RGB")` (alpha dropped); 16-bit and 32-bit grayscale ("I;16", "I", "F")
    are scaled to 8 bits first (the top 8 of 16 bits, as TensorFlow's decoder does), which
    `convert` would clip to white instead."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if img.mode == "F":
            gray = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        else:
            gray = (np.clip(arr.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8)


def read_image(path_or_file: str | os.PathLike | BinaryIO) -> np.ndarray:
    """An image file (path or binary file object) -> uint8 [H,W,3] RGB (see `_to_rgb` for the
    other layouts). Raises PIL.UnidentifiedImageError (an OSError) or OSError on undecodable data.
    """
    with Image.open(path_or_file) as img:
        img.load()
        return _to_rgb(_upright(img))


def _upright(img: Image.Image) -> Image.Image:
    """`img` as viewers show it: rotated / mirrored by its EXIF orientation (if any)."""
    if img.getexif().get(_ORIENTATION_TAG, 1) in (0, 1):
        return img
    return ImageOps.exif_transpose(img)


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1-8) of encoded image bytes; 1 when there is none or the data
    cannot be read (only the header is parsed)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 (not an image: the decoder reports it)
        return 1
    return value if 1 <= value <= 8 else 1


def decode_image_and_mode(data: bytes) -> tuple[np.ndarray, str]:
    """(`decode_image(data)`, the file's Pillow mode before conversion: "RGB", "L", "RGBA",
    "CMYK", "P", "I;16", ...); the input pipeline counts the images that were not RGB."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return _to_rgb(_upright(img)), img.mode


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 [H,W,3] RGB, as `read_image`."""
    return read_image(io.BytesIO(data))


def _interpolation(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF's half-pixel-centers bilinear weights along one axis: (lower [out] int, upper [out] int,
    lerp [out] float32), computed in float32 as `compute_interpolation_weights` does:
    in = (i + 0.5) * (in_size / out_size) - 0.5, lower = max(floor(in), 0),
    upper = min(ceil(in), in_size - 1), lerp = in - floor(in)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(src)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
    lower = np.minimum(lower, upper)
    return lower, upper, (src - floor).astype(np.float32)


def _lerp_(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """a + (b - a) * t in float32, written into (and returning) `b`: TF's order of operations,
    one rounding per operation (no fused multiply-add)."""
    b -= a
    b *= t
    b += a
    return b


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize uint8 [H,W,C] -> uint8 [size,size,C], bit-exact with
    `tf.image.resize(..., method="bilinear")` on the float image followed by round-half-to-even
    and a clip to [0, 255]. An image already [size,size,C] is returned unchanged (the same object).

    Separable: each needed input row is interpolated along x first (TF's `top`/`bottom`), then the
    two rows along y (TF: top + (bottom - top) * y_lerp).
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"resize expects a uint8 [H,W,C] image, got {image.dtype} {image.shape}")
    if size < 1:
        raise ValueError(f"resize size must be positive, got {size}")
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    if h == 0 or w == 0:
        raise ValueError(f"cannot resize an empty image of shape {image.shape}")
    c = image.shape[2]
    y0, y1, ty = _interpolation(h, size)
    x0, x1, tx = _interpolation(w, size)
    # Work on [rows, W*C]: a column gather is then one flat gather per row (much faster than
    # gathering [W] out of [W, C]); the x weights are repeated per channel.
    channel = np.arange(c)
    x0 = (x0[:, None] * c + channel).ravel()  # [size*C]
    x1 = (x1[:, None] * c + channel).ravel()
    tx = np.repeat(tx, c)  # [size*C]
    flat = image.reshape(h, w * c)

    def rows_x(rows: np.ndarray) -> np.ndarray:
        """uint8 [R, W*C] -> float32 [R, size*C] interpolated along x (TF's top/bottom)."""
        return _lerp_(rows[:, x0].astype(np.float32), rows[:, x1].astype(np.float32), tx)

    if 2 * size < h:  # shrinking a lot: interpolate only the 2*size input rows that are read
        across = rows_x(flat[np.concatenate([y0, y1])])
        top, bottom = across[:size], across[size:]
    else:  # every input row is read (about) once: interpolate them all, then pick
        across = rows_x(flat)
        top, bottom = across[y0], across[y1]
    out = _lerp_(top, bottom, ty[:, None])  # [size, size*C]
    np.rint(out, out=out)  # tf.round: half to even
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8).reshape(size, size, c)


def image_id_from_name(name: str) -> int:
    """The image id of a file without one from an annotation file: the digits of its stem (VOC's
    2008_000123.jpg -> 2008000123, COCO's 000000397133.jpg -> 397133), or a 56-bit hash of the
    stem when it has no digits or more than 17. The one rule of every source and of predict."""
    import hashlib
    import re

    stem = os.path.splitext(os.path.basename(name))[0]
    digits = re.sub(r"\D", "", stem)
    if digits and len(digits) < 18:
        return int(digits)
    return int.from_bytes(hashlib.sha1(stem.encode()).digest()[:7], "big")
