"""The SSD training augmentation as pure JAX functions: jitted, vmapped over the batch, on device.

The same samplers, probabilities and ranges as the tf.data version (`ssd_jax.data.host_augment`, whose
docstring cites the paper and the Caffe reference), for the pipeline mode in which the host only
decodes each image onto a fixed canvas (`config.dataset.augment_on_device`):

1. expand (zoom out) with p 0.5: the image lands at a random spot of a canvas r x its size,
   r ~ U[1, max_expand], the rest filled with the mean;
2. min-IoU crop, Caffe's batch sampling: 6 patch samplers (a patch of scale U[0.3, 1] per
   side, aspect w/h in *image pixels* in [0.5, 2], IoU >= 0.1/0.3/0.5/0.7/0.9 with some
   ground-truth box, or unconstrained), 50 trials each, all drawn at once; each sampler's first
   patch that passes is a candidate, and one candidate is picked uniformly among the whole image
   and those (an image without boxes: the whole image). Boxes whose centre lies inside the patch
   are kept and clipped to it; the others become padding (label 0, zero box) in place. The
   differences from Caffe's code that remain, and why, are listed in `ssd_jax.data.host_augment`;
3. horizontal flip with p 0.5;
4. one bilinear resample of the image to out_size x out_size for steps 1-3 together (the crop
   window mapped back to image coordinates; the mean outside the image), half-pixel centres and
   no antialiasing, as `tf.image.crop_and_resize`;
5. photometric distortion on the output: brightness +-32, contrast and saturation x[0.5, 1.5],
   hue +-18 degrees, each with p 0.5, in a random order; the mean fill is left untouched and
   contrast's grey mean is taken over image pixels only. Saturation and hue are dm-pix's (the
   same HSV formulas as `tf.image.adjust_saturation` / `adjust_hue`).

Shapes are static throughout: a batch of B canvases uint8 [B, C, C, 3], each holding its image
in the top-left (h, w) pixels given by `image_sizes` (the host pads each image into its canvas;
`ssd_jax.data.host_augment.fit_to_canvas` scales down only images larger than it), and M padded boxes
per image. Boxes are
normalized corners (xmin, ymin, xmax, ymax), labels 1..K with 0 = padding, as everywhere in ssd_jax.

Randomness: one key per example, `example_keys(key, index)` = fold_in(key, global example index),
so an augmented example depends on (key, its index) only, not on the batch it is in, the number
of devices or a resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ssd_jax import box_ops
from ssd_jax.augment_params import (
    BRIGHTNESS_DELTA,
    CONTRAST_RANGE,
    EXPAND_PROB,
    FILL_RGB,
    HUE_DELTA_DEGREES,
    MAX_ASPECT,
    MAX_EXPAND,
    MIN_ASPECT,
    MIN_SCALE,
    NUM_SAMPLERS,
    NUM_TRIALS,
    PHOTOMETRIC_PROB,
    SAMPLER_MIN_IOUS,
    SATURATION_RANGE,
)

_WHOLE = (0.0, 0.0, 1.0, 1.0)


def example_keys(key: jax.Array, index: jax.Array) -> jax.Array:
    """Per-example keys [B] from one key and the examples' global indices int [B]."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def centres_inside(boxes: jax.Array, windows: jax.Array) -> jax.Array:
    """[T, N]: the centre of box n [N, 4] lies strictly inside window t [T, 4]."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    w = windows[:, None, :]
    return (cx > w[..., 0]) & (cx < w[..., 2]) & (cy > w[..., 1]) & (cy < w[..., 3])


def sample_expand(key: jax.Array, *, prob: float = EXPAND_PROB, max_ratio: float = MAX_EXPAND) -> jax.Array:
    """Where the image lands on the zoom-out canvas: [ox, oy, r], the canvas-normalized offset of
    the image's top-left corner and the canvas/image size ratio (0, 0, 1 when not applied)."""
    k_apply, k_ratio, k_offset = jax.random.split(key, 3)
    apply = jax.random.uniform(k_apply) < prob
    r = jnp.where(apply, jax.random.uniform(k_ratio, minval=1.0, maxval=max_ratio), 1.0)
    offset = jax.random.uniform(k_offset, (2,)) * (1.0 - 1.0 / r)
    return jnp.concatenate([offset, r[None]])


