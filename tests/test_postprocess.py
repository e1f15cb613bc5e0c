"""ssd_jax.postprocess.detect against torchvision's SSD.postprocess_detections; batch invariance."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from ssd_jax import postprocess, priors

torch = pytest.importorskip("torch")
tv_ssd = pytest.importorskip("torchvision.models.detection.ssd")
tv_utils = pytest.importorskip("torchvision.models.detection._utils")

#: A small prior set (4 maps, 1000+ priors) keeps the many-candidates cases quick.
SMALL_SPEC = priors.PriorSpec(
    image_size=300, feature_map_sizes=(12, 6, 3, 1), steps=(25, 50, 100, 300),
    min_sizes=(30, 90, 160, 240), max_sizes=(90, 160, 240, 315),
    aspect_ratios=((2.0,), (2.0, 3.0), (2.0,), (2.0,)),
)


def trained_like_outputs(rng: np.random.Generator, batch: int, num_priors: int, num_classes: int,
                         num_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Head outputs like a trained model's: background wins except at a few candidate priors.

    Candidates cluster (several priors with the same class near the same place) so NMS has work.
    """
    logits = rng.normal(0.0, 1.0, (batch, num_priors, num_classes)).astype(np.float32)
    logits[..., 0] += 9.0  # foreground softmax scores ~1e-4: below the 0.01 threshold
    offsets = rng.normal(0.0, 0.5, (batch, num_priors, 4)).astype(np.float32)
    for b in range(batch):
        idx = rng.choice(num_priors, num_candidates, replace=False)
        cls = rng.integers(1, num_classes, num_candidates)
        logits[b, idx, cls] = logits[b, idx, 0] + rng.uniform(-6.0, 4.0, num_candidates)
        # a second class on some candidates, as a confused model would give
        half = idx[: num_candidates // 3]
        second = rng.integers(1, num_classes, half.size)
        logits[b, half, second] += rng.uniform(6.0, 10.0, half.size)
    return logits, offsets


def untrained_like_outputs(rng: np.random.Generator, batch: int, num_priors: int,
                           num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Every class of every prior is above the threshold: top-k, NMS and the final cut all bind."""
    logits = rng.normal(0.0, 1.0, (batch, num_priors, num_classes)).astype(np.float32)
    offsets = rng.normal(0.0, 0.7, (batch, num_priors, 4)).astype(np.float32)
    return logits, offsets


def torchvision_detect(logits, offsets, center_priors, *, score_threshold=0.01, top_k=400,
                       iou_threshold=0.45, max_detections=200, size=300):
    """torchvision's SSD.postprocess_detections on a minimal stand-in for the SSD module."""
    fake_ssd = types.SimpleNamespace(
        box_coder=tv_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)),
        score_thresh=score_threshold, topk_candidates=top_k, nms_thresh=iou_threshold,
        detections_per_img=max_detections)
    p = np.asarray(center_priors, np.float64)
    anchors = np.concatenate([p[:, :2] - p[:, 2:] / 2, p[:, :2] + p[:, 2:] / 2], axis=1) * size
    anchors = torch.tensor(anchors, dtype=torch.float32)
    head = {"cls_logits": torch.from_numpy(logits), "bbox_regression": torch.from_numpy(offsets)}
    with torch.no_grad():
        out = tv_ssd.SSD.postprocess_detections(
            fake_ssd, head, [anchors] * logits.shape[0], [(size, size)] * logits.shape[0])
    return [{k: v.numpy() for k, v in d.items()} for d in out]


