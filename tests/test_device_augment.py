"""ssd_jax.device_augment, the on-device SSD augmentation: geometry (pixels and boxes move together),
the min-IoU rule, the colour ops against TensorFlow's, and its statistics against the tf.data
augmentation's (ssd_jax.data.host_augment) on the same boxes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import augment_params
from ssd_jax import device_augment as augment
from ssd_jax.data import host_augment
from ssd_jax.data.tf_compat import tf
from ssd_jax.models import CAFFE_MEAN
from tests.test_host_augment import COLORS, GEOMETRY_CASES, _check_paint_inside, _painted


def _canvas(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """What the device mode's host side ships: (canvas uint8 [size, size, 3], (h, w) in it)."""
    fitted, hw = host_augment.fit_to_canvas(tf.constant(image), size)
    h, w = hw.numpy()
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:h, :w] = fitted.numpy()
    return canvas, hw.numpy()


@pytest.mark.parametrize("h,w,size", [(30, 50, 64), (64, 64, 64), (90, 120, 60)])
def test_fit_to_canvas_keeps_an_image_that_fits(h, w, size):
    image = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    fitted, hw = (x.numpy() for x in host_augment.fit_to_canvas(tf.constant(image), size))
    if max(h, w) <= size:
        np.testing.assert_array_equal(hw, (h, w))
        np.testing.assert_array_equal(fitted, image)  # no resampling
    else:  # scaled down to fit, aspect kept
        np.testing.assert_array_equal(hw, (45, 60))
        assert fitted.shape == (45, 60, 3)


def test_what_follows_the_image_on_its_canvas_is_ignored():
    rng = np.random.default_rng(2)
    canvas, hw = _canvas(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8), 64)
    noisy = canvas.copy()
    noisy[30:] = rng.integers(0, 256, noisy[30:].shape)
    noisy[:, 50:] = rng.integers(0, 256, noisy[:, 50:].shape)
    for window in ([0.0, 0.0, 1.0, 1.0], [-0.3, 0.2, 1.2, 1.4], [0.5, 0.5, 1.0, 1.0]):
        a, va = augment.render_window(canvas, jnp.asarray(hw), jnp.asarray(window), 40, False)
        b, vb = augment.render_window(noisy, jnp.asarray(hw), jnp.asarray(window), 40, False)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))


def _keys(n: int, seed: int = 0) -> jax.Array:
    return augment.example_keys(jax.random.key(seed), jnp.arange(n, dtype=jnp.uint32))


@functools.partial(jax.jit, static_argnames=("out_size", "photometric", "expand", "crop", "flip"))
def _augment(keys, images, sizes, boxes, labels, *, out_size, photometric=False, expand=True,
             crop=True, flip=True):
    return augment.augment_batch(keys, images, sizes, boxes, labels, out_size=out_size,
                                 photometric=photometric, expand=expand, crop=crop, flip=flip)