def sample_min_iou_crop(key: jax.Array, boxes: jax.Array, valid: jax.Array,
                        pixel_aspect: jax.Array, *, min_scale: float = MIN_SCALE,
                        min_aspect: float = MIN_ASPECT, max_aspect: float = MAX_ASPECT,
                        num_trials: int = NUM_TRIALS) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The paper's min-IoU crop as Caffe's `GenerateBatchSamples` runs it, all trials at once.

    Each of the 6 patch samplers (min IoU 0.1 / 0.3 / 0.5 / 0.7 / 0.9, unconstrained) draws
    `num_trials` patches; its candidate is its first patch that passes. The candidates are the
    whole image and every sampler's patch; one is picked uniformly (module docstring).

    Args:
      key: one PRNG key.
      boxes: float [M, 4] corner boxes normalized to the image being cropped; valid bool [M].
      pixel_aspect: width / height of that image in pixels (the aspect limit is in pixels).
    Returns:
      (window [4] corner box inside [0, 1], sampler int32 in 0..6: the candidate picked (0 the
      whole image, 1..5 the min-IoU samplers, 6 the unconstrained one), found bool [7]: the
      candidates there were (found[0], the whole image, always)). A window other than the whole
      image contains the centre of at least one valid box and has IoU >= its sampler's minimum
      with at least one valid box; an image without valid boxes is never cropped.
    """
    k_w, k_h, k_x, k_y, k_pick = jax.random.split(key, 5)
    shape = (NUM_SAMPLERS - 1, num_trials)  # [S, T]: every patch sampler's trials
    w = jax.random.uniform(k_w, shape, minval=min_scale, maxval=1.0)
    h = jax.random.uniform(k_h, shape, minval=min_scale, maxval=1.0)
    aspect = w * pixel_aspect / h
    x0 = jax.random.uniform(k_x, shape) * (1.0 - w)
    y0 = jax.random.uniform(k_y, shape) * (1.0 - h)
    windows = jnp.stack([x0, y0, x0 + w, y0 + h], axis=-1)  # [S, T, 4]
    flat = windows.reshape(-1, 4)
    iou = jnp.where(valid[None, :], box_ops.iou(flat, boxes), -1.0)
    max_iou = jnp.max(iou, axis=1, initial=-1.0).reshape(shape)
    centre_in = jnp.any(centres_inside(boxes, flat) & valid[None, :], axis=1).reshape(shape)
    min_iou = jnp.asarray(SAMPLER_MIN_IOUS, jnp.float32)[:, None]
    ok = (aspect >= min_aspect) & (aspect <= max_aspect) & (max_iou >= min_iou) & centre_in
    patches = windows[jnp.arange(shape[0]), jnp.argmax(ok, axis=1)]  # [S, 4] first that passed
    candidates = jnp.concatenate([jnp.asarray(_WHOLE, jnp.float32)[None], patches])
    found = jnp.concatenate([jnp.ones((1,), bool), jnp.any(ok, axis=1)])
    sampler = pick_uniform(k_pick, found)
    return candidates[sampler], sampler, found


def pick_uniform(key: jax.Array, available: jax.Array) -> jax.Array:
    """Index int32 of one True entry of bool [N] (at least one True), each equally likely:
    the k-th True for k = floor(u * count), u ~ U[0, 1) (Caffe: `caffe_rng_rand() % count`)."""
    count = jnp.sum(available)
    k = jnp.minimum(jnp.floor(jax.random.uniform(key) * count), count - 1)
    return jnp.argmax(jnp.cumsum(available) > k).astype(jnp.int32)


def crop_boxes(boxes: jax.Array, labels: jax.Array, window: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Boxes [M, 4] whose centre is inside `window` [4], clipped and renormalized to it; the
    others (and padding) become zero boxes with label 0, in place. Returns (boxes, labels)."""
    keep = centres_inside(boxes, window[None])[0] & (labels > 0)
    lo = jnp.tile(window[:2], 2)
    size = jnp.tile(window[2:] - window[:2], 2)
    out = jnp.clip((boxes - lo) / size, 0.0, 1.0)
    return jnp.where(keep[:, None], out, 0.0), jnp.where(keep, labels, 0)


