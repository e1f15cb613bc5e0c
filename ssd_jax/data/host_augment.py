"""SSD data augmentation as TensorFlow ops (stateless: a function of the image and a seed).

Boxes are corner form (xmin, ymin, xmax, ymax) normalized to [0, 1]; images are uint8 RGB
[H, W, 3] in, uint8 [S, S, 3] out. Every random draw uses `tf.random.stateless_*` with a seed
derived from the per-example `seed` (int64 [2]), so the output is a function of (image, seed).

Training (`train_augment`) follows the paper (arXiv 1512.02325, sec. 2.2/3.6) and its Caffe
reference:

1. expand (zoom out) with p 0.5: the image is placed at a random spot of a canvas r x its size,
   r ~ U[1, 4], the rest filled with the mean [123, 117, 104];
2. min-IoU crop, Caffe's batch sampling (`GenerateBatchSamples` in sampler.cpp, the pick in
   annotated_data_layer.cpp, the samplers of ssd_pascal.py): 6 patch samplers, each a patch of
   scale U[0.3, 1] per side and aspect (w/h in pixels) in [0.5, 2], whose IoU with *some*
   ground-truth box is >= 0.1 / 0.3 / 0.5 / 0.7 / 0.9, or unconstrained, each trying 50 patches
   (all drawn at once and tested vectorized; a sampler's first patch that passes is its
   candidate). ONE candidate is then picked uniformly among the whole image and the samplers'
   candidates, so a sampler that finds nothing (0.7 and 0.9 around small objects, the usual case
   after a zoom-out) leaves the choice to the others instead of leaving the image uncropped.
   Boxes whose centre lies in the patch are kept, clipped to it; the others are dropped;
3. horizontal flip with p 0.5;
4. bilinear resize to S x S.

Steps 1-4 are one `tf.image.crop_and_resize` of the original image: the crop window is mapped
back to original-image coordinates (it may reach outside the image, where the mean fills in),
and a flip is a crop window with x1 > x2. Pixel centres map exactly (half-pixel convention), so
boxes transform exactly with the pixels and the expanded canvas is never materialized.

5. photometric distortion: brightness +-32, contrast 0.5-1.5, saturation 0.5-1.5, hue +-18
   degrees, each with p 0.5, in a random order. It runs on the S x S output instead of the
   original image (these ops are per pixel, except contrast's grey mean, which is taken over the
   image pixels of the output), and the expand fill stays exactly the mean, as in the reference.

Evaluation (`eval_resize`) is a bilinear resize only.

Where step 2 still differs from Caffe's code, and why:
  * Patch shape: Caffe draws a scale s ~ U[0.3, 1] and an aspect a ~ U[max(0.5, s^2),
    min(2, 1/s^2)] of the *normalized* patch (w = s sqrt(a), h = s / sqrt(a)); here w and h are
    U[0.3, 1] each and a patch whose aspect *in pixels* leaves [0.5, 2] fails its trial, as
    torchvision's `RandomIoUCrop` (its SSD recipe) and ssd.pytorch's `RandomSampleCrop` do: on a
    500x375 VOC image Caffe's limit allows a pixel aspect of 2.67, and this one is the rule of
    the peer the tests run (tests/test_crop_reference.py draws Caffe's selection rule in numpy
    and torchvision's transforms against this module's and ssd_jax.device_augment's samplers).
  * Every patch must contain the centre of at least one ground-truth box (torchvision and
    ssd.pytorch too). Caffe's min-IoU samplers test IoU only and its unconstrained one only asks
    that the image has a box, so a Caffe patch can keep no box at all, an image of background
    (measured with Caffe's own patch shape: 0.91 boxes kept per image of one object 0.4 of the
    side, against 1.00 here); here every cropped image keeps an object to match.
  * An image without boxes is never cropped: Caffe's constrained samplers find nothing in it
    (its "unconstrained" one is `max_jaccard_overlap: 1.0`, a constraint on some box) and
    torchvision redraws until it picks the whole image; the same here, by construction.
  * torchvision tests the IoU only against the boxes whose centre is in the patch; Caffe and
    this module against all boxes.
  * Caffe distorts the colours of the original image before expanding it; here the photometric
    step runs on the output (step 5; the same per-pixel ops, the fill kept at the mean). Its
    order also differs: Caffe applies brightness, then contrast second or last (p 0.5), then
    saturation and hue (`random_order_prob: 0`); here the four come in a random order.
"""

