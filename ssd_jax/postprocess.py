"""Post-processing of SSD head outputs: decode, per-class NMS, fixed-size detections (jit-able).

The algorithm is the paper's (and torchvision's `SSD.postprocess_detections`):

  1. softmax over classes; decode the offsets against the priors; clip the boxes to [0, 1];
  2. for each foreground class c: keep the priors whose score is > score_threshold, then the
     `pre_nms_top_k` best of them;
  3. greedy NMS within each class (a box is dropped when its IoU with a kept, higher-scoring box
     of the same class is > iou_threshold), which is what torchvision's `batched_nms` computes;
  4. the `max_detections` best survivors over all classes, sorted by score.

Static shapes throughout, no Python loop over classes or images: the classes are a batch axis of
the NMS, which is a tiled suppression-matrix NMS (as TensorFlow's `non_max_suppression_padded`
and scenic): the per-class candidates, sorted by score, are cut into tiles of `nms_tile_size`;
each tile is first suppressed by the kept boxes of the earlier tiles (one [N,T,T] IoU block per
earlier tile), then by itself through a fixed-point iteration on its [N,T,T] suppression matrix,
whose unique fixed point is the greedy result. Only tiles that hold a candidate above the
threshold in some class are visited (a `while_loop` bound), so a trained model's outputs, where
a class has a handful of candidates, cost one tile.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ssd_jax import box_coder, box_ops


class Detections(NamedTuple):
    """Fixed-size detections of a batch (a pytree: jit/vmap/device_get friendly).

    Attributes:
      boxes: float32 [B, K, 4] corner boxes (xmin, ymin, xmax, ymax), normalized, clipped to [0, 1].
      scores: float32 [B, K], sorted in descending order per image.
      classes: int32 [B, K], in 1..C-1.
      num_detections: int32 [B]; rows at or past it are padding (score 0, class 0, box 0).
    """

    boxes: jnp.ndarray
    scores: jnp.ndarray
    classes: jnp.ndarray
    num_detections: jnp.ndarray


def nms_padded(
    boxes: jnp.ndarray, valid: jnp.ndarray, iou_threshold: float, tile_size: int = 32
) -> jnp.ndarray:
    """Greedy NMS of N independent sets of score-sorted candidates, with static shapes.

    Args:
      boxes: float [N, K, 4] corner boxes, each row sorted by descending score.
      valid: bool [N, K], the candidates that take part; within a row, valid entries come first.
      iou_threshold: a candidate is suppressed by a kept, earlier one with IoU > iou_threshold.
      tile_size: candidates per tile (K is padded up to a multiple of it).

    Returns:
      bool [N, K]: kept candidates (exactly greedy NMS on each row's valid prefix).
    """
    n, k = valid.shape
    t = max(1, min(tile_size, k))
    num_tiles = -(-k // t)
    pad = num_tiles * t - k
    boxes = jnp.pad(boxes.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
    valid = jnp.pad(valid, ((0, 0), (0, pad)))
    tiles = boxes.reshape(n, num_tiles, t, 4)
    keep = valid.reshape(n, num_tiles, t)
    # Valid candidates form a prefix of each row, so tiles past the longest prefix are empty.
    active_tiles = (jnp.max(jnp.sum(valid, axis=1)) + t - 1) // t
    upper = jnp.triu(jnp.ones((t, t), bool), k=1)  # i < j: box i can suppress box j

    def suppress_by_tile(s, carry):
        cur_box, cur_keep, keep = carry
        prev_box = jax.lax.dynamic_index_in_dim(tiles, s, axis=1, keepdims=False)
        prev_keep = jax.lax.dynamic_index_in_dim(keep, s, axis=1, keepdims=False)
        over = box_ops.iou(prev_box, cur_box) > iou_threshold  # [N, T(prev), T(cur)]
        suppressed = jnp.any(over & prev_keep[:, :, None], axis=1)
        return cur_box, cur_keep & ~suppressed, keep

    def tile_step(i, keep):
        cur_box = jax.lax.dynamic_index_in_dim(tiles, i, axis=1, keepdims=False)
        cur_keep = jax.lax.dynamic_index_in_dim(keep, i, axis=1, keepdims=False)
        _, base, _ = jax.lax.fori_loop(0, i, suppress_by_tile, (cur_box, cur_keep, keep))
        over = (box_ops.iou(cur_box, cur_box) > iou_threshold) & upper  # [N, T, T]

        def not_converged(state):
            prev, cur = state
            return jnp.any(prev != cur)

        def iterate(state):
            _, cur = state
            return cur, base & ~jnp.any(over & cur[:, :, None], axis=1)

        # Jacobi iteration from `base`: after m steps the first m entries are final.
        _, final = jax.lax.while_loop(not_converged, iterate, (~base, base))
        return jax.lax.dynamic_update_index_in_dim(keep, final, i, axis=1)

    keep = jax.lax.fori_loop(0, active_tiles, tile_step, keep)
    return keep.reshape(n, num_tiles * t)[:, :k]


def detect(
    cls_logits: jnp.ndarray,
    box_preds: jnp.ndarray,
    priors: jnp.ndarray,
    *,
    score_threshold: float = 0.01,
    pre_nms_top_k: int = 400,
    iou_threshold: float = 0.45,
    max_detections: int = 200,
    variances: box_coder.Variances = (0.1, 0.2),
    nms_tile_size: int = 32,
) -> Detections:
    """Detections from SSD head outputs, as the paper and torchvision's postprocess_detections.

    Args:
      cls_logits: [B, P, C] class logits (C counts background, class 0), any float dtype.
      box_preds: [B, P, 4] offsets (dcx, dcy, dw, dh) against the priors.
      priors: [P, 4] normalized center-form priors (cx, cy, w, h).
      score_threshold: per-class candidates need softmax score > this (the paper's 0.01).
      pre_nms_top_k: candidates kept per class before NMS (the paper's 400).
      iou_threshold: per-class NMS threshold (the paper's 0.45).
      max_detections: detections kept per image after NMS (the paper's 200).
      variances: box coder variances (0.1, 0.2).
      nms_tile_size: tile of the NMS (a speed knob only; results do not depend on it).

    Returns:
      Detections with K = min(max_detections, (C-1) * min(pre_nms_top_k, P)) rows per image.
    """
    num_priors, num_classes = cls_logits.shape[-2], cls_logits.shape[-1]
    top_k = min(pre_nms_top_k, num_priors)
    scores = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)
    priors = jnp.asarray(priors, jnp.float32)
    # Decoded one image at a time: XLA:CPU contracts the decode's multiply-adds into FMAs
    # differently for different batch sizes (1-ulp differences); a per-image body makes an image's
    # boxes bit-identical whatever batch it comes in. The decode is a tiny elementwise op.
    boxes = jax.lax.map(
        lambda offsets: jnp.clip(box_coder.decode(offsets, priors, variances), 0.0, 1.0),
        box_preds)  # [B, P, 4]
    batch = scores.shape[0]

    # Per class: threshold, then the top_k best (the invalid ones sort last, as -inf).
    fg = jnp.swapaxes(scores[..., 1:], 1, 2)  # [B, C-1, P]
    fg = jnp.where(fg > score_threshold, fg, -jnp.inf)
    cand_scores, cand_idx = jax.lax.top_k(fg, top_k)  # [B, C-1, k], sorted descending
    valid = cand_scores > -jnp.inf
    cand_boxes = jax.vmap(lambda b, i: b[i])(boxes, cand_idx)  # [B, C-1, k, 4]

    n = batch * (num_classes - 1)
    keep = nms_padded(cand_boxes.reshape(n, top_k, 4), valid.reshape(n, top_k),
                      iou_threshold, nms_tile_size).reshape(valid.shape)

    # The best max_detections survivors over all classes.
    k_out = min(max_detections, (num_classes - 1) * top_k)
    flat_scores = jnp.where(keep, cand_scores, -jnp.inf).reshape(batch, -1)
    best, order = jax.lax.top_k(flat_scores, k_out)  # [B, K]
    found = best > -jnp.inf
    classes = (order // top_k + 1).astype(jnp.int32)
    out_boxes = jnp.take_along_axis(cand_boxes.reshape(batch, -1, 4), order[..., None], axis=1)
    return Detections(
        boxes=jnp.where(found[..., None], out_boxes, 0.0),
        scores=jnp.where(found, best, 0.0),
        classes=jnp.where(found, classes, 0),
        num_detections=jnp.sum(found, axis=1).astype(jnp.int32),
    )
