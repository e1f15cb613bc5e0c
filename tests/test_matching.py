import jax
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder, SSDMatcher

from ssd_jax import box_ops, matching, priors
from tests.conftest import random_gt_batch

PRIORS = priors.generate_priors(priors.SSD300_VOC)
PRIOR_CORNERS = np.asarray(box_ops.centers_to_corners(PRIORS))


def torchvision_targets(boxes: np.ndarray, labels: np.ndarray):
    """Class and offset targets the way torchvision's SSD builds them (compute_loss)."""
    anchors = torch.from_numpy(PRIOR_CORNERS)
    num_priors = anchors.shape[0]
    if boxes.shape[0] == 0:
        matched = torch.full((num_priors,), -1, dtype=torch.int64)
        iou = torch.zeros((0, num_priors))
    else:
        iou = torchvision.ops.box_iou(torch.from_numpy(boxes), anchors)
        matched = SSDMatcher(0.5)(iou)
    fg = torch.where(matched >= 0)[0]
    cls = np.zeros(num_priors, np.int64)
    cls[fg.numpy()] = labels[matched[fg].numpy()]
    box = np.zeros((num_priors, 4), np.float32)
    if len(fg):
        coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        enc = coder.encode_single(torch.from_numpy(boxes)[matched[fg]], anchors[fg])
        box[fg.numpy()] = enc.numpy()
    return cls, box, iou.numpy()


def _explained_by_tie(iou: np.ndarray, prior: int) -> bool:
    """A disagreement is acceptable only where IoUs tie at float precision for this prior
    (two ground truths, the 0.5 threshold, or two priors competing for one ground truth)."""
    col = np.sort(iou[:, prior])[::-1]
    near_threshold = abs(col[0] - 0.5) < 1e-6
    gt_tie = len(col) > 1 and abs(col[0] - col[1]) < 1e-6
    best_prior_tie = any(abs(iou[g].max() - iou[g, prior]) < 1e-6 for g in range(iou.shape[0]))
    return near_threshold or gt_tie or best_prior_tie


@pytest.mark.parametrize("counts", [[0, 3, 1, 12], [20, 25, 5, 0]], ids=["mixed", "crowded"])
def test_match_batch_equals_torchvision(counts):
    rng = np.random.default_rng(sum(counts))
    max_boxes = 32  # every image has padded rows
    gt_boxes, gt_labels = random_gt_batch(rng, counts, max_boxes)
    cls, box = jax.jit(matching.match_batch, static_argnums=(3,))(gt_boxes, gt_labels, PRIORS, 0.5)
    cls, box = np.asarray(cls), np.asarray(box)
    assert cls.dtype == np.int32 and box.dtype == np.float32
    for i, n in enumerate(counts):
        ref_cls, ref_box, iou = torchvision_targets(gt_boxes[i, :n], gt_labels[i, :n])
        bad = np.nonzero(cls[i] != ref_cls)[0]
        assert all(_explained_by_tie(iou, p) for p in bad), f"image {i}: priors {bad[:10]} differ"
        assert len(bad) <= 2
        same = cls[i] == ref_cls
        np.testing.assert_allclose(box[i][same], ref_box[same], rtol=1e-4, atol=1e-4)
        if n == 0:
            assert not cls[i].any() and not box[i].any()
        else:
            assert (cls[i] > 0).sum() >= n  # every ground truth gets at least its best prior


def test_every_ground_truth_is_matched_even_below_threshold():
    # a tiny box overlaps no prior at 0.5, but still gets its best prior
    gt = np.array([[0.50, 0.50, 0.51, 0.52], [0.0, 0.0, 0.0, 0.0]], np.float32)
    labels = np.array([7, 0], np.int32)
    cls, box = matching.match_priors(gt, labels, PRIORS)
    cls = np.asarray(cls)
    assert (cls == 7).sum() == 1 and (cls > 0).sum() == 1
    best = np.asarray(box_ops.iou(gt[:1], PRIOR_CORNERS))[0].argmax()
    assert cls[best] == 7
    assert np.all(np.asarray(box)[cls == 0] == 0)


