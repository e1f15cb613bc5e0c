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
a class has a handful of candidates, cost one tile. Before step 2, the priors with any class
above the threshold are compacted (at most `max_candidate_priors` per image, else all priors
are used), so the per-class top-k does not sort every prior of every class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

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


#: `detect`'s keyword settings: static (Python values) under jax.jit
DETECT_SETTINGS = ("score_threshold", "pre_nms_top_k", "iou_threshold", "max_detections",
                   "variances", "nms_tile_size", "max_candidate_priors", "sort_top_k",
                   "decode_per_image")


def jit_detect(**settings: Any) -> Callable[..., Detections]:
    """`detect` jitted with its keyword `settings` bound (they are static: shapes and loop
    bounds depend on them), as `fn(cls_logits, box_preds, priors)`; one function per settings,
    cached, so it compiles once per input shape. `jax.jit(detect)(..., max_detections=100)` fails
    (the settings would be traced); `jax.jit(detect, static_argnames=DETECT_SETTINGS)` works too."""
    unknown = set(settings) - set(DETECT_SETTINGS)
    if unknown:
        raise TypeError(f"detect has no setting {sorted(unknown)}; its settings: {DETECT_SETTINGS}")
    return _jit_detect(tuple(sorted(settings.items())))


@functools.lru_cache(maxsize=64)
def _jit_detect(settings: tuple[tuple[str, Any], ...]) -> Callable[..., Detections]:
    return jax.jit(functools.partial(detect, **dict(settings)))


def _traced(*xs: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in xs)


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
    max_candidate_priors: int = 1024,
    sort_top_k: bool = False,
    decode_per_image: bool | None = None,
) -> Detections:
    """Detections from SSD head outputs, as the paper and torchvision's postprocess_detections.

    When no image of the batch has more than `max_candidate_priors` priors with a foreground
    score above the threshold (a trained model's outputs: a few hundred), those priors are first
    compacted (`nonzero`), so the per-class top-k runs over them instead of over all P priors;
    otherwise (e.g. an untrained model) over all priors. The choice is made on device for the
    whole batch (`lax.cond`) and both routes give identical results.

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
      max_candidate_priors: size of the compacted prior set (a speed knob only; 0: never compact).
      sort_top_k: take the top-k with `top_k_by_sort` instead of `lax.top_k` (identical results;
        for consumers that cannot run lax.top_k's StableHLO with a symbolic batch: TF's
        XlaCallModule in an exported SavedModel).
      decode_per_image: decode the boxes one image at a time (bit-identical whatever the batch on
        XLA:CPU) or vmapped (no per-image loop: on GPU each iteration waits for the host). None:
        per image on CPU, vmapped elsewhere, chosen when the program is lowered (for the ONNX
        export, which cannot convert that switch, give True).

    Returns:
      Detections with K = min(max_detections, (C-1) * min(pre_nms_top_k, P)) rows per image.

    Called outside jit (eagerly) it runs `jit_detect(**settings)`: compiled once per settings and
    shapes, where op-by-op execution compiled its loops and branches again at every call (2.1 s).
    Under jit the settings must be Python values (see `jit_detect`).
    """
    if not _traced(cls_logits, box_preds, priors):
        return jit_detect(
            score_threshold=score_threshold, pre_nms_top_k=pre_nms_top_k,
            iou_threshold=iou_threshold, max_detections=max_detections,
            variances=tuple(variances), nms_tile_size=nms_tile_size,
            max_candidate_priors=max_candidate_priors, sort_top_k=sort_top_k,
            decode_per_image=decode_per_image)(cls_logits, box_preds, priors)
    num_priors = cls_logits.shape[-2]
    top_k = min(pre_nms_top_k, num_priors)
    scores = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)
    priors = jnp.asarray(priors, jnp.float32)
    # On CPU, decoded one image at a time: XLA:CPU contracts the decode's multiply-adds into FMAs
    # differently for different batch sizes (1-ulp differences); a per-image body makes an image's
    # boxes bit-identical whatever batch it comes in. Elsewhere vmapped: on GPU the per-image loop
    # is a while loop whose every iteration waits for the host (64 round trips at batch 64; issue
    # 17's H200 profile had the GPU idle ~30% of each call, waiting on such loops).
    decode = lambda offsets: jnp.clip(box_coder.decode(offsets, priors, variances), 0.0, 1.0)
    per_image = lambda x: jax.lax.map(decode, x)
    if decode_per_image is None:
        boxes = jax.lax.platform_dependent(box_preds, cpu=per_image, default=jax.vmap(decode))
    else:
        boxes = (per_image if decode_per_image else jax.vmap(decode))(box_preds)  # [B, P, 4]
    fg = scores[..., 1:]  # [B, P, C-1]
    args = (score_threshold, top_k, iou_threshold, max_detections, nms_tile_size,
            top_k_by_sort if sort_top_k else jax.lax.top_k)
    m = min(max(max_candidate_priors, top_k), num_priors)
    if max_candidate_priors <= 0 or m == num_priors:
        return _per_class_detect(fg, boxes, *args)
    candidate = jnp.any(fg > score_threshold, axis=2)  # [B, P]
    count = jnp.sum(candidate, axis=1, keepdims=True)  # [B, 1]

    def compacted():
        idx = jax.vmap(lambda c: jnp.nonzero(c, size=m, fill_value=0)[0])(candidate)  # [B, m]
        real = jnp.arange(m) < count
        fg_m = jnp.where(real[..., None], jnp.take_along_axis(fg, idx[..., None], axis=1),
                         -jnp.inf)
        return _per_class_detect(fg_m, jnp.take_along_axis(boxes, idx[..., None], axis=1), *args)

    fits = jnp.max(count) <= m
    return jax.lax.cond(fits, compacted, lambda: _per_class_detect(fg, boxes, *args))


