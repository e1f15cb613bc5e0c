import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.ssd import SSD

from ssd_jax import box_ops, loss, matching, priors
from tests.conftest import random_gt_batch
from tests.test_matching import torchvision_targets

SPEC = priors.SSD300_VOC
PRIORS = priors.generate_priors(SPEC)
PRIOR_CORNERS = np.asarray(box_ops.centers_to_corners(PRIORS))
NUM_CLASSES = 21


def _head_outputs(rng, batch):
    logits = rng.normal(0.0, 2.0, size=(batch, PRIORS.shape[0], NUM_CLASSES)).astype(np.float32)
    preds = rng.normal(0.0, 1.0, size=(batch, PRIORS.shape[0], 4)).astype(np.float32)
    return logits, preds


def torchvision_loss(logits, preds, gt_boxes, gt_labels, counts, grads=False):
    """torchvision's SSD.compute_loss, called on a minimal object with the attributes it uses;
    with grads=True also torch's autograd gradients of their sum w.r.t. logits and preds."""
    ssd = types.SimpleNamespace(box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)), neg_to_pos_ratio=3)
    targets, matched = [], []
    anchors = torch.from_numpy(PRIOR_CORNERS)
    for i, n in enumerate(counts):
        targets.append({"boxes": torch.from_numpy(gt_boxes[i, :n]),
                        "labels": torch.from_numpy(gt_labels[i, :n].astype(np.int64))})
        if n == 0:
            matched.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64))
        else:
            from torchvision.models.detection._utils import SSDMatcher
            from torchvision.ops import box_iou
            matched.append(SSDMatcher(0.5)(box_iou(targets[-1]["boxes"], anchors)))
    head = {"cls_logits": torch.from_numpy(logits).requires_grad_(grads),
            "bbox_regression": torch.from_numpy(preds).requires_grad_(grads)}
    out = SSD.compute_loss(ssd, targets, head, [anchors] * len(counts), matched)
    values = out["classification"].item(), out["bbox_regression"].item()
    if not grads:
        return values
    (out["classification"] + out["bbox_regression"]).backward()
    return values, (head["cls_logits"].grad.numpy(), head["bbox_regression"].grad.numpy())


@pytest.mark.parametrize("counts", [[3, 0, 7, 1], [22, 9, 0, 30]], ids=["mixed", "crowded"])
def test_multibox_loss_equals_torchvision_compute_loss(counts):
    rng = np.random.default_rng(len(counts) + sum(counts))
    gt_boxes, gt_labels = random_gt_batch(rng, counts, 40)
    logits, preds = _head_outputs(rng, len(counts))
    # the targets of torchvision's own matcher, so the comparison isolates the loss
    tv = [torchvision_targets(gt_boxes[i, :n], gt_labels[i, :n]) for i, n in enumerate(counts)]
    cls_t = np.stack([t[0] for t in tv]).astype(np.int32)
    box_t = np.stack([t[1] for t in tv])
    (total, aux), grads = jax.jit(jax.value_and_grad(loss.multibox_loss, argnums=(0, 1),
                                                     has_aux=True))(logits, preds, cls_t, box_t)
    (ref_conf, ref_loc), ref_grads = torchvision_loss(logits, preds, gt_boxes, gt_labels, counts,
                                                      grads=True)
    # the gradients too (a rewrite of the loss's gradient must keep them): same hard negatives,
    # so the same entries; float32 rounding of softmax and of the 1/N scale
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-4, atol=1e-9)
        assert np.count_nonzero(ref) > 0
    np.testing.assert_allclose(float(aux["conf_loss"]), ref_conf, rtol=1e-5)
    np.testing.assert_allclose(float(aux["loc_loss"]), ref_loc, rtol=1e-5)
    np.testing.assert_allclose(float(total), ref_conf + ref_loc, rtol=1e-5)
    assert float(aux["num_pos"]) == (cls_t > 0).sum()


def test_loss_with_own_matching_equals_torchvision():
    counts = [5, 2, 11]
    rng = np.random.default_rng(42)
    gt_boxes, gt_labels = random_gt_batch(rng, counts, 16)
    logits, preds = _head_outputs(rng, len(counts))
    cls_t, box_t = matching.match_batch(gt_boxes, gt_labels, PRIORS)
    total, _ = loss.multibox_loss(logits, preds, cls_t, box_t)
    ref_conf, ref_loc = torchvision_loss(logits, preds, gt_boxes, gt_labels, counts)
    np.testing.assert_allclose(float(total), ref_conf + ref_loc, rtol=1e-5)