def assert_matches_torchvision(dets: postprocess.Detections, ref: list[dict], size: int = 300):
    dets = jax.device_get(dets)
    for b, r in enumerate(ref):
        n = int(dets.num_detections[b])
        assert n == len(r["scores"]), (b, n, len(r["scores"]))
        scores, classes, boxes = dets.scores[b, :n], dets.classes[b, :n], dets.boxes[b, :n]
        np.testing.assert_allclose(scores, r["scores"], rtol=1e-5, atol=1e-7)
        # Same order up to exact score ties: compare (score, class, box) as sets within a tie.
        assert np.all(np.diff(scores) <= 0)
        ref_boxes = np.round(r["boxes"] / size, 3)
        order_ours = np.lexsort((*np.round(boxes, 3).T[::-1], classes, -np.round(scores, 6)))
        order_ref = np.lexsort((*ref_boxes.T[::-1], r["labels"], -np.round(r["scores"], 6)))
        np.testing.assert_array_equal(classes[order_ours], r["labels"][order_ref])
        np.testing.assert_allclose(boxes[order_ours], r["boxes"][order_ref] / size, atol=1e-4)
        # padding rows
        assert np.all(dets.scores[b, n:] == 0) and np.all(dets.classes[b, n:] == 0)
        assert np.all(dets.boxes[b, n:] == 0)
        assert np.all(classes >= 1) and np.all((boxes >= 0) & (boxes <= 1))


def test_matches_torchvision_ssd300_trained_like():
    rng = np.random.default_rng(0)
    pri = priors.generate_priors(priors.SSD300_VOC)
    logits, offsets = trained_like_outputs(rng, 2, pri.shape[0], 21, num_candidates=400)
    dets = jax.jit(postprocess.detect)(logits, offsets, pri)
    ref = torchvision_detect(logits, offsets, pri)
    assert all(len(r["scores"]) > 20 for r in ref)
    assert_matches_torchvision(dets, ref)


@pytest.mark.parametrize("tile", [16, 64, 512])
def test_matches_torchvision_many_candidates(tile):
    """All priors above the threshold: per-class top-k binds, NMS spans several tiles."""
    rng = np.random.default_rng(1)
    pri = priors.generate_priors(SMALL_SPEC)
    logits, offsets = untrained_like_outputs(rng, 2, pri.shape[0], 6)
    fn = jax.jit(lambda c, b: postprocess.detect(c, b, pri, pre_nms_top_k=300, max_detections=150,
                                                 nms_tile_size=tile))
    dets = fn(logits, offsets)
    ref = torchvision_detect(logits, offsets, pri, top_k=300, max_detections=150)
    assert all(len(r["scores"]) == 150 for r in ref)  # the final cut binds
    assert_matches_torchvision(dets, ref)


def test_other_thresholds_and_fewer_priors_than_top_k():
    rng = np.random.default_rng(2)
    pri = priors.generate_priors(SMALL_SPEC)
    logits, offsets = untrained_like_outputs(rng, 1, pri.shape[0], 4)
    logits[..., 0] += 1.5
    kw = dict(score_threshold=0.2, iou_threshold=0.3, max_detections=1000)
    dets = postprocess.detect(logits, offsets, pri, pre_nms_top_k=5000, **kw)
    ref = torchvision_detect(logits, offsets, pri, top_k=5000, score_threshold=0.2,
                             iou_threshold=0.3, max_detections=1000)
    assert dets.scores.shape == (1, 1000)
    assert_matches_torchvision(dets, ref)


def test_no_detection_at_all():
    pri = priors.generate_priors(SMALL_SPEC)
    logits = np.zeros((2, pri.shape[0], 5), np.float32)
    logits[..., 0] = 20.0
    dets = postprocess.detect(logits, np.zeros((2, pri.shape[0], 4), np.float32), pri)
    np.testing.assert_array_equal(dets.num_detections, [0, 0])
    assert not np.any(dets.scores) and not np.any(dets.classes) and not np.any(dets.boxes)
    assert dets.classes.dtype == np.int32 and dets.num_detections.dtype == np.int32
    assert dets.scores.dtype == np.float32


def test_batch_invariance_under_jit():
    """An image gives bit-identical detections alone and inside a batch of 8."""
    rng = np.random.default_rng(3)
    pri = priors.generate_priors(SMALL_SPEC)
    logits, offsets = trained_like_outputs(rng, 8, pri.shape[0], 21, num_candidates=150)
    logits[5], offsets[5] = untrained_like_outputs(rng, 1, pri.shape[0], 21)[0][0], offsets[5]
    fn = jax.jit(lambda c, b: postprocess.detect(c, b, pri))
    batched = jax.device_get(fn(logits, offsets))
    for i in (0, 5, 7):
        alone = jax.device_get(fn(logits[i:i + 1], offsets[i:i + 1]))
        for a, b in zip(alone, batched, strict=True):
            np.testing.assert_array_equal(a[0], b[i])


