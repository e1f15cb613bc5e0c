"""Geometry of the SSD augmentation: pixels and boxes move together."""

from __future__ import annotations

import numpy as np
import pytest

from ssd_jax import augment_params
from ssd_jax.data import host_augment as augment
from ssd_jax.data.tf_compat import tf

COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)


def _painted(h: int = 90, w: int = 120):
    """Black image with 3 solid, disjoint boxes; label k+1 has colour COLORS[k]."""
    img = np.zeros((h, w, 3), np.uint8)
    rel = np.array([(10, 8, 50, 40), (60, 30, 110, 85), (15, 55, 40, 80)]) / [120, 90, 120, 90]
    px = np.round(rel * [w, h, w, h]).astype(int)  # x0, y0, x1, y1 (pixels)
    for k, (x0, y0, x1, y1) in enumerate(px):
        img[y0:y1, x0:x1] = COLORS[k]
    boxes = np.array([[x0 / w, y0 / h, x1 / w, y1 / h] for x0, y0, x1, y1 in px], np.float32)
    return img, boxes, np.array([1, 2, 3], np.int32)


_augment = tf.function(augment.train_augment, reduce_retracing=True)


def _check_paint_inside(out: np.ndarray, boxes: np.ndarray, labels: np.ndarray, tol: float = 1.5):
    """Every clearly painted pixel of colour k lies in the box of label k+1 (within tol pixels),
    and each kept box is mostly covered by its colour."""
    size = out.shape[0]
    for k, color in enumerate(COLORS):
        paint = np.all(np.abs(out.astype(int) - color) < 40, axis=-1)
        ys, xs = np.nonzero(paint)
        kept = boxes[labels == k + 1]
        if len(kept) == 0:
            continue  # dropped (centre outside the crop): its paint may remain, unboxed
        x0, y0, x1, y1 = kept[0] * size
        assert (xs + 0.5 >= x0 - tol).all() and (xs + 0.5 <= x1 + tol).all(), k
        assert (ys + 0.5 >= y0 - tol).all() and (ys + 0.5 <= y1 + tol).all(), k
        inner = paint[int(np.ceil(y0 + tol)):int(y1 - tol), int(np.ceil(x0 + tol)):int(x1 - tol)]
        if inner.size:
            assert inner.mean() > 0.95, (k, inner.mean())


#: each geometric step alone, then all together (also the device version's cases: test_device_augment)
GEOMETRY_CASES = [
    dict(expand=True, crop=False, flip=False),
    dict(expand=False, crop=True, flip=False),
    dict(expand=False, crop=False, flip=True),
    dict(expand=True, crop=True, flip=True),
]


@pytest.mark.parametrize("flags", GEOMETRY_CASES)
def test_paint_stays_in_boxes(flags):
    img, boxes, labels = _painted()
    for i in range(12):
        out, b, lab = _augment(img, boxes, labels, tf.constant([7, i], tf.int64), size=64,
                               photometric=False, **flags)
        out, b, lab = out.numpy(), b.numpy(), lab.numpy()
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        assert ((b >= 0) & (b <= 1)).all() and (b[:, 2:] > b[:, :2]).all()
        _check_paint_inside(out, b, lab)


def test_flip_maps_boxes_exactly():
    img, boxes, labels = _painted(64, 64)
    found = set()
    for i in range(8):
        out, b, lab = _augment(img, boxes, labels, tf.constant([1, i], tf.int64), size=64,
                               photometric=False, expand=False, crop=False, flip=True)
        flipped = not np.allclose(b.numpy(), boxes)
        found.add(flipped)
        if flipped:
            np.testing.assert_allclose(b.numpy(), augment.flip_boxes(boxes).numpy())
            np.testing.assert_array_equal(out.numpy(), img[:, ::-1])
        else:
            np.testing.assert_array_equal(out.numpy(), img)
    assert found == {True, False}


def test_expand_keeps_box_size_in_pixels():
    img, boxes, labels = _painted(64, 64)
    ratios = []
    for i in range(10):
        seed = tf.constant([2, i], tf.int64)
        ox, oy, r = augment.sample_expand(augment._seeds(seed, 4)[0]).numpy()
        ratios.append(r)
        assert 1.0 <= r <= 4.0 and 0 <= ox <= 1 - 1 / r + 1e-6 and 0 <= oy <= 1 - 1 / r + 1e-6
        _, b, _ = _augment(img, boxes, labels, seed, size=64, photometric=False, expand=True,
                           crop=False, flip=False)
        # Canvas of r*64 pixels resized to 64: a box of w pixels becomes w / r output pixels.
        np.testing.assert_allclose((b.numpy()[:, 2:] - b.numpy()[:, :2]) * r,
                                   boxes[:, 2:] - boxes[:, :2], rtol=1e-5)
        np.testing.assert_allclose(b.numpy()[:, :2], [ox, oy] + boxes[:, :2] / r, rtol=1e-5)
    assert min(ratios) == 1.0 and max(ratios) > 1.5  # applied with p 0.5