@pytest.mark.parametrize("h,w,out", [(48, 64, 40), (24, 32, 48), (64, 64, 64)])
def test_with_every_step_off_it_is_a_plain_bilinear_resize(h, w, out):
    """Of the image (not the canvas around it), to 1e-3 before rounding."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    ref = np.asarray(tf.image.resize(images.astype(np.float32), [out, out], "bilinear",
                                     antialias=False))
    canvases = np.stack([_canvas(im, 64)[0] for im in images])
    whole = jnp.asarray([0.0, 0.0, 1.0, 1.0])
    for i in range(3):
        pixels, inside = augment.render_window(jnp.asarray(canvases[i]), jnp.asarray([h, w]),
                                               whole, out, False)
        np.testing.assert_allclose(np.asarray(pixels), ref[i], atol=1e-3)
        assert np.asarray(inside).min() == 1.0
    boxes = np.tile(np.asarray([[[0.1, 0.2, 0.5, 0.7]]], np.float32), (3, 1, 1))
    got, b, lab = _augment(_keys(3), canvases, np.full((3, 2), (h, w), np.int32), boxes,
                           np.ones((3, 1), np.int32), out_size=out, expand=False, crop=False,
                           flip=False)
    assert got.dtype == jnp.uint8
    # rounded: within half a level of the reference (a tie at .5 may round either way)
    np.testing.assert_array_less(np.abs(np.asarray(got) - ref), 0.5 + 1e-3)
    np.testing.assert_array_equal(np.asarray(b), boxes)
    np.testing.assert_array_equal(np.asarray(lab), 1)


@pytest.mark.parametrize("flags", GEOMETRY_CASES)
def test_paint_stays_in_boxes_and_the_fill_stays_out(flags):
    """The host test's painted image (3 disjoint colour boxes on black, 90 x 120 px) on a 128 px
    canvas: every clearly painted pixel lies in its transformed box, each kept box is covered by
    its colour, and no pixel of a kept box's interior is black (the image) or the mean (fill)."""
    img, boxes, labels = _painted()
    n = 48
    canvas, hw = _canvas(img, 128)
    canvas = np.broadcast_to(canvas, (n, 128, 128, 3))
    pad = lambda x: np.broadcast_to(np.concatenate([x, np.zeros_like(x[:1])]), (n, 4, *x.shape[1:]))
    out, b, lab = _augment(_keys(n, 1), canvas, np.tile(hw, (n, 1)), pad(boxes),
                           pad(labels), out_size=64, **flags)
    out, b, lab = np.asarray(out), np.asarray(b), np.asarray(lab)
    assert out.shape == (n, 64, 64, 3) and lab.shape == (n, 4)
    flipped = 0
    for i in range(n):
        keep = lab[i] > 0
        assert ((b[i][keep] >= 0) & (b[i][keep] <= 1)).all() and (b[i][keep, 2:] > b[i][keep, :2]).all()
        assert (b[i][~keep] == 0).all() and lab[i, 3] == 0
        _check_paint_inside(out[i], b[i][keep], lab[i][keep])
        for k in np.nonzero(keep)[0]:
            x0, y0, x1, y1 = np.round(b[i, k] * 64).astype(int)
            interior = out[i, y0 + 2:y1 - 2, x0 + 2:x1 - 2].astype(int)
            if interior.size:
                assert np.abs(interior - COLORS[lab[i, k] - 1]).max() < 40, (i, k)
        # which way the red box went tells a flip (with crop off, expand keeps left-right order)
        if not flags["crop"] and keep[0] and keep[1]:
            flipped += b[i, 0, 0] > b[i, 1, 0]
    if flags["flip"] and not flags["crop"]:
        assert 0.25 * n < flipped < 0.75 * n
    if flags["expand"] and not flags["crop"]:
        fill = np.all(out == np.round(CAFFE_MEAN).astype(np.uint8), axis=-1).mean(axis=(1, 2))
        assert 0.3 < (fill > 0.05).mean() < 0.7  # zoom-out with p 0.5, mean fill outside