def flip_boxes(boxes: jax.Array) -> jax.Array:
    """Horizontal flip of corner boxes [..., 4]."""
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([1.0 - x1, y0, 1.0 - x0, y1], axis=-1)


def render_window(canvas: jax.Array, image_size: jax.Array, window: jax.Array, out_size: int,
                  flip: jax.Array, mean: Sequence[float] = FILL_RGB
                  ) -> tuple[jax.Array, jax.Array]:
    """Bilinear resample of `window` [4] (corner box normalized to the image; it may reach outside
    it, where `mean` fills in) to out_size x out_size, flipped left-right if `flip`.

    The image is the top-left image_size (h, w) pixels of canvas uint8 [C, C, 3] (whatever
    follows is ignored). Output pixel centre i samples the continuous image coordinate
    w0 + (i + 0.5) / out_size * (w1 - w0) (half-pixel centres; edge pixels extend to the border;
    no antialiasing, as tf.image.crop_and_resize).
    Returns (float32 [S, S, 3] in [0, 255], float32 [S, S, 1]: 1 where the pixel comes from the
    image, 0 where from the fill).
    """
    mean = jnp.asarray(mean, jnp.float32)
    c = canvas.shape[0]
    # rows from h and columns from w repeat the image's last (bilinear taps at its border)
    rows = jnp.minimum(jnp.arange(c), image_size[0] - 1)
    cols = jnp.minimum(jnp.arange(c), image_size[1] - 1)
    canvas = canvas[rows][:, cols]
    hw = image_size.astype(jnp.float32)
    span = jnp.maximum(window[2:] - window[:2], 1e-6)  # (w, h) of the window, image-normalized
    scale = out_size / (hw[::-1] * span)  # output pixels per canvas pixel, (x, y)
    translation = -window[:2] * out_size / span
    out = jax.image.scale_and_translate(
        canvas.astype(jnp.float32), (out_size, out_size, 3), (0, 1),
        scale[::-1], translation[::-1], "linear", antialias=False,
        precision=jax.lax.Precision.HIGHEST)
    t = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) / out_size
    xs = window[0] + t * span[0]
    ys = window[1] + t * span[1]
    inside_x = (xs >= 0.0) & (xs <= 1.0)
    inside_y = (ys >= 0.0) & (ys <= 1.0)
    inside = (inside_y[:, None] & inside_x[None, :])[..., None]
    out = jnp.where(inside, out, mean)
    valid = inside.astype(jnp.float32)
    out = jnp.where(flip, out[:, ::-1], out)
    valid = jnp.where(flip, valid[:, ::-1], valid)
    return out, valid


def _grey(x: jax.Array) -> jax.Array:
    """ITU-R 601 luma, the weights of tf.image.rgb_to_grayscale: [..., 3] -> [..., 1]."""
    return jnp.sum(x * jnp.asarray((0.2989, 0.587, 0.114), x.dtype), axis=-1, keepdims=True)


PHOTOMETRIC_OPS = ("brightness", "contrast", "saturation", "hue")


