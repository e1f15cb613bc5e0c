import numpy as np
import pytest
import torch
import torchvision
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ssd_jax import box_ops
from tests.conftest import random_boxes


def test_iou_equals_torchvision():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 37), random_boxes(rng, 53)
    ours = np.asarray(box_ops.iou(a, b))
    ref = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_conversions_equal_torchvision_and_round_trip():
    rng = np.random.default_rng(1)
    corners = random_boxes(rng, 20)
    centers = np.asarray(box_ops.corners_to_centers(corners))
    ref = torchvision.ops.box_convert(torch.from_numpy(corners), "xyxy", "cxcywh").numpy()
    np.testing.assert_allclose(centers, ref, atol=1e-7)
    np.testing.assert_allclose(np.asarray(box_ops.centers_to_corners(centers)), corners, atol=1e-6)


def test_degenerate_boxes_give_zero_not_nan():
    boxes = np.array([[0.2, 0.2, 0.2, 0.5],   # zero width
                      [0.5, 0.5, 0.4, 0.6],   # inverted
                      [0.0, 0.0, 0.0, 0.0]],  # padding
                     np.float32)
    out = np.asarray(box_ops.iou(boxes, boxes))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, 0.0)
    assert np.asarray(box_ops.area(boxes)).tolist() == [0.0, 0.0, 0.0]


_coord = st.floats(0.0, 1.0, width=32)
_box_arrays = arrays(np.float32, (6, 4), elements=_coord)


def _proper(boxes: np.ndarray) -> np.ndarray:
    lo = np.minimum(boxes[:, :2], boxes[:, 2:])
    hi = np.maximum(boxes[:, :2], boxes[:, 2:])
    return np.concatenate([lo, hi], axis=1)


@settings(max_examples=60, deadline=None)
@given(_box_arrays, _box_arrays)
def test_iou_properties(a, b):
    ab = np.asarray(box_ops.iou(a, b))
    ba = np.asarray(box_ops.iou(b, a))
    assert np.all(np.isfinite(ab))
    np.testing.assert_allclose(ab, ba.T, atol=1e-6)  # symmetric
    assert np.all(ab >= 0.0) and np.all(ab <= 1.0 + 1e-6)


@settings(max_examples=60, deadline=None)
@given(_box_arrays)
# a denormal corner: the area comes out 0 while the intersection does not (union < 0)
@example(np.array([[0.0, 1.4012985e-45, 1.0, 1.1754944e-38]], np.float32))
def test_iou_with_itself_is_one(a):
    a = _proper(a)
    diag = np.diag(np.asarray(box_ops.iou(a, a)))
    has_area = np.asarray(box_ops.area(a)) > 0.0
    np.testing.assert_allclose(diag[has_area], 1.0, atol=1e-5)
    np.testing.assert_array_equal(diag[~has_area], 0.0)


@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 5, 4)])
def test_conversions_keep_leading_shape(shape):
    x = np.ones(shape, np.float32)
    assert box_ops.corners_to_centers(x).shape == shape
    assert box_ops.centers_to_corners(x).shape == shape