from __future__ import annotations

from ssd_jax import augment_params as params
from ssd_jax.data.tf_compat import tf


def _seeds(seed: tf.Tensor, n: int) -> tf.Tensor:
    """`n` independent stateless seeds [n, 2] from one seed [2]."""
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), n)


def _uniform(seed: tf.Tensor, shape=(), lo: float = 0.0, hi: float = 1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed, minval=lo, maxval=hi, dtype=tf.float32)


def box_iou(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Pairwise IoU of corner boxes a [T,4] and b [N,4] -> [T,N]."""
    a = a[:, None, :]
    b = b[None, :, :]
    iw = tf.maximum(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0.0)
    ih = tf.maximum(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / tf.maximum(area_a + area_b - inter, 1e-12)


def sample_expand(seed: tf.Tensor, *, prob: float = params.EXPAND_PROB,
                  max_ratio: float = params.MAX_EXPAND) -> tf.Tensor:
    """Where the image lands on the zoom-out canvas: [ox, oy, r] (canvas-normalized offset of the
    image's top-left corner, and the canvas/image size ratio; r = 1 and offset 0 when not applied).
    """
    s = _seeds(seed, 3)
    apply = _uniform(s[0]) < prob
    r = tf.where(apply, _uniform(s[1], (), 1.0, max_ratio), 1.0)
    off = _uniform(s[2], (2,)) * (1.0 - 1.0 / r)
    return tf.concat([off, r[None]], 0)


def sample_min_iou_crop(
    boxes: tf.Tensor, seed: tf.Tensor, pixel_aspect: tf.Tensor, *,
    min_scale: float = params.MIN_SCALE, min_aspect: float = params.MIN_ASPECT,
    max_aspect: float = params.MAX_ASPECT,
    num_trials: int = params.NUM_TRIALS, return_sampler: bool = False,
) -> tuple[tf.Tensor, ...]:
    """The paper's min-IoU crop as Caffe's `GenerateBatchSamples` runs it, all trials at once.

    Each of the 6 patch samplers (min IoU 0.1 / 0.3 / 0.5 / 0.7 / 0.9, unconstrained) draws
    `num_trials` patches; its candidate is its first patch that passes. The candidates are the
    whole image and every sampler's patch; one is picked uniformly (module docstring).

    Args:
      boxes: [N,4] corner boxes, normalized to the image being cropped.
      seed: int64 [2].
      pixel_aspect: width / height of that image in pixels (the aspect limit is in pixels).
    Returns:
      crop [4] corner box (normalized, inside [0,1]) and the picked sampler's min IoU (scalar;
      -1 for the whole image and for the unconstrained sampler). A crop other than the whole
      image contains the centre of at least one box and has IoU >= min IoU with at least one
      box; an image without boxes is never cropped. With return_sampler, also the candidate
      picked (int32 0..6: 0 the whole image, 1..5 the min-IoU samplers, 6 the unconstrained one)
      and the candidates there were (bool [7], the whole image always).
    """
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    s = _seeds(seed, 5)
    num = params.NUM_SAMPLERS - 1
    w = _uniform(s[0], (num, num_trials), min_scale, 1.0)
    h = _uniform(s[1], (num, num_trials), min_scale, 1.0)
    aspect = w * tf.cast(pixel_aspect, tf.float32) / h
    x0 = _uniform(s[2], (num, num_trials)) * (1.0 - w)
    y0 = _uniform(s[3], (num, num_trials)) * (1.0 - h)
    crops = tf.stack([x0, y0, x0 + w, y0 + h], axis=-1)  # [S,T,4]
    flat = tf.reshape(crops, [-1, 4])
    iou = box_iou(flat, boxes)  # [S*T,N]
    max_iou = tf.reduce_max(tf.concat([iou, tf.fill([num * num_trials, 1], -1.0)], 1), axis=1)
    centre_in = tf.reduce_any(_centres_inside(boxes, flat), axis=1)
    min_iou = tf.constant(params.SAMPLER_MIN_IOUS, tf.float32)[:, None]
    ok = (aspect >= min_aspect) & (aspect <= max_aspect)
    ok &= (tf.reshape(max_iou, [num, num_trials]) >= min_iou)
    ok &= tf.reshape(centre_in, [num, num_trials])
    first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)
    patches = tf.gather(crops, first, axis=1, batch_dims=1)  # [S,4]
    candidates = tf.concat([tf.constant([[0.0, 0.0, 1.0, 1.0]]), patches], 0)
    found = tf.concat([[True], tf.reduce_any(ok, axis=1)], 0)
    sampler = _pick_uniform(s[4], found)
    crop = candidates[sampler]
    min_iou = tf.constant((-1.0, *params.SAMPLER_MIN_IOUS), tf.float32)[sampler]
    if return_sampler:
        return crop, min_iou, sampler, found
    return crop, min_iou


def _pick_uniform(seed: tf.Tensor, available: tf.Tensor) -> tf.Tensor:
    """Index int32 of one True entry of bool [N] (at least one True), each equally likely:
    the k-th True for k = floor(u * count), u ~ U[0, 1) (Caffe: `caffe_rng_rand() % count`)."""
    count = tf.reduce_sum(tf.cast(available, tf.float32))
    k = tf.minimum(tf.floor(_uniform(seed) * count), count - 1.0)
    return tf.argmax(tf.cast(tf.cumsum(tf.cast(available, tf.float32)) > k, tf.int32),
                     output_type=tf.int32)


def _centres_inside(boxes: tf.Tensor, crops: tf.Tensor) -> tf.Tensor:
    """[T,N]: the centre of box n lies inside crop t."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    c = crops[:, None, :]
    return (cx > c[..., 0]) & (cx < c[..., 2]) & (cy > c[..., 1]) & (cy < c[..., 3])


def crop_boxes(boxes: tf.Tensor, crop: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Boxes [N,4] whose centre is inside `crop` [4], clipped and renormalized to the crop.

    Returns (boxes [K,4], keep mask [N]).
    """
    keep = _centres_inside(boxes, crop[None])[0]
    kept = tf.boolean_mask(boxes, keep)
    lo = tf.tile(crop[:2], [2])
    size = tf.tile(crop[2:] - crop[:2], [2])
    kept = tf.clip_by_value((kept - lo) / size, 0.0, 1.0)
    return kept, keep


def flip_boxes(boxes: tf.Tensor) -> tf.Tensor:
    """Horizontal flip of corner boxes [N,4]."""
    x0, y0, x1, y1 = tf.unstack(boxes, 4, axis=-1)
    return tf.stack([1.0 - x1, y0, 1.0 - x0, y1], axis=-1)


def _axis_window(c0: tf.Tensor, c1: tf.Tensor, n: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """crop_and_resize coordinates (a, b) so that output pixel centre i samples the continuous
    coordinate c0 + (i + 0.5) / size * (c1 - c0) (normalized to an input axis of n pixels).

    crop_and_resize samples index a*(n-1) + i*(b-a)*(n-1)/(size-1); pixel index k has its centre
    at continuous (k + 0.5) / n.
    """
    n = tf.cast(n, tf.float32)
    nm1 = tf.maximum(n - 1.0, 1.0)
    a = (c0 * n + 0.5 * (c1 - c0) * n / size - 0.5) / nm1
    b = a + (c1 - c0) * n * (size - 1) / (size * nm1) if size > 1 else a
    return a, b


def render_window(image: tf.Tensor, window: tf.Tensor, size: int, flip: tf.Tensor | bool = False
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """Bilinear resample of `window` [4] (corner box normalized to `image`; may reach outside it,
    where the mean fills in) to size x size, optionally flipped left-right.

    Returns (float32 [size,size,3] in [0,255], float32 [size,size,1] 1 where pixels come from the
    image, 0 where from the fill).
    """
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    mean = tf.constant(params.FILL_RGB, tf.float32)
    x0, y0, x1, y1 = tf.unstack(window)
    flip = tf.convert_to_tensor(flip)
    xs, xe = tf.where(flip, x1, x0), tf.where(flip, x0, x1)
    ya, yb = _axis_window(y0, y1, h, size)
    xa, xb = _axis_window(xs, xe, w, size)
    img = tf.cast(image, tf.float32) - mean
    out = tf.image.crop_and_resize(img[None], tf.stack([ya, xa, yb, xb])[None], [0], [size, size],
                                   method="bilinear", extrapolation_value=0.0)[0] + mean
    t = (tf.range(size, dtype=tf.float32) + 0.5) / size
    ys = y0 + t * (y1 - y0)
    xc = xs + t * (xe - xs)
    in_y = tf.cast((ys >= 0.0) & (ys <= 1.0), tf.float32)
    in_x = tf.cast((xc >= 0.0) & (xc <= 1.0), tf.float32)
    valid = (in_y[:, None] * in_x[None, :])[..., None]
    return out, valid


def _render_whole(image: tf.Tensor, flip: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`render_window(image, [0, 0, 1, 1], side, flip)` for a square uint8 image of that side,
    bit for bit, at a fraction of the cost: each output pixel is one input pixel (crop_and_resize
    adds zero-weighted neighbours), and with FILL_RGB in whole numbers the mean's subtraction and
    addition around it are exact in float32 (tests: every uint8 value, both flips)."""
    img = tf.cast(image, tf.float32)
    img = tf.cond(flip, lambda: tf.reverse(img, axis=[1]), lambda: img)
    return img, tf.ones_like(img[..., :1])


def photometric_distort(image: tf.Tensor, seed: tf.Tensor, valid: tf.Tensor | None = None
                        ) -> tf.Tensor:
    """Brightness +-32, contrast and saturation x[0.5, 1.5], hue +-18 deg, each with p 0.5, in a
    random order. image float32 [H,W,3] in [0,255] -> same. `valid` [H,W,1] (optional) marks image
    pixels: the rest keep their value, and contrast's grey mean is taken over image pixels only.
    """
    s = _seeds(seed, 7)
    coins = _uniform(s[0], (4,)) < params.PHOTOMETRIC_PROB
    order = tf.argsort(_uniform(s[1], (4,)))
    delta = _uniform(s[2], (), -params.BRIGHTNESS_DELTA / 255.0, params.BRIGHTNESS_DELTA / 255.0)
    contrast = _uniform(s[3], (), *params.CONTRAST_RANGE)
    saturation = _uniform(s[4], (), *params.SATURATION_RANGE)
    hue = _uniform(s[5], (), -params.HUE_DELTA_DEGREES / 360.0, params.HUE_DELTA_DEGREES / 360.0)
    weights = tf.ones_like(image[..., :1]) if valid is None else valid
    x = image / 255.0

    def gated(j, fn):
        return lambda x: tf.cond(coins[j], lambda: tf.clip_by_value(fn(x), 0.0, 1.0), lambda: x)

    def adjust_contrast(x):
        grey = tf.image.rgb_to_grayscale(x)
        mean = tf.reduce_sum(grey * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)
        return (x - mean) * contrast + mean

    ops = [
        gated(0, lambda x: x + delta),
        gated(1, adjust_contrast),
        gated(2, lambda x: tf.image.adjust_saturation(x, saturation)),
        gated(3, lambda x: tf.image.adjust_hue(x, hue)),
    ]
    for k in range(4):
        x = tf.switch_case(order[k], [(lambda op=op, x=x: op(x)) for op in ops])
        x.set_shape(image.shape)
    out = x * 255.0
    if valid is not None:
        out = out * valid + image * (1.0 - valid)
    return out


def sample_geometry(boxes: tf.Tensor, seed: tf.Tensor, pixel_aspect: tf.Tensor, *,
                    expand: bool = True, crop: bool = True, flip: bool = True,
                    max_expand: float = 4.0) -> dict[str, tf.Tensor]:
    """Steps 1-3 of `train_augment` for one example (the same seeds, so the same draws).

    boxes float32 [N,4]; seed int64 [2]; pixel_aspect: the image's width / height in pixels.
    Returns {"expand": [ox, oy, r], "window": [4] the crop of the zoomed-out canvas, "sampler":
    int32 the candidate picked, "found": bool [7] the candidates there were (both as
    `sample_min_iou_crop`'s), "flip": bool, "boxes": [K,4] kept and transformed, "keep": bool [N]}.
    """
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    s = _seeds(seed, 4)
    # 1. expand: image occupies [ox, ox + 1/r] x [oy, oy + 1/r] of the canvas.
    placement = (sample_expand(s[0], max_ratio=max_expand) if expand
                 else tf.constant([0.0, 0.0, 1.0]))
    ox, oy, r = tf.unstack(placement)
    canvas_boxes = tf.stack([ox, oy, ox, oy]) + boxes / r
    # 2. min-IoU crop on the canvas (aspect of canvas == aspect of image).
    if crop:
        window, _, sampler, found = sample_min_iou_crop(canvas_boxes, s[1], pixel_aspect,
                                                        return_sampler=True)
    else:
        window, sampler = tf.constant([0.0, 0.0, 1.0, 1.0]), tf.constant(0)
        found = tf.range(params.NUM_SAMPLERS) == 0
    out_boxes, keep = crop_boxes(canvas_boxes, window)
    # 3. flip.
    do_flip = (_uniform(s[2]) < 0.5) if flip else tf.constant(False)
    out_boxes = tf.cond(do_flip, lambda: flip_boxes(out_boxes), lambda: out_boxes)
    return {"expand": placement, "window": window, "sampler": sampler, "found": found,
            "flip": do_flip, "boxes": out_boxes, "keep": keep}


def train_augment(
    image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, *, size: int,
    photometric: bool = True, expand: bool = True, crop: bool = True, flip: bool = True,
    max_expand: float = 4.0,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """SSD training augmentation (see module docstring).

    Args:
      image: uint8 [H,W,3] RGB.
      boxes: float32 [N,4] normalized corners; labels: int32 [N].
      seed: int64 [2] per-example seed.
      size: output side S.
      photometric, expand, crop, flip: switch each step (all on: the paper).
      max_expand: the largest zoom-out ratio (the paper's 4).
    Returns:
      image uint8 [S,S,3], boxes float32 [K,4] (normalized to the output), labels int32 [K].
    """
    s = _seeds(seed, 4)
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    g = sample_geometry(boxes, seed, w / h, expand=expand, crop=crop, flip=flip,
                        max_expand=max_expand)
    ox, oy, r = tf.unstack(g["expand"])
    origin = tf.stack([ox, oy, ox, oy])
    window, do_flip, out_boxes = g["window"], g["flip"], g["boxes"]
    out_labels = tf.boolean_mask(labels, g["keep"])
    # 4. one resample of the original image: canvas window -> original-image coordinates.
    window_img = (window - origin) * r
    if not expand and not crop and tuple(image.shape[:2]) == (size, size):
        # the window is the whole image at its own size: the resample is the identity (or the
        # mirror), sampling pixel centres exactly; the same floats without crop_and_resize
        pixels, valid = _render_whole(image, do_flip)
    else:
        pixels, valid = render_window(image, window_img, size, do_flip)
    # 5. photometric distortion, fill untouched.
    if photometric:
        pixels = photometric_distort(pixels, s[3], valid)
    out = tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)
    return out, out_boxes, out_labels


def fit_to_canvas(image: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The host side of the device mode (`ssd_jax.device_augment`): uint8 [H,W,3] -> (uint8 [h,w,3] with
    h, w <= size, int32 [2] (h, w)).

    The image itself when it fits (no resampling: for VOC's <= 500 px images in a 512 canvas
    this costs nothing), else scaled down, aspect kept, to fit. The batch pads it to the canvas
    (`tf.data.Dataset.padded_batch`: one copy into the batch, zeros after the image).
    """
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.minimum(1.0, size / tf.maximum(h, w))
    nh = tf.clip_by_value(tf.cast(tf.round(h * scale), tf.int32), 1, size)
    nw = tf.clip_by_value(tf.cast(tf.round(w * scale), tf.int32), 1, size)
    image = tf.cond(scale < 1.0, lambda: tf.cast(tf.clip_by_value(tf.round(tf.image.resize(
        image, tf.stack([nh, nw]), "bilinear", antialias=True)), 0.0, 255.0), tf.uint8),
        lambda: image)
    return image, tf.stack([nh, nw])


def eval_resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize uint8 [H,W,3] -> uint8 [S,S,3] (boxes, normalized, are unchanged).

    `ssd_jax.image.resize` run through tf.numpy_function: the same function (and so the same
    pixels) as prediction (`ssd_jax.inference.Predictor`), which imports no TensorFlow.
    """
    from ssd_jax import image as image_lib

    out = tf.numpy_function(lambda x: image_lib.resize(x, size), [image], tf.uint8, stateful=False)
    out.set_shape([size, size, 3])
    return out