def test_hard_negatives_are_the_highest_loss_background_priors():
    conf = jnp.array([[0.1, 5.0, 0.3, 4.0, 0.2, 3.0, 9.0, 0.0]])
    positive = jnp.array([[False, False, False, False, False, False, True, False]])
    mask = np.asarray(loss.hard_negative_mask(conf, positive, 3.0))[0]
    assert mask.tolist() == [False, True, False, True, False, True, False, False]


def test_invariant_to_padding_amount():
    rng = np.random.default_rng(3)
    gt_boxes, gt_labels = random_gt_batch(rng, [4, 6], 6)
    logits, preds = _head_outputs(rng, 2)

    def value(boxes, labels):
        cls_t, box_t = matching.match_batch(boxes, labels, PRIORS)
        return float(loss.multibox_loss(logits, preds, cls_t, box_t)[0])

    padded_boxes = np.pad(gt_boxes, ((0, 0), (0, 50), (0, 0)))
    padded_labels = np.pad(gt_labels, ((0, 0), (0, 50)))
    assert value(gt_boxes, gt_labels) == pytest.approx(value(padded_boxes, padded_labels), rel=1e-6)


def test_zero_positives_gives_finite_value_and_gradients():
    rng = np.random.default_rng(4)
    logits, preds = _head_outputs(rng, 2)
    cls_t = np.zeros((2, PRIORS.shape[0]), np.int32)
    box_t = np.zeros((2, PRIORS.shape[0], 4), np.float32)
    (value, aux), grads = jax.value_and_grad(loss.multibox_loss, argnums=(0, 1), has_aux=True)(
        logits, preds, cls_t, box_t)
    assert np.isfinite(float(value)) and float(aux["num_pos"]) == 0.0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert float(value) == 0.0  # no positive -> no negative is mined either


def test_low_precision_inputs_compute_in_float32():
    rng = np.random.default_rng(6)
    gt_boxes, gt_labels = random_gt_batch(rng, [3, 5], 8)
    logits, preds = _head_outputs(rng, 2)
    cls_t, box_t = matching.match_batch(gt_boxes, gt_labels, PRIORS)
    full, _ = loss.multibox_loss(logits, preds, cls_t, box_t)
    half, aux = loss.multibox_loss(logits.astype(jnp.bfloat16), preds.astype(jnp.bfloat16), cls_t, box_t)
    assert half.dtype == jnp.float32 and aux["conf_loss"].dtype == jnp.float32
    np.testing.assert_allclose(float(half), float(full), rtol=2e-2)


def test_hard_negatives_take_exactly_k_with_ties_like_a_stable_sort():
    rng = np.random.default_rng(7)
    # quantized losses: many exact ties, as flat image regions produce
    conf = rng.integers(0, 6, size=(4, 300)).astype(np.float32) * 0.25
    positive = rng.random((4, 300)) < 0.05
    positive[3] = False  # an image without positives mines nothing
    positive[2, :100] = True  # 3 * 100 > 200 negatives: all negatives are taken
    mask = np.asarray(loss.hard_negative_mask(jnp.asarray(conf), jnp.asarray(positive), 3.0))
    for i in range(4):
        neg = np.flatnonzero(~positive[i])
        k = min(3 * positive[i].sum(), len(neg))
        order = neg[np.argsort(-conf[i, neg], kind="stable")]  # ties: lower index first
        expected = np.zeros(300, bool)
        expected[order[:k]] = True
        np.testing.assert_array_equal(mask[i], expected, err_msg=f"image {i}")


def test_softmax_cross_entropy_value_and_gradient_equal_autodiff_of_logsumexp():
    """softmax_cross_entropy (a one-hot select, not a gather) and its gradient against jax's
    autodiff of the textbook formula, with per-element cotangents, logits of 1e4 (the max shift:
    without it exp overflows) and -inf logits."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 3.0, (2, 50, 7)).astype(np.float32)
    logits[0, 0] += 1e4
    logits[1, 1, 2] = -np.inf
    labels = rng.integers(0, 7, (2, 50)).astype(np.int32)
    labels[1, 1] = 3
    weights = rng.uniform(0.0, 2.0, (2, 50)).astype(np.float32)

    def textbook(x):
        picked = jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0]
        return jnp.sum(weights * (jax.nn.logsumexp(x, axis=-1) - picked))

    def ours(x):
        return jnp.sum(weights * loss.softmax_cross_entropy(x, labels))

    value, grad = jax.jit(jax.value_and_grad(ours))(logits)
    ref_value, ref_grad = jax.value_and_grad(textbook)(logits)
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(loss.softmax_cross_entropy(logits, labels)),
                               np.asarray(jax.nn.logsumexp(logits, axis=-1) - np.take_along_axis(
                                   logits, labels[..., None], axis=-1)[..., 0]), rtol=1e-6)