def test_decode_per_image_or_vmapped_give_the_same_detections():
    """The accelerators' vmapped decode (default off CPU) against the per-image one (CPU's
    default, and the ONNX export's): the same detections, boxes within float32 rounding."""
    rng = np.random.default_rng(5)
    pri = priors.generate_priors(SMALL_SPEC)
    logits, offsets = trained_like_outputs(rng, 4, pri.shape[0], 21, num_candidates=150)
    runs = [jax.device_get(jax.jit(lambda c, b, d=d: postprocess.detect(
        c, b, pri, decode_per_image=d))(logits, offsets)) for d in (None, True, False)]
    for a, b in zip(runs[0], runs[1], strict=True):  # on CPU the default is per image
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(runs[1].classes, runs[2].classes)
    np.testing.assert_array_equal(runs[1].num_detections, runs[2].num_detections)
    np.testing.assert_allclose(runs[1].scores, runs[2].scores, rtol=0, atol=0)
    np.testing.assert_allclose(runs[1].boxes, runs[2].boxes, rtol=0, atol=1e-6)


def test_nms_padded_is_greedy():
    """nms_padded against a plain-loop greedy NMS, on clustered boxes, for several tile sizes."""
    rng = np.random.default_rng(4)
    n, k = 5, 70
    centers = rng.uniform(0.2, 0.8, (n, 6, 2))[:, rng.integers(0, 6, k)]
    wh = rng.uniform(0.1, 0.3, (n, k, 2))
    boxes = np.concatenate([centers - wh / 2, centers + wh / 2], -1).astype(np.float32)
    counts = np.array([0, 1, 20, 64, 70])
    valid = np.arange(k)[None] < counts[:, None]
    expected = np.zeros((n, k), bool)
    for r in range(n):
        kept: list[int] = []
        for j in range(counts[r]):
            ious = [_iou(boxes[r, i], boxes[r, j]) for i in kept]
            if not any(v > 0.45 for v in ious):
                kept.append(j)
        expected[r, kept] = True
    for tile in (1, 7, 64, 128):
        got = postprocess.nms_padded(boxes, valid, 0.45, tile_size=tile)
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=f"tile {tile}")


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _pairs_above(logits: np.ndarray, threshold: float = 0.01, per_prior: bool = False):
    """In numpy: [B, C-1] pairs (prior, class) above the threshold per class, or with
    per_prior [B, P], whether any foreground class of the prior is above it."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    above = p[..., 1:] > threshold
    return np.any(above, axis=2) if per_prior else np.sum(above, axis=1)


def test_compacted_route_matches_torchvision_and_the_dense_route():
    """Trained-like outputs take the compacted route (checked in numpy); it equals the route over
    all priors bit for bit, and torchvision, also with exact score ties across priors/classes."""
    rng = np.random.default_rng(4)
    pri = priors.generate_priors(SMALL_SPEC)
    logits, offsets = trained_like_outputs(rng, 4, pri.shape[0], 21, num_candidates=120)
    # Exact ties across priors and classes: prior p has score 0.5 for class c1, a later prior q
    # 0.5 for a lower class c2 (the other logits underflow, so both softmax sums are exactly 2).
    tied = logits.copy()
    for b in range(tied.shape[0]):
        for p_, q_ in rng.choice(pri.shape[0], (10, 2), replace=False):
            c2, c1 = sorted(rng.choice(np.arange(1, 21), 2, replace=False))
            for prior, c in ((min(p_, q_), c1), (max(p_, q_), c2)):
                tied[b, prior] = -100.0
                tied[b, prior, [0, c]] = 0.0
    for lg in (logits, tied):
        candidate_priors = np.sum(_pairs_above(lg, per_prior=True), axis=1)
        assert 50 < candidate_priors.min() and candidate_priors.max() <= 400  # compacted route
        sparse = jax.device_get(jax.jit(lambda c, b: postprocess.detect(
            c, b, pri, max_candidate_priors=400))(lg, offsets))  # 400 of the 832 priors
        dense = jax.device_get(jax.jit(lambda c, b: postprocess.detect(
            c, b, pri, max_candidate_priors=0))(lg, offsets))
        for a, b in zip(sparse, dense, strict=True):
            np.testing.assert_array_equal(a, b)
        assert_matches_torchvision(sparse, torchvision_detect(lg, offsets, pri))


def test_top_k_by_sort_is_lax_top_k():
    """The export's top-k (a stable sort) returns lax.top_k's values and indices, ties included
    (ties go to the lower index), -inf padding and k = N; and detect with it is bit-identical."""
    rng = np.random.default_rng(6)
    x = rng.choice(np.array([-np.inf, 0.0, 0.25, 0.5, 0.75, 1.0], np.float32), (3, 5, 64))
    x[0, 0] = -np.inf
    for k in (1, 7, 64):
        want = jax.lax.top_k(x, k)
        got = postprocess.top_k_by_sort(x, k)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        assert got[1].dtype == want[1].dtype
    pri = priors.generate_priors(SMALL_SPEC)
    logits, offsets = trained_like_outputs(rng, 2, pri.shape[0], 6, num_candidates=60)
    for max_priors in (0, 400):
        want, got = (jax.device_get(jax.jit(lambda c, b, s=s, m=max_priors: postprocess.detect(
            c, b, pri, max_candidate_priors=m, sort_top_k=s))(logits, offsets))
            for s in (False, True))
        assert int(np.sum(want.num_detections)) > 20
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("max_priors, top_k", [(30, 5), (150, 5), (150, 400)])
def test_routes_at_their_limits(max_priors, top_k):
    """An image with more candidate priors than the compacted set (30: the route over all
    priors), a top-k that cuts a class (5), and a compacted set below the top-k (150 < 400,
    which compacts to 400) all give torchvision's result."""
    rng = np.random.default_rng(5)
    pri = priors.generate_priors(SMALL_SPEC)
    logits, offsets = trained_like_outputs(rng, 3, pri.shape[0], 6, num_candidates=60)
    candidate_priors = np.sum(_pairs_above(logits, per_prior=True), axis=1)
    assert candidate_priors.max() > 30 and candidate_priors.max() <= 150
    if top_k == 5:
        assert _pairs_above(logits).max() > 5  # a class is cut by top-k
    fn = jax.jit(lambda c, b: postprocess.detect(c, b, pri, pre_nms_top_k=top_k,
                                                 max_candidate_priors=max_priors))
    assert_matches_torchvision(fn(logits, offsets),
                               torchvision_detect(logits, offsets, pri, top_k=top_k))