def test_expand_fill_is_mean():
    img = np.zeros((32, 32, 3), np.uint8)
    for i in range(6):
        out, _, _ = _augment(img, np.zeros([0, 4], np.float32), np.zeros([0], np.int32),
                             tf.constant([5, i], tf.int64), size=32, photometric=True,
                             expand=True, crop=False, flip=False)
        out = out.numpy().reshape(-1, 3)
        fill = np.any(out != out[0] * 0, axis=1) & (np.abs(out.astype(int) - augment_params.FILL_RGB)
                                                   .max(axis=1) <= 1)
        if fill.any():
            return
    pytest.fail("expand never showed its mean fill")


def test_crops_honour_min_iou():
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(100):
        n = int(rng.integers(1, 4))
        wh = rng.uniform(0.3, 0.9, (n, 2))
        lo = rng.uniform(0, 1, (n, 2)) * (1 - wh)
        boxes = np.concatenate([lo, lo + wh], 1).astype(np.float32)
        crop, min_iou = augment.sample_min_iou_crop(boxes, tf.constant([3, i], tf.int64), 1.5)
        crop, min_iou = crop.numpy(), float(min_iou)
        seen.add(round(min_iou, 1))
        assert (crop >= 0).all() and (crop <= 1 + 1e-6).all()
        if np.allclose(crop, [0, 0, 1, 1]):
            continue
        w, h = crop[2] - crop[0], crop[3] - crop[1]
        assert 0.3 - 1e-6 <= w and 0.3 - 1e-6 <= h and 0.5 <= w * 1.5 / h <= 2.0
        iou = augment.box_iou(crop[None], boxes).numpy()[0]
        assert iou.max() >= min_iou - 1e-6
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = np.all((centres > crop[:2]) & (centres < crop[2:]), axis=1)
        assert inside.any()
    assert {-1.0, 0.1, 0.3, 0.5, 0.7}.issubset(seen)


def test_crop_boxes_keeps_centres_and_clips():
    boxes = tf.constant([[0.0, 0.0, 0.4, 0.4], [0.3, 0.3, 0.9, 0.9], [0.6, 0.0, 1.0, 0.2]])
    out, keep = augment.crop_boxes(boxes, tf.constant([0.1, 0.1, 0.7, 0.7]))
    np.testing.assert_array_equal(keep.numpy(), [True, True, False])
    np.testing.assert_allclose(out.numpy(), [[0, 0, 0.5, 0.5], [1 / 3, 1 / 3, 1, 1]], atol=1e-6)


def test_photometric_changes_colours_not_geometry():
    img, boxes, labels = _painted(48, 48)
    changed = 0
    for i in range(6):
        seed = tf.constant([9, i], tf.int64)
        ref, b_ref, _ = _augment(img, boxes, labels, seed, size=48, photometric=False)
        out, b, _ = _augment(img, boxes, labels, seed, size=48, photometric=True)
        np.testing.assert_array_equal(b.numpy(), b_ref.numpy())
        changed += int(np.abs(out.numpy().astype(int) - ref.numpy().astype(int)).max() > 8)
    assert changed >= 2


def test_deterministic_per_seed():
    img, boxes, labels = _painted()
    a = _augment(img, boxes, labels, tf.constant([4, 4], tf.int64), size=40)
    b = _augment(img, boxes, labels, tf.constant([4, 4], tf.int64), size=40)
    c = _augment(img, boxes, labels, tf.constant([4, 5], tf.int64), size=40)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())


def test_eval_resize_matches_tf_image_resize():
    img, _, _ = _painted()
    out = augment.eval_resize(img, 30).numpy()
    ref = tf.image.resize(img.astype(np.float32), [30, 30]).numpy()
    assert np.abs(out - ref).max() <= 0.5 + 1e-4


@pytest.mark.parametrize("side", [31, 128])
@pytest.mark.parametrize("flip", [False, True])
def test_whole_image_shortcut_equals_the_resample_bit_for_bit(side, flip):
    """Flip-only training on a table already at the model's side skips crop_and_resize: the
    shortcut must give the very floats of the general resample (window = the whole image), or
    the default's trajectory would move."""
    image = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    want, want_valid = augment.render_window(tf.constant(image), tf.constant([0.0, 0.0, 1.0, 1.0]),
                                             side, tf.constant(flip))
    got, got_valid = augment._render_whole(tf.constant(image), tf.constant(flip))
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(got_valid.numpy(), want_valid.numpy())
    if flip:
        assert not np.array_equal(got.numpy(), got.numpy()[:, ::-1])