def _iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_the_min_iou_rule_holds_for_every_kept_crop():
    rng = np.random.default_rng(2)
    n, m = 2000, 6
    wh = rng.uniform(0.05, 0.7, (n, m, 2))
    lo = rng.uniform(0, 1, (n, m, 2)) * (1 - wh)
    boxes = np.concatenate([lo, lo + wh], -1).astype(np.float32)
    valid = rng.uniform(size=(n, m)) < 0.7
    aspect = rng.uniform(0.5, 2.0, n).astype(np.float32)
    keys = jax.random.split(jax.random.key(3), n)
    window, sampler, found = jax.jit(jax.vmap(augment.sample_min_iou_crop))(keys, boxes, valid,
                                                                            aspect)
    window, sampler, found = map(np.asarray, (window, sampler, found))
    assert found.shape == (n, augment_params.NUM_SAMPLERS) and found[:, 0].all()
    assert set(range(augment_params.NUM_SAMPLERS)) - {5} <= set(np.unique(sampler))  # 0.9: rarely
    assert found[np.arange(n), sampler].all()  # the pick is one of the candidates there were
    assert (sampler[~valid.any(1)] == 0).all()  # nothing to crop around: the whole image
    whole = sampler == 0
    np.testing.assert_array_equal(window[whole], np.tile([0, 0, 1, 1], (whole.sum(), 1)))
    for s in range(1, augment_params.NUM_SAMPLERS):  # every sampler finds patches (0.9 rarely)
        assert found[valid.any(1), s].mean() > (0.3 if s in (1, 6) else 0.0005), s
    min_ious = (-1.0, *augment_params.MIN_IOUS, -1.0)
    for i in np.nonzero(~whole)[0]:
        w = window[i]
        assert 0 <= w[0] < w[2] <= 1 + 1e-6 and 0 <= w[1] < w[3] <= 1 + 1e-6
        assert 0.3 - 1e-6 <= w[2] - w[0] and 0.3 - 1e-6 <= w[3] - w[1]
        pixel_aspect = (w[2] - w[0]) * aspect[i] / (w[3] - w[1])
        assert 0.5 - 1e-5 <= pixel_aspect <= 2.0 + 1e-5
        b = boxes[i][valid[i]]
        if len(b):
            assert _iou_np(w[None], b).max() >= min_ious[sampler[i]] - 1e-6
            c = (b[:, :2] + b[:, 2:]) / 2
            assert ((c > w[:2]) & (c < w[2:])).all(1).any()


def test_an_example_depends_on_its_key_only():
    """Bit for bit: the same keys give the same batch, and example i of a batch equals the same
    example at another position of the batch (what 1 = N devices and resume rely on)."""
    rng = np.random.default_rng(9)
    canvases = rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    sizes = np.asarray([[48, 40], [30, 48], [48, 48], [20, 33]], np.int32)
    wh = rng.uniform(0.1, 0.5, (4, 3, 2))
    lo = rng.uniform(0, 1, (4, 3, 2)) * (1 - wh)
    boxes = np.concatenate([lo, lo + wh], -1).astype(np.float32)
    labels = np.asarray([[1, 2, 0], [3, 0, 0], [1, 1, 1], [0, 0, 0]], np.int32)
    keys = _keys(4, 5)
    kw = dict(out_size=32, photometric=True)
    a = jax.tree.map(np.asarray, _augment(keys, canvases, sizes, boxes, labels, **kw))
    b = jax.tree.map(np.asarray, _augment(keys, canvases, sizes, boxes, labels, **kw))
    order = np.asarray([2, 0, 3, 1])
    c = jax.tree.map(np.asarray, _augment(keys[order], canvases[order], sizes[order],
                                          boxes[order], labels[order], **kw))
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x[order], z)


