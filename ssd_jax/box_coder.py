"""Offset encoding of boxes against priors (SSD paper eq. 2, with Caffe's variances).

  dcx = (g_cx - p_cx) / (p_w * v0)     dw = log(g_w / p_w) / v1
  dcy = (g_cy - p_cy) / (p_h * v0)     dh = log(g_h / p_h) / v1

with variances (v0, v1) = (0.1, 0.2), i.e. torchvision's BoxCoder weights (10, 10, 5, 5).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from ssd_jax import box_ops

Variances = tuple[float, float]

#: torchvision's bbox_xform_clip: largest dw/dh fed to exp() when decoding.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def encode(
    boxes: jnp.ndarray, priors: jnp.ndarray, variances: Variances = (0.1, 0.2)
) -> jnp.ndarray:
    """Corner boxes [..., P, 4] against center-form priors [P, 4] -> offsets [..., P, 4]."""
    g = box_ops.corners_to_centers(boxes)
    d_xy = (g[..., :2] - priors[:, :2]) / (priors[:, 2:] * variances[0])
    d_wh = jnp.log(g[..., 2:] / priors[:, 2:]) / variances[1]
    return jnp.concatenate([d_xy, d_wh], axis=-1)


def decode(
    offsets: jnp.ndarray, priors: jnp.ndarray, variances: Variances = (0.1, 0.2)
) -> jnp.ndarray:
    """Offsets [..., P, 4] against center-form priors [P, 4] -> corner boxes [..., P, 4].

    dw, dh are clamped at log(1000/16) (as torchvision) so untrained outputs never overflow.
    """
    offsets = offsets.astype(jnp.float32)
    xy = priors[:, :2] + offsets[..., :2] * variances[0] * priors[:, 2:]
    d_wh = jnp.minimum(offsets[..., 2:] * variances[1], BBOX_XFORM_CLIP)
    wh = priors[:, 2:] * jnp.exp(d_wh)
    return box_ops.centers_to_corners(jnp.concatenate([xy, wh], axis=-1))