def photometric_distort(key: jax.Array, image: jax.Array, valid: jax.Array | None = None
                        ) -> jax.Array:
    """Brightness +-32, contrast and saturation x[0.5, 1.5], hue +-18 deg, each with p 0.5, in a
    random order; image float32 [H, W, 3] in [0, 255] -> same. `valid` [H, W, 1] (optional) marks
    image pixels: the rest keep their value, and contrast's grey mean is over image pixels only.
    """
    ks = jax.random.split(key, 7)
    return distort(
        image, valid, coins=jax.random.uniform(ks[0], (4,)) < PHOTOMETRIC_PROB,
        order=jnp.argsort(jax.random.uniform(ks[1], (4,))),
        delta=jax.random.uniform(ks[2], minval=-BRIGHTNESS_DELTA, maxval=BRIGHTNESS_DELTA),
        contrast=jax.random.uniform(ks[3], minval=CONTRAST_RANGE[0], maxval=CONTRAST_RANGE[1]),
        saturation=jax.random.uniform(ks[4], minval=SATURATION_RANGE[0],
                                      maxval=SATURATION_RANGE[1]),
        hue=jax.random.uniform(ks[5], minval=-HUE_DELTA_DEGREES / 360.0,
                               maxval=HUE_DELTA_DEGREES / 360.0))


def distort(image: jax.Array, valid: jax.Array | None, *, coins: jax.Array, order: jax.Array,
            delta: jax.Array, contrast: jax.Array, saturation: jax.Array, hue: jax.Array
            ) -> jax.Array:
    """`photometric_distort` with its draws given: coins bool [4] (apply op j, PHOTOMETRIC_OPS
    order), order int [4] (a permutation: op order[k] goes k-th), delta in pixel levels,
    contrast and saturation factors, hue in turns. Each applied op is clipped to [0, 255].

    The order is data, so each of the 4 positions computes brightness, contrast and one HSV
    round trip that applies the saturation factor or the hue shift of that position (1 and 0
    where the position holds another op), then selects. Under vmap a switch would evaluate every
    branch anyway; one shared HSV round trip per position instead of one per op and position
    took the default's batch (8 x 192 px) from 63 to 34 ms on a 2-core CPU.
    """
    import dm_pix  # the HSV conversions of tf.image, in JAX

    weights = jnp.ones_like(image[..., :1]) if valid is None else valid
    total = jnp.maximum(jnp.sum(weights), 1.0)
    x = image / 255.0
    for k in range(4):
        op = order[k]
        hsv = dm_pix.rgb_to_hsv(x)
        h = hsv[..., 0] + jnp.where(op == 3, hue, 0.0)
        h = h - jnp.floor(h)  # (h + shift) mod 1, as tf.image.adjust_hue
        s = jnp.clip(hsv[..., 1] * jnp.where(op == 2, saturation, 1.0), 0.0, 1.0)
        colour = dm_pix.hsv_to_rgb(jnp.stack([h, s, hsv[..., 2]], axis=-1))
        mean = jnp.sum(_grey(x) * weights) / total
        y = jnp.where(op == 0, x + delta / 255.0,
                      jnp.where(op == 1, (x - mean) * contrast + mean, colour))
        x = jnp.where(coins[op], jnp.clip(y, 0.0, 1.0), x)
    out = x * 255.0
    if valid is not None:
        out = out * valid + image * (1.0 - valid)
    return out


def sample_geometry(key: jax.Array, image_size: jax.Array, boxes: jax.Array, labels: jax.Array,
                    *, expand: bool = True, max_expand: float = 4.0, crop: bool = True,
                    flip: bool = True) -> dict[str, jax.Array]:
    """Steps 1-3 for one example: where the image lands, which window is cut, whether it flips.

    Args: key; image_size [2] the image's (h, w) in pixels; boxes [M, 4], labels [M] (0 = padding).
    Returns {"expand": [ox, oy, r] (`sample_expand`), "window": [4] the crop of the zoomed-out
    canvas, "sampler": int32 the candidate picked, "found": bool [7] the candidates there were
    (`sample_min_iou_crop`; without crop 0 and only the whole image),
    "flip": bool, "boxes": [M, 4] and "labels": [M], the output's (dropped boxes: label 0)}.
    """
    boxes = boxes.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    k_expand, k_crop, k_flip = jax.random.split(key, 3)
    if expand:
        placement = sample_expand(k_expand, max_ratio=max_expand)
    else:
        placement = jnp.asarray((0.0, 0.0, 1.0), jnp.float32)
    ox, oy, r = placement
    canvas_boxes = jnp.stack([ox, oy, ox, oy]) + boxes / r
    if crop:
        size = image_size.astype(jnp.float32)
        window, sampler, found = sample_min_iou_crop(k_crop, canvas_boxes, labels > 0,
                                                     size[1] / size[0])
    else:
        window, sampler = jnp.asarray(_WHOLE, jnp.float32), jnp.int32(0)
        found = jnp.arange(NUM_SAMPLERS) == 0
    out_boxes, out_labels = crop_boxes(canvas_boxes, labels, window)
    do_flip = (jax.random.uniform(k_flip) < 0.5) if flip else jnp.bool_(False)
    out_boxes = jnp.where(do_flip & (out_labels > 0)[:, None], flip_boxes(out_boxes), out_boxes)
    return {"expand": placement, "window": window, "sampler": sampler, "found": found,
            "flip": do_flip, "boxes": out_boxes, "labels": out_labels}