def test_padding_rows_never_match_and_padding_amount_is_irrelevant():
    rng = np.random.default_rng(5)
    gt_boxes, gt_labels = random_gt_batch(rng, [4], 4)
    # padded rows that would match strongly if they were real (a box equal to a prior)
    pad_box = np.broadcast_to(PRIOR_CORNERS[100], (1, 10, 4))
    boxes = np.concatenate([gt_boxes, pad_box], axis=1)
    labels = np.concatenate([gt_labels, np.zeros((1, 10), np.int32)], axis=1)
    a = matching.match_batch(gt_boxes, gt_labels, PRIORS)
    b = matching.match_batch(boxes, labels, PRIORS)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_prior_at_exactly_the_threshold_is_positive():
    """IoU >= threshold is positive (the paper; torchvision's Matcher drops only IoU < low).

    Every IoU below is exactly representable: against the ground truth [0, 0, 1, 1], prior 1
    ([0, 0, 0.5, 1]) has IoU exactly 0.5 and prior 2 ([0, 0, 0.5, 0.75]) exactly 0.375. Prior 0
    equals the ground truth, so rule 1 (the forced best prior) is prior 0 and priors 1-2 depend on
    rule 2 alone. A strict `>` would make prior 1 background.
    """
    corners = np.array([[0, 0, 1, 1], [0, 0, 0.5, 1], [0, 0, 0.5, 0.75], [0.5, 0, 1, 1]],
                       np.float32)
    pri = np.asarray(box_ops.corners_to_centers(corners))
    np.testing.assert_array_equal(np.asarray(box_ops.centers_to_corners(pri)), corners)
    gt = np.array([[[0, 0, 1, 1], [0, 0, 0, 0]]], np.float32)
    labels = np.array([[3, 0]], np.int32)
    iou = np.asarray(box_ops.iou(gt[0, :1], corners))[0]
    np.testing.assert_array_equal(iou, [1.0, 0.5, 0.375, 0.5])
    for threshold, expected in [(0.5, [3, 3, 0, 3]), (0.375, [3, 3, 3, 3]), (0.51, [3, 0, 0, 0])]:
        cls, _ = jax.jit(matching.match_batch, static_argnums=(3,))(gt, labels, pri, threshold)
        np.testing.assert_array_equal(np.asarray(cls)[0], expected, err_msg=f"at {threshold}")
        ref = SSDMatcher(threshold)(torchvision.ops.box_iou(torch.from_numpy(gt[0, :1]),
                                                            torch.from_numpy(corners)))
        np.testing.assert_array_equal((ref.numpy() >= 0) * 3, expected)


def test_ties_go_to_the_lowest_index_like_torch():
    """Two ground truths with the same IoU at a prior: the first one wins (torch.max's rule), and
    a ground truth whose best IoU is shared by two priors forces the first of them."""
    corners = np.array([[0, 0, 0.5, 1], [0.5, 0, 1, 1], [0.25, 0, 0.75, 1]], np.float32)
    pri = np.asarray(box_ops.corners_to_centers(corners))
    # gt 0 = left half + middle: IoU 0.5 with priors 0 and 2 (tie for its best prior);
    # gt 1 = the whole square: IoU 0.5 with each prior.
    gt = np.array([[[0, 0, 0.75, 1], [0, 0, 1, 1]]], np.float32)
    labels = np.array([[1, 2]], np.int32)
    iou = np.asarray(box_ops.iou(gt[0], corners))
    np.testing.assert_array_equal(iou, np.float32([[2 / 3, 0.25, 2 / 3], [0.5, 0.5, 0.5]]))
    cls, _ = matching.match_batch(gt, labels, pri, 0.5)
    ref = SSDMatcher(0.5)(torchvision.ops.box_iou(torch.from_numpy(gt[0]), torch.from_numpy(corners)))
    assert (ref.numpy() >= 0).all()
    expected = labels[0][ref.numpy()]
    np.testing.assert_array_equal(np.asarray(cls)[0], expected)


