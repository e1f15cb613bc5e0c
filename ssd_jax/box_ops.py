"""Box format conversions, area and pairwise IoU.

Corner form: (xmin, ymin, xmax, ymax). Center form: (cx, cy, w, h). Any leading shape.
"""

from __future__ import annotations

import jax.numpy as jnp


def corners_to_centers(boxes: jnp.ndarray) -> jnp.ndarray:
    """[..., 4] corner boxes -> [..., 4] center boxes (cx, cy, w, h)."""
    xy_min, xy_max = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([(xy_min + xy_max) / 2, xy_max - xy_min], axis=-1)


def centers_to_corners(boxes: jnp.ndarray) -> jnp.ndarray:
    """[..., 4] center boxes (cx, cy, w, h) -> [..., 4] corner boxes."""
    center, size = boxes[..., :2], boxes[..., 2:]
    return jnp.concatenate([center - size / 2, center + size / 2], axis=-1)


def area(boxes: jnp.ndarray) -> jnp.ndarray:
    """[..., 4] corner boxes -> [...] areas; inverted boxes (xmax < xmin) have area 0."""
    wh = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 0.0)
    return wh[..., 0] * wh[..., 1]


def iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Pairwise IoU of corner boxes a [..., N, 4] and b [..., M, 4] -> [..., N, M].

    Leading dimensions broadcast (e.g. per class in NMS). Degenerate boxes (zero area or
    inverted) give IoU 0, never NaN.
    """
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area(a)[..., :, None] + area(b)[..., None, :] - inter
    # 0 where union <= 0 (empty boxes; or, flushed to zero, denormal ones whose inter outlives
    # their areas), by masking the divide's operands: one elementwise expression that XLA keeps
    # in one fusion (a select on the quotient was split from it and recomputed by each consumer)
    positive = union > 0
    return jnp.where(positive, inter, 0.0) / jnp.where(positive, union, 1.0)
