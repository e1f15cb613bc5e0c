import math

import numpy as np
import torch
from torchvision.models.detection._utils import BoxCoder

from ssd_jax import box_coder, box_ops, priors
from tests.conftest import random_boxes

PRIORS = priors.generate_priors(priors.SSD300_VOC)


def _prior_corners() -> np.ndarray:
    return np.asarray(box_ops.centers_to_corners(PRIORS))


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, PRIORS.shape[0], min_size=0.02, max_size=0.9)
    offsets = box_coder.encode(boxes, PRIORS)
    np.testing.assert_allclose(np.asarray(box_coder.decode(offsets, PRIORS)), boxes, atol=2e-6)


def test_encode_equals_torchvision_box_coder():
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, PRIORS.shape[0])
    tv = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    ref = tv.encode_single(torch.from_numpy(boxes), torch.from_numpy(_prior_corners())).numpy()
    np.testing.assert_allclose(np.asarray(box_coder.encode(boxes, PRIORS)), ref, rtol=1e-4, atol=1e-4)


def test_decode_equals_torchvision_box_coder():
    rng = np.random.default_rng(2)
    offsets = rng.normal(0, 2.0, size=(PRIORS.shape[0], 4)).astype(np.float32)
    offsets[:5, 2:] = 80.0  # huge dw/dh: both clamp at log(1000/16)
    tv = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    ref = tv.decode_single(torch.from_numpy(offsets), torch.from_numpy(_prior_corners())).numpy()
    ours = np.asarray(box_coder.decode(offsets, PRIORS))
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_decode_clamps_and_stays_finite_in_bfloat16():
    offsets = np.full((1, PRIORS.shape[0], 4), 1e4, np.float32)
    out = np.asarray(box_coder.decode(offsets.astype("bfloat16"), PRIORS))
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    w = out[0, :, 2] - out[0, :, 0]
    np.testing.assert_allclose(w, PRIORS[:, 2] * 1000 / 16, rtol=1e-3)
    assert math.isclose(box_coder.BBOX_XFORM_CLIP, math.log(62.5))


def test_batched_offsets_broadcast_over_priors():
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, 2 * PRIORS.shape[0]).reshape(2, -1, 4)
    batched = np.asarray(box_coder.encode(boxes, PRIORS))
    single = np.asarray(box_coder.encode(boxes[1], PRIORS))
    np.testing.assert_allclose(batched[1], single, rtol=1e-5, atol=1e-5)
