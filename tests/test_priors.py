import math

import numpy as np
import pytest
import torch
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

from ssd_jax import priors


def test_prior_counts():
    assert priors.generate_priors(priors.SSD300_VOC).shape == (8732, 4)
    assert priors.generate_priors(priors.SSD512_VOC).shape == (24564, 4)
    assert priors.generate_priors(priors.SSD300_COCO).shape == (8732, 4)
    assert priors.SSD300_VOC.num_priors == 8732
    assert priors.SSD512_VOC.num_priors == 24564
    assert priors.SSD300_VOC.boxes_per_location == (4, 6, 6, 6, 4, 4)
    assert priors.generate_priors(priors.SSD300_VOC).dtype == np.float32


def _paper_prior(k_offset: int, f: int, step: float, smin: float, smax: float, ratios, i, j, a):
    """The prior of the paper's formula at map with offset k_offset, location (i, j), box a."""
    cx, cy = (j + 0.5) * step / 300, (i + 0.5) * step / 300
    sizes = [(smin, smin), (math.sqrt(smin * smax),) * 2]
    for r in ratios:
        sizes += [(smin * math.sqrt(r), smin / math.sqrt(r)), (smin / math.sqrt(r), smin * math.sqrt(r))]
    w, h = sizes[a]
    index = k_offset + (i * f + j) * len(sizes) + a
    return index, np.array([cx, cy, w / 300, h / 300])


@pytest.mark.parametrize(
    "k,i,j,a",
    [(0, 0, 0, 0), (0, 5, 17, 3), (0, 37, 37, 1), (1, 3, 11, 4), (2, 9, 0, 5), (4, 2, 1, 2), (5, 0, 0, 3)],
)
def test_priors_follow_paper_formula(k, i, j, a):
    spec = priors.SSD300_VOC
    p = priors.generate_priors(spec)
    offset = sum(f * f * n for f, n in zip(spec.feature_map_sizes[:k], spec.boxes_per_location[:k]))
    idx, expected = _paper_prior(offset, spec.feature_map_sizes[k], spec.steps[k], spec.min_sizes[k],
                                 spec.max_sizes[k], spec.aspect_ratios[k], i, j, a)
    np.testing.assert_allclose(p[idx], expected, atol=1e-6)


def test_torchvision_spec_equals_default_box_generator():
    gen = DefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    )  # exactly torchvision's ssd300_vgg16 generator
    grid = [[f, f] for f in priors.SSD300_TORCHVISION.feature_map_sizes]
    ref = gen._grid_default_boxes(grid, [300, 300], dtype=torch.float32).numpy()  # cx, cy, w, h
    ours = priors.generate_priors(priors.SSD300_TORCHVISION)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    # torchvision clamps w, h (the last map's sqrt(0.87 * 1.05) > ... stays <= 1), not corners
    assert ours[:, 2:].max() <= 1.0
    assert (ours[:, :2] - ours[:, 2:] / 2).min() < 0.0


def test_voc_spec_does_not_clip():
    p = priors.generate_priors(priors.SSD300_VOC)
    assert p[:, 2:].max() > 1.0  # e.g. the last map's sqrt(264 * 315) / 300 and ratio-2 boxes


def test_corner_clip_mode_keeps_boxes_inside():
    spec = priors.PriorSpec(300, (3,), (100,), (150,), (250,), ((2.0,),), clip="corners")
    p = priors.generate_priors(spec)
    lo, hi = p[:, :2] - p[:, 2:] / 2, p[:, :2] + p[:, 2:] / 2
    assert lo.min() >= -1e-6 and hi.max() <= 1 + 1e-6


def test_bad_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="steps"):
        priors.PriorSpec(300, (38, 19), (8,), (30, 60), (60, 111), ((2,), (2,)))
    with pytest.raises(ValueError, match="clip"):
        priors.PriorSpec(300, (38,), (8,), (30,), (60,), ((2,),), clip="yes")  # type: ignore[arg-type]


def _caffe_sizes(min_dim: int, num_maps: int, min_ratio: int, max_ratio: int,
                 first: tuple[int, int]) -> tuple[list[float], list[float]]:
    """min_sizes, max_sizes as Caffe's ssd_pascal.py / ssd_coco.py compute them (in percent)."""
    step = int(math.floor((max_ratio - min_ratio) / (num_maps - 2)))
    mins, maxs = [], []
    for ratio in range(min_ratio, max_ratio + 1, step):
        mins.append(min_dim * ratio / 100.0)
        maxs.append(min_dim * (ratio + step) / 100.0)
    return [min_dim * first[0] / 100.0] + mins, [min_dim * first[1] / 100.0] + maxs


@pytest.mark.parametrize("spec,args", [
    (priors.SSD300_VOC, (300, 6, 20, 90, (10, 20))),   # ssd_pascal.py
    (priors.SSD512_VOC, (512, 7, 15, 90, (7, 15))),    # ssd_pascal_512.py
    (priors.SSD300_COCO, (300, 6, 15, 90, (7, 15))),   # ssd_coco.py
    (priors.SSD512_COCO, (512, 7, 10, 90, (4, 10))),   # ssd_coco.py at 512 px
])
def test_paper_specs_have_the_caffe_scripts_sizes(spec, args):
    mins, maxs = _caffe_sizes(*args)
    np.testing.assert_allclose(spec.min_sizes, mins, rtol=1e-9)
    np.testing.assert_allclose(spec.max_sizes, maxs, rtol=1e-9)
    assert spec.clip == "none"  # the scripts' clip = False


def test_ssd512_coco_priors_follow_the_prior_box_formula():
    """Every SSD512-COCO prior against Caffe's PriorBox formula written out here (centres
    (j + 0.5) * step, boxes min, sqrt(min * max), then each ratio and its inverse)."""
    spec = priors.SSD512_COCO
    ref = []
    for f, step, smin, smax, ratios in zip(spec.feature_map_sizes, spec.steps, spec.min_sizes,
                                           spec.max_sizes, spec.aspect_ratios):
        for i in range(f):
            for j in range(f):
                cx, cy = (j + 0.5) * step / 512, (i + 0.5) * step / 512
                sizes = [(smin, smin), (math.sqrt(smin * smax),) * 2]
                for r in ratios:
                    sizes += [(smin * math.sqrt(r), smin / math.sqrt(r)),
                              (smin / math.sqrt(r), smin * math.sqrt(r))]
                ref += [(cx, cy, w / 512, h / 512) for w, h in sizes]
    np.testing.assert_allclose(priors.generate_priors(spec), np.asarray(ref), atol=1e-6)
    assert len(ref) == 24564


def test_prior_specs_by_name():
    assert priors.prior_spec_by_name("ssd512_coco") is priors.SSD512_COCO
    with pytest.raises(ValueError, match="unknown prior spec 'ssd300'; valid names: ssd300_voc"):
        priors.prior_spec_by_name("ssd300")
