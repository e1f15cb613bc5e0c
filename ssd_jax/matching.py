"""Matching ground truth to priors (SSD paper section 2.2 "Matching strategy").

1. Each real ground truth is forced onto the prior with which it has the highest IoU.
2. Every other prior takes its best ground truth if that IoU >= threshold, else background (0).
Padded ground-truth rows (label 0) never match. Static shapes throughout: jit- and vmap-friendly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssd_jax import box_coder, box_ops


def _best_over_rows(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(max, argmax) over axis 0 of x [M, N] (the first row among equal maxima, as jnp.argmax),
    as a chain of M compare-and-selects: one elementwise loop over [N] that XLA fuses with the
    IoU; XLA:CPU's variadic (value, index) reduce over a fused operand is several times slower."""
    best, index = x[0], jnp.zeros(x.shape[1:], jnp.int32)
    for m in range(1, x.shape[0]):
        better = x[m] > best  # strict: an equal later row does not win
        best, index = jnp.where(better, x[m], best), jnp.where(better, m, index)
    return best, index


def _first_argmax_last_axis(x: jnp.ndarray) -> jnp.ndarray:
    """jnp.argmax over the last axis (the first index among equal maxima) of x [..., N] without
    NaN, as two max reductions (XLA:CPU's variadic argmax reduce over a long minor axis is ~4x
    slower): the largest of N - index over the positions equal to the maximum."""
    n = x.shape[-1]
    if n >= 1 << 24:
        raise ValueError(f"{n} entries: N - index is not exact in float32")
    best = jnp.max(x, axis=-1)
    rank = jnp.where(x == best[..., None], jnp.arange(n, 0, -1, dtype=jnp.float32), 0.0)
    return n - jnp.max(rank, axis=-1).astype(jnp.int32)


def match_priors(
    gt_boxes: jnp.ndarray,
    gt_labels: jnp.ndarray,
    priors: jnp.ndarray,
    iou_threshold: float = 0.5,
    variances: box_coder.Variances = (0.1, 0.2),
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Targets of one image.

    Args:
      gt_boxes: float [M, 4] normalized corner boxes (rows with label 0 are padding).
      gt_labels: int [M], 1..C-1 for real boxes, 0 for padding.
      priors: float [P, 4] normalized center-form priors.
      iou_threshold: the paper's 0.5.
      variances: offset variances of the box coder.

    Returns:
      cls_targets: int32 [P], 0 for background.
      box_targets: float32 [P, 4] encoded offsets (zeros for background priors).
    """
    gt_boxes = gt_boxes.astype(jnp.float32)
    num_gt = gt_boxes.shape[0]
    valid = gt_labels > 0
    overlaps = box_ops.iou(gt_boxes, box_ops.centers_to_corners(priors))  # [M, P]
    overlaps = jnp.where(valid[:, None], overlaps, -1.0)

    # Rule 2: best ground truth per prior, thresholded (first index wins ties, as torch.max).
    best_gt_iou, best_gt = _best_over_rows(overlaps)  # [P], [P]
    matched = best_gt_iou >= iou_threshold

    # Rule 1: each real ground truth forces its best prior; if several share one, the last wins
    # (deterministic scatter-max over gt indices).
    best_prior = _first_argmax_last_axis(overlaps)  # [M]
    gt_index = jnp.where(valid, jnp.arange(num_gt), -1)
    forced = jnp.full(priors.shape[0], -1, jnp.int32).at[best_prior].max(gt_index.astype(jnp.int32))
    best_gt = jnp.where(forced >= 0, forced, best_gt)
    matched = matched | (forced >= 0)

    cls_targets = jnp.where(matched, gt_labels[best_gt], 0).astype(jnp.int32)
    offsets = box_coder.encode(gt_boxes[best_gt], priors, variances)
    box_targets = jnp.where(matched[:, None], offsets, 0.0).astype(jnp.float32)
    return cls_targets, box_targets


def match_batch(
    gt_boxes: jnp.ndarray,
    gt_labels: jnp.ndarray,
    priors: jnp.ndarray,
    iou_threshold: float = 0.5,
    variances: box_coder.Variances = (0.1, 0.2),
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`match_priors` vmapped over a batch: gt_boxes [B,M,4], gt_labels [B,M] ->
    (cls_targets int32 [B,P], box_targets float32 [B,P,4])."""
    return jax.vmap(lambda b, lab: match_priors(b, lab, priors, iou_threshold, variances))(
        gt_boxes, gt_labels
    )