def top_k_by_sort(x: jnp.ndarray, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`lax.top_k(x, k)` as a stable sort of the last axis: values [..., k] descending and their
    int32 indices, ties to the lower index (as lax.top_k). Same results, a plain stablehlo.sort:
    what an exported SavedModel runs (TF's StableHLO reader fails on lax.top_k's op when the
    batch is symbolic). x: float [..., N] without NaN (and where +0.0 and -0.0 both occur, +0.0
    ranks first: a total order); k <= N."""
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    neg, idx = jax.lax.sort((-x, iota), dimension=x.ndim - 1, num_keys=1, is_stable=True)
    return -neg[..., :k], idx[..., :k]


def _per_class_detect(fg: jnp.ndarray, boxes: jnp.ndarray, score_threshold: float, top_k: int,
                      iou_threshold: float, max_detections: int, tile: int,
                      take_top_k: Callable[..., Any] = jax.lax.top_k) -> Detections:
    """fg [B, N, C-1] scores and boxes [B, N, 4] of N >= top_k (candidate) priors, in prior order.

    Per class: threshold, the top_k best (invalid ones sort last, as -inf), greedy NMS; then the
    best max_detections over all classes (top_k ties: lower class first, then lower prior).
    """
    batch, num_fg = fg.shape[0], fg.shape[2]
    fg = jnp.swapaxes(fg, 1, 2)  # [B, C-1, N]
    fg = jnp.where(fg > score_threshold, fg, -jnp.inf)
    cand_scores, cand_idx = take_top_k(fg, top_k)  # [B, C-1, k], sorted descending
    valid = cand_scores > -jnp.inf
    cand_boxes = jax.vmap(lambda b, i: b[i])(boxes, cand_idx)  # [B, C-1, k, 4]

    n = batch * num_fg
    keep = nms_padded(cand_boxes.reshape(n, top_k, 4), valid.reshape(n, top_k),
                      iou_threshold, tile).reshape(valid.shape)

    k_out = min(max_detections, num_fg * top_k)
    flat_scores = jnp.where(keep, cand_scores, -jnp.inf).reshape(batch, -1)
    best, order = take_top_k(flat_scores, k_out)  # [B, K]
    found = best > -jnp.inf
    classes = (order // top_k + 1).astype(jnp.int32)
    out_boxes = jnp.take_along_axis(cand_boxes.reshape(batch, -1, 4), order[..., None], axis=1)
    return Detections(
        boxes=jnp.where(found[..., None], out_boxes, 0.0),
        scores=jnp.where(found, best, 0.0),
        classes=jnp.where(found, classes, 0),
        num_detections=jnp.sum(found, axis=1).astype(jnp.int32),
    )