def test_a_prior_tied_between_two_ground_truths_takes_the_first_like_torch():
    """Rule 2's tie: a prior with exactly the same IoU (0.5) to two ground truths, neither of
    which is forced onto it, takes the first (torch.max's rule; `>=` in a compare chain over the
    ground truths would give the second)."""
    corners = np.array([[0.25, 0.25, 0.75, 0.75],   # prior 0: upper and lower halves tie at 0.5
                        [0.25, 0.25, 0.75, 0.5],    # prior 1 = gt 0 (its forced prior)
                        [0.25, 0.5, 0.75, 0.75]], np.float32)  # prior 2 = gt 1
    pri = np.asarray(box_ops.corners_to_centers(corners))
    gt = corners[None, 1:].copy()
    labels = np.array([[1, 2]], np.int32)
    iou = np.asarray(box_ops.iou(gt[0], corners))
    np.testing.assert_array_equal(iou[:, 0], np.float32([0.5, 0.5]))
    cls, _ = matching.match_batch(gt, labels, pri, 0.5)
    ref = SSDMatcher(0.5)(torchvision.ops.box_iou(torch.from_numpy(gt[0]),
                                                  torch.from_numpy(corners)))
    np.testing.assert_array_equal(ref.numpy(), [0, 0, 1])
    np.testing.assert_array_equal(np.asarray(cls)[0], labels[0][ref.numpy()])


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 33, 255, 3572, 8732])
@pytest.mark.parametrize("chunks", [1, 3, 16])
def test_first_argmax_equals_numpy_on_ties(n, chunks):
    """The two-stage argmax against np.argmax (first index among equal maxima) on values drawn
    from a handful of levels, so that maxima repeat within a piece, across pieces and in the tail;
    rows whose only maximum sits in the tail, at index 0 or at the last index are included."""
    rng = np.random.default_rng(n * 100 + chunks)
    x = rng.integers(-2, 3, size=(40, n)).astype(np.float32) / 4
    x[0] = -1.0                           # every entry ties: index 0
    x[1, -1] = 5.0                        # the last index (in the tail where n % chunks != 0)
    x[2, :] = 0.0
    x[2, n // 2:] = 0.25                  # the first of a run in the middle
    x[3, :] = rng.permutation(n).astype(np.float32)  # a unique maximum anywhere
    got = jax.jit(matching._first_argmax_last_axis, static_argnums=1)(x, chunks)
    np.testing.assert_array_equal(np.asarray(got), np.argmax(x, axis=-1))


def test_best_over_rows_counts_invalid_rows_as_minus_one():
    """Rule 2's chain against numpy: max and first argmax over rows of x with the invalid rows
    replaced by -1 (an invalid row never wins, even with a larger IoU, and all-invalid columns
    report -1 at row 0)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(7, 300)).astype(np.float32) / 4
    valid = np.array([False, True, True, False, True, False, True])
    x[3] = 2.0                             # an invalid row above every valid IoU
    best, index = jax.jit(matching._best_over_rows)(x, valid)
    masked = np.where(valid[:, None], x, -1.0)
    np.testing.assert_array_equal(np.asarray(best), masked.max(0))
    np.testing.assert_array_equal(np.asarray(index), np.argmax(masked, 0))
    best, index = matching._best_over_rows(x, np.zeros(7, bool))
    assert (np.asarray(best) == -1).all() and (np.asarray(index) == 0).all()


def test_a_forced_ground_truth_overrides_a_better_one_at_its_prior_like_torch():
    """Rule 1 beats rule 2 whatever the indices: prior 0 is the best prior of gt 0 (IoU 0.05)
    while gt 1 covers it at IoU 0.9 (and is forced onto prior 1); prior 0 goes to gt 0."""
    corners = np.array([[0, 0, 1, 1], [0, 0, 0.9, 1]], np.float32)
    pri = np.asarray(box_ops.corners_to_centers(corners))
    gt = np.array([[[0.95, 0, 1, 1], [0, 0, 0.9, 1]]], np.float32)
    labels = np.array([[1, 2]], np.int32)
    cls, _ = matching.match_batch(gt, labels, pri, 0.5)
    ref = SSDMatcher(0.5)(torchvision.ops.box_iou(torch.from_numpy(gt[0]),
                                                  torch.from_numpy(corners)))
    np.testing.assert_array_equal(ref.numpy(), [0, 1])
    np.testing.assert_array_equal(np.asarray(cls)[0], [1, 2])