def test_boxes_whose_centre_leaves_the_window_become_padding():
    rng = np.random.default_rng(4)
    boxes = rng.uniform(0, 1, (500, 4)).astype(np.float32)
    boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]),
                            np.maximum(boxes[:, :2], boxes[:, 2:]) + 1e-3], 1)
    labels = rng.integers(0, 4, 500).astype(np.int32)
    window = np.asarray([0.2, 0.1, 0.7, 0.8], np.float32)
    # a box centred exactly on the window's left edge: not strictly inside, dropped
    boxes[0] = [0.1, 0.3, 0.3, 0.5]
    labels[0] = 2
    got_b, got_l = map(np.asarray, augment.crop_boxes(boxes, labels, window))
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    keep = (c > window[:2]).all(1) & (c < window[2:]).all(1) & (labels > 0)
    assert not keep[0] and 50 < keep.sum() < 450
    np.testing.assert_array_equal(got_l, np.where(keep, labels, 0))
    size = np.tile(window[2:] - window[:2], 2)
    ref = np.clip((boxes - np.tile(window[:2], 2)) / size, 0, 1)
    np.testing.assert_allclose(got_b[keep], ref[keep], atol=1e-6)
    assert (got_b[~keep] == 0).all()


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_colour_ops_equal_tensorflows(order):
    """Each op at fixed draws against tf.image's (saturation, hue) and the host's formulas
    (brightness, contrast over image pixels only), composed in the given order and clipped as the
    host does; the fill pixels (valid 0) keep their value."""
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 255, (24, 24, 3)).astype(np.float32)
    valid = np.ones((24, 24, 1), np.float32)
    valid[:, :5] = 0
    delta, contrast, saturation, hue = 20.0, 1.3, 0.6, 0.04
    for coins in ([True] * 4, [True, False, True, False], [False, True, False, True]):
        ref = tf.constant(x / 255.0)
        for j in order:
            if not coins[j]:
                continue
            if j == 0:
                ref = ref + delta / 255.0
            elif j == 1:
                grey = tf.image.rgb_to_grayscale(ref)
                mean = tf.reduce_sum(grey * valid) / tf.reduce_sum(valid)
                ref = (ref - mean) * contrast + mean
            elif j == 2:
                ref = tf.image.adjust_saturation(ref, saturation)
            else:
                ref = tf.image.adjust_hue(ref, hue)
            ref = tf.clip_by_value(ref, 0.0, 1.0)
        ref = ref.numpy() * 255 * valid + x * (1 - valid)
        got = augment.distort(jnp.asarray(x), jnp.asarray(valid), coins=jnp.asarray(coins),
                              order=jnp.asarray(order), delta=delta, contrast=contrast,
                              saturation=saturation, hue=hue)
        np.testing.assert_allclose(np.asarray(got), ref, atol=5e-3)


def test_photometric_draws_cover_the_ranges():
    """The sampled distortion: fill pixels untouched, 1/16 of the images unchanged (every coin
    tails), values in [0, 255]."""
    x = np.random.default_rng(6).uniform(0, 255, (16, 16, 3)).astype(np.float32)
    valid = np.ones((16, 16, 1), np.float32)
    valid[:, :4] = 0
    keys = jax.random.split(jax.random.key(6), 800)
    outs = np.asarray(jax.jit(jax.vmap(
        lambda k: augment.photometric_distort(k, jnp.asarray(x), jnp.asarray(valid))))(keys))
    np.testing.assert_array_equal(outs[:, :, :4], np.broadcast_to(x[:, :4], (800, 16, 4, 3)))
    unchanged = np.abs(outs - x).max(axis=(1, 2, 3)) < 1e-3
    assert abs(unchanged.mean() - 1 / 16) < 0.03
    assert outs.min() >= 0 and outs.max() <= 255


def _geometry_device(n: int, boxes: np.ndarray, labels: np.ndarray, hw: np.ndarray):
    fn = jax.jit(jax.vmap(functools.partial(augment.sample_geometry, expand=True, crop=True,
                                            flip=True)))
    g = fn(_keys(n, 7), hw, boxes, labels)
    kept = np.asarray(g["labels"]) > 0
    b = np.asarray(g["boxes"])
    area = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    w = np.asarray(g["window"])
    found = np.asarray(g["found"])
    cropped = np.asarray(g["sampler"]) > 0
    ratio = np.asarray(g["expand"])[:, 2]
    aspect = (w[:, 2] - w[:, 0]) * hw[:, 1] / ((w[:, 3] - w[:, 1]) * hw[:, 0])
    return {"expand": ratio > 1, "ratio": ratio[ratio > 1], "flip": np.asarray(g["flip"]),
            "sampler": np.asarray(g["sampler"]), "found": found, "kept": kept.sum(1),
            "area": area[kept], "window_area": ((w[:, 2] - w[:, 0]) * (w[:, 3] - w[:, 1]))[cropped],
            "log_aspect": np.abs(np.log(aspect[cropped]))}


