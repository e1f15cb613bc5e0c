"""The MultiBox loss (SSD paper eq. 1): L = (L_conf + alpha * L_loc) / N.

L_conf is softmax cross-entropy over the positives and the hardest negatives (per image, the
neg_pos_ratio * num_pos background priors with the highest confidence loss); L_loc is smooth L1
(beta 1) on the offsets of the positives; N is the number of positives (at least 1).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def _smooth_l1(x: jnp.ndarray) -> jnp.ndarray:
    ax = jnp.abs(x)
    return jnp.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


def softmax_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """-log softmax(logits)[label]: logits float32 [..., C], labels int [...] -> float32 [...].

    Written as logsumexp(logits) minus the label's logit picked by a one-hot select, not as a
    gather from log_softmax: the gather's gradient is a scatter, and the [B, P, C] log-softmax is
    one more array the size of the logits. Same values; on a 2-core CPU (batch 32, SSD300 priors,
    21 classes) value and gradient take about half the time.
    """
    picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == labels[..., None], logits, 0.0),
                     axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - picked


def hard_negative_mask(
    conf_loss: jnp.ndarray, positive: jnp.ndarray, neg_pos_ratio: float
) -> jnp.ndarray:
    """Per image, the `neg_pos_ratio * num_pos` negatives of highest loss.

    conf_loss float [B,P] (>= 0, e.g. cross-entropy), positive bool [B,P] -> bool [B,P], never
    true on a positive. Exactly k = min(floor(ratio * num_pos), #negatives) negatives per image;
    among equal losses at the boundary the lowest prior indices win (as a stable sort). Instead of
    sorting (slow on XLA:CPU), each image's k-th largest loss is found by a 31-step bisection over
    the float's bit pattern (order-preserving for x >= 0).
    """
    loss = jnp.maximum(conf_loss.astype(jnp.float32), 0.0) + 0.0  # +0.0 turns -0.0 into 0.0
    bits = jnp.where(positive, -1, jax.lax.bitcast_convert_type(loss, jnp.int32))
    k = jnp.floor(neg_pos_ratio * jnp.sum(positive, axis=1, keepdims=True)).astype(jnp.int32)

    def set_bit(i, threshold):  # greedily the largest threshold with count(bits >= t) >= k
        candidate = threshold | (1 << (30 - i))
        enough = jnp.sum(bits >= candidate, axis=1, keepdims=True) >= k
        return jnp.where(enough, candidate, threshold)

    threshold = jax.lax.fori_loop(0, 31, set_bit, jnp.zeros_like(k))
    above = bits > threshold
    # Ties matter: flat image regions give many priors exactly the same loss.
    at = bits == threshold
    room = k - jnp.sum(above, axis=1, keepdims=True)
    return (above | (at & (jnp.cumsum(at, axis=1) <= room))) & (k > 0)


def multibox_loss(
    cls_logits: jnp.ndarray,
    box_preds: jnp.ndarray,
    cls_targets: jnp.ndarray,
    box_targets: jnp.ndarray,
    *,
    neg_pos_ratio: float = 3.0,
    loc_weight: float = 1.0,
    axis_name: Any = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The SSD MultiBox loss with hard negative mining, as a pure function.

    Args:
      cls_logits: [B, P, C] class logits (C counts background, class 0), any float dtype.
      box_preds: [B, P, 4] predicted offsets (dcx, dcy, dw, dh).
      cls_targets: int [B, P] matched classes (0 = background), e.g. from `matching.match_batch`.
      box_targets: [B, P, 4] encoded target offsets (only positives are used).
      neg_pos_ratio: negatives kept per positive, per image (the paper's 3).
      loc_weight: alpha, the weight of the localization term (the paper's 1).
      axis_name: inside a mapped function (shard_map/pmap over the batch), the named axis to sum
        the loss and the positive count over, so the value equals the loss of the global batch.

    Returns:
      (loss, aux): scalar float32 loss, and aux with float32 scalars `conf_loss`, `loc_loss`
      (both already divided by N) and `num_pos` (N before the clamp at 1). Finite with gradients
      even when there is no positive.

    Called outside jit (eagerly) it runs one jitted program per settings and shapes, compiled
    once, where op-by-op execution compiled its pieces again at every call.
    """
    args = (cls_logits, box_preds, cls_targets, box_targets)
    if axis_name is None and not any(isinstance(x, jax.core.Tracer) for x in args):
        return _jitted_loss(*args, neg_pos_ratio=float(neg_pos_ratio),
                            loc_weight=float(loc_weight))
    return _multibox_loss(*args, neg_pos_ratio=neg_pos_ratio, loc_weight=loc_weight,
                          axis_name=axis_name)


def _multibox_loss(cls_logits, box_preds, cls_targets, box_targets, *, neg_pos_ratio, loc_weight,
                   axis_name):
    cls_logits = cls_logits.astype(jnp.float32)
    box_preds = box_preds.astype(jnp.float32)
    box_targets = box_targets.astype(jnp.float32)
    cls_targets = cls_targets.astype(jnp.int32)

    positive = cls_targets > 0
    ce = softmax_cross_entropy(cls_logits, cls_targets)  # [B, P]
    negative = hard_negative_mask(jax.lax.stop_gradient(ce), positive, neg_pos_ratio)

    conf_sum = jnp.sum(jnp.where(positive | negative, ce, 0.0))
    loc = jnp.sum(_smooth_l1(box_preds - box_targets), axis=-1)
    loc_sum = jnp.sum(jnp.where(positive, loc, 0.0))
    num_pos = jnp.sum(positive).astype(jnp.float32)
    if axis_name is not None:
        conf_sum, loc_sum, num_pos = jax.lax.psum((conf_sum, loc_sum, num_pos), axis_name)
    n = jnp.maximum(num_pos, 1.0)
    conf_loss = conf_sum / n
    loc_loss = loc_sum / n
    loss = conf_loss + loc_weight * loc_loss
    return loss, {"conf_loss": conf_loss, "loc_loss": loc_loss, "num_pos": num_pos}


_jitted_loss = jax.jit(functools.partial(_multibox_loss, axis_name=None),
                       static_argnames=("neg_pos_ratio", "loc_weight"))