def augment_example(key: jax.Array, canvas: jax.Array, image_size: jax.Array, boxes: jax.Array,
                    labels: jax.Array, *, out_size: int, photometric: bool = True,
                    expand: bool = True, max_expand: float = 4.0, crop: bool = True,
                    flip: bool = True, mean: Sequence[float] = FILL_RGB
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One example of `augment_batch` (see there): canvas uint8 [C, C, 3], image_size [2] (h, w)
    of the image in it, boxes [M, 4], labels [M] -> (float32 [S, S, 3] rounded to integers in
    [0, 255], boxes [M, 4], labels [M])."""
    k_geometry, k_photo = jax.random.split(key)
    g = sample_geometry(k_geometry, image_size, boxes, labels, expand=expand,
                        max_expand=max_expand, crop=crop, flip=flip)
    ox, oy, r = g["expand"]
    # 4. one resample: the zoomed-out canvas's window, in image coordinates.
    window = (g["window"] - jnp.stack([ox, oy, ox, oy])) * r
    pixels, inside = render_window(canvas, image_size, window, out_size, g["flip"], mean)
    # 5. photometric distortion, fill untouched.
    if photometric:
        pixels = photometric_distort(k_photo, pixels, inside)
    return jnp.clip(jnp.round(pixels), 0.0, 255.0), g["boxes"], g["labels"]


def augment_batch(keys: jax.Array, images: jax.Array, image_sizes: jax.Array, boxes: jax.Array,
                  labels: jax.Array, *, out_size: int, photometric: bool = True,
                  expand: bool = True, max_expand: float = 4.0, crop: bool = True,
                  flip: bool = True, mean: Sequence[float] = FILL_RGB,
                  dtype: jnp.dtype = jnp.uint8) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The SSD training augmentation of a batch (module docstring), vmapped over examples.

    Args:
      keys: [B] per-example PRNG keys, e.g. `example_keys(key, global_index)`.
      images: uint8 [B, C, C, 3] canvases, each image in its top-left corner.
      image_sizes: int [B, 2] each image's (height, width) in its canvas: the region sampled,
        and the pixels in which the crop sampler's aspect-ratio limit holds.
      boxes: float [B, M, 4] normalized corners; labels: int [B, M], 0 = padding.
      out_size: the output side S (the model's input size).
      photometric, expand, crop, flip: switch each step (all on: the paper).
      max_expand: the largest zoom-out ratio (the paper's 4).
      mean: RGB fill of the zoomed-out canvas (the mean the model subtracts).
      dtype: of the output images (uint8, or a float dtype holding the same integer values).
    Returns:
      images dtype [B, S, S, 3]; boxes float32 [B, M, 4] normalized to the output (zeros where
      dropped); labels int32 [B, M] (0 where dropped or padding).
    """
    fn = lambda k, im, hw, b, lab: augment_example(
        k, im, hw, b, lab, out_size=out_size, photometric=photometric, expand=expand,
        max_expand=max_expand, crop=crop, flip=flip, mean=mean)
    out, out_boxes, out_labels = jax.vmap(fn)(keys, images, image_sizes, boxes, labels)
    return out.astype(dtype), out_boxes, out_labels