@pytest.mark.parametrize("tile", [1, 2, 8])
def test_nms_keeps_a_box_at_exactly_the_threshold(tile):
    """Suppression needs IoU > threshold (torchvision's nms): a box at exactly the threshold stays.

    IoUs are exact in float32: [0, 0, 0.5, 1] against [0, 0, 1, 1] is 0.5, [0, 0, 0.75, 1] is 0.75.
    Tile 1 puts every pair in different tiles, tile 8 all in one (both comparisons of nms_padded).
    """
    boxes = np.array([[[0, 0, 1, 1], [0, 0, 0.5, 1], [0, 0, 0.75, 1], [0.5, 0, 1, 1]]], np.float32)
    valid = np.ones((1, 4), bool)
    for threshold, expected in [(0.5, [1, 1, 0, 1]), (0.4999, [1, 0, 0, 0]), (0.75, [1, 1, 1, 1])]:
        got = postprocess.nms_padded(boxes, valid, threshold, tile_size=tile)
        np.testing.assert_array_equal(np.asarray(got)[0], np.array(expected, bool),
                                      err_msg=f"threshold {threshold}")
        scores = torch.arange(4, 0, -1, dtype=torch.float32)
        ref = torch.ops.torchvision.nms(torch.from_numpy(boxes[0]), scores, threshold)
        assert sorted(ref.tolist()) == list(np.nonzero(expected)[0])