def _geometry_host(n: int, boxes: np.ndarray, labels: np.ndarray, hw: np.ndarray):
    m = boxes.shape[1]

    def one(i):
        k = tf.cast(i % len(boxes), tf.int32)
        n_valid = tf.reduce_sum(tf.cast(tf.gather(labels, k) > 0, tf.int32))
        b = tf.gather(boxes, k)[:n_valid]
        size = tf.cast(tf.gather(hw, k), tf.float32)
        g = host_augment.sample_geometry(b, tf.stack([tf.constant(11, tf.int64), i]),
                                         size[1] / size[0])
        out, w = g["boxes"], g["window"]
        area = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1])
        aspect = (w[2] - w[0]) * size[1] / ((w[3] - w[1]) * size[0])
        return {"expand": g["expand"][2] > 1, "ratio": g["expand"][2], "flip": g["flip"],
                "sampler": g["sampler"], "found": g["found"], "kept": tf.shape(out)[0],
                "area": tf.pad(area, [[0, m - tf.shape(area)[0]]], constant_values=-1.0),
                "window_area": (w[2] - w[0]) * (w[3] - w[1]),
                "log_aspect": tf.abs(tf.math.log(aspect))}

    ds = tf.data.Dataset.range(n).map(one, num_parallel_calls=tf.data.AUTOTUNE,
                                      deterministic=True).batch(4096)
    parts = list(ds.as_numpy_iterator())
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out["area"] = out["area"][out["area"] >= 0]
    out["ratio"] = out["ratio"][out["expand"]]
    out["window_area"] = out["window_area"][out["sampler"] > 0]
    out["log_aspect"] = out["log_aspect"][out["sampler"] > 0]
    return out


def test_statistics_match_the_host_augmentation():
    """Independent draws of both implementations on the same 64 box sets (N each): expand and
    flip frequencies, how often each sampler finds a patch and is picked, kept boxes per image,
    mean kept-box area, and the mean zoom-out ratio, crop area and crop aspect (what a wrong
    range would move).
    The bound is 2% relative where N makes 2% at least 4 standard errors of the difference of two
    independent estimates, else those 4 standard errors (4 sigma: a correct implementation fails
    about once in 15,000 runs; a wrong range or probability is caught by the same margins)."""
    n = 60_000
    rng = np.random.default_rng(8)
    m = 8
    counts = rng.integers(1, m + 1, 64)
    boxes = np.zeros((64, m, 4), np.float32)
    labels = np.zeros((64, m), np.int32)
    for i, c in enumerate(counts):
        wh = rng.uniform(0.05, 0.6, (c, 2))
        lo = rng.uniform(0, 1, (c, 2)) * (1 - wh)
        boxes[i, :c] = np.concatenate([lo, lo + wh], 1)
        labels[i, :c] = rng.integers(1, 7, c)
    hw = rng.integers(200, 600, (64, 2)).astype(np.int32)
    idx = np.arange(n) % 64
    dev = _geometry_device(n, boxes[idx], labels[idx], hw[idx])
    host = _geometry_host(n, boxes, labels, hw)

    def close(name, a, b, se):
        bound = max(0.02 * abs(b), 4 * se)
        assert abs(a - b) <= bound, f"{name}: device {a:.4f} host {b:.4f} (bound {bound:.4f})"

    for name in ("expand", "flip"):
        p = host[name].mean()
        close(name, dev[name].mean(), p, np.sqrt(2 * p * (1 - p) / n))
    for s in range(augment_params.NUM_SAMPLERS):
        h = host["found"][:, s].mean()
        close(f"sampler {s} finds a patch", dev["found"][:, s].mean(), h,
              np.sqrt(2 * max(h * (1 - h), 1e-4) / n))
        h = (host["sampler"] == s).mean()
        close(f"sampler {s} picked", (dev["sampler"] == s).mean(), h,
              np.sqrt(2 * max(h * (1 - h), 1e-4) / n))
    for name, what in (("kept", "kept boxes per image"), ("area", "mean kept-box area"),
                       ("ratio", "mean zoom-out ratio"), ("window_area", "mean crop area"),
                       ("log_aspect", "mean |log pixel aspect| of crops")):
        close(what, dev[name].mean(), host[name].mean(), np.sqrt(2 * host[name].var() / len(host[name])))
