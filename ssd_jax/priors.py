"""Default boxes (priors), SSD paper section 2.2 "Choosing scales and aspect ratios".

For feature map k of size f_k with step s_k (pixels) on an image of side S, the prior centres are
((j + offset) * step_k / S, (i + offset) * step_k / S). At each location the boxes are, in this order:
  1. aspect 1, side min_k / S;
  2. aspect 1, side sqrt(min_k * max_k) / S (the paper's s'_k);
  3. for each ratio r: (w, h) = (min_k sqrt(r), min_k / sqrt(r)) / S, then the transposed box (1/r).
Locations are row-major (y, then x) and maps come largest first: the Caffe and torchvision order, so a
head's NHWC output [B,H,W,A*K] reshapes to [B,H*W*A,K].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np

ClipMode = Literal["none", "wh", "corners"]


@dataclasses.dataclass(frozen=True)
class PriorSpec:
    """Everything that defines a set of priors.

    Attributes:
      image_size: input side in pixels (square inputs).
      feature_map_sizes: side of each source feature map, largest first.
      steps: pixel stride of each map (centre spacing); the paper's 8, 16, 32, 64, 100, 300.
      min_sizes: per map, the side in pixels of the small aspect-1 box (s_k * image_size).
      max_sizes: per map, used for the extra aspect-1 box of side sqrt(min_k * max_k).
      aspect_ratios: per map, the ratios r > 1; each adds the boxes r and 1/r.
      offset: centre offset within a cell (0.5).
      clip: "none" (paper), "wh" (torchvision: clamp w, h to [0, 1] in center form), or
        "corners" (Caffe's clip=true: clip corners to the image, then back to center form).
    """

    image_size: int
    feature_map_sizes: tuple[int, ...]
    steps: tuple[float, ...]
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    offset: float = 0.5
    clip: ClipMode = "none"

    def __post_init__(self):
        n = len(self.feature_map_sizes)
        for name in ("steps", "min_sizes", "max_sizes", "aspect_ratios"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"PriorSpec.{name} has {len(getattr(self, name))} entries but there are "
                    f"{n} feature maps"
                )
        if self.clip not in ("none", "wh", "corners"):
            raise ValueError(f"PriorSpec.clip must be 'none', 'wh' or 'corners', got {self.clip!r}")
        for k, ratios in enumerate(self.aspect_ratios):
            if any(r <= 0 for r in ratios):
                raise ValueError(f"PriorSpec.aspect_ratios[{k}] must be positive, got {ratios}")

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """Number of priors at each location of each map: 2 + 2 * len(ratios)."""
        return tuple(2 + 2 * len(r) for r in self.aspect_ratios)

    @property
    def num_priors(self) -> int:
        return sum(f * f * a for f, a in zip(self.feature_map_sizes, self.boxes_per_location))


def _location_sizes(spec: PriorSpec, k: int) -> np.ndarray:
    """[A, 2] (w, h) of the priors at one location of map k, normalized."""
    s = spec.min_sizes[k] / spec.image_size
    s_prime = math.sqrt(spec.min_sizes[k] * spec.max_sizes[k]) / spec.image_size
    wh = [(s, s), (s_prime, s_prime)]
    for r in spec.aspect_ratios[k]:
        sr = math.sqrt(r)
        wh += [(s * sr, s / sr), (s / sr, s * sr)]
    return np.asarray(wh, dtype=np.float64)


def generate_priors(spec: PriorSpec) -> np.ndarray:
    """All priors of `spec` as float32 [P, 4] in normalized center form (cx, cy, w, h).

    Returned as a numpy constant: priors are static, so jitted code closes over them.
    """
    out = []
    for k, f in enumerate(spec.feature_map_sizes):
        centers = (np.arange(f, dtype=np.float64) + spec.offset) * spec.steps[k] / spec.image_size
        cy, cx = np.meshgrid(centers, centers, indexing="ij")  # row-major: y, then x
        wh = _location_sizes(spec, k)
        if spec.clip == "wh":
            wh = np.clip(wh, 0.0, 1.0)
        a = wh.shape[0]
        xy = np.stack([cx.reshape(-1), cy.reshape(-1)], axis=-1)  # [f*f, 2]
        boxes = np.concatenate(
            [np.repeat(xy, a, axis=0), np.tile(wh, (f * f, 1))], axis=-1
        )  # [f*f*A, 4]
        out.append(boxes)
    priors = np.concatenate(out, axis=0)
    if spec.clip == "corners":
        lo = np.clip(priors[:, :2] - priors[:, 2:] / 2, 0.0, 1.0)
        hi = np.clip(priors[:, :2] + priors[:, 2:] / 2, 0.0, 1.0)
        priors = np.concatenate([(lo + hi) / 2, hi - lo], axis=-1)
    return priors.astype(np.float32)


_VOC_RATIOS_300 = ((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0,), (2.0,))

#: The paper's SSD300 for VOC (Caffe ssd_pascal.py): 8732 priors, no clipping.
SSD300_VOC = PriorSpec(
    image_size=300,
    feature_map_sizes=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    min_sizes=(30, 60, 111, 162, 213, 264),
    max_sizes=(60, 111, 162, 213, 264, 315),
    aspect_ratios=_VOC_RATIOS_300,
)

#: The paper's SSD512 for VOC (Caffe ssd_pascal_512.py): 7 maps, 24564 priors.
SSD512_VOC = PriorSpec(
    image_size=512,
    feature_map_sizes=(64, 32, 16, 8, 4, 2, 1),
    steps=(8, 16, 32, 64, 128, 256, 512),
    min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
    max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6),
    aspect_ratios=((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0, 3.0), (2.0,), (2.0,)),
)

#: The paper's SSD300 for COCO (Caffe ssd_coco.py): smaller scales 0.07..0.87 (and 1.05), no clipping.
SSD300_COCO = PriorSpec(
    image_size=300,
    feature_map_sizes=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    min_sizes=(21, 45, 99, 153, 207, 261),
    max_sizes=(45, 99, 153, 207, 261, 315),
    aspect_ratios=_VOC_RATIOS_300,
)

#: The paper's SSD512 for COCO (Caffe ssd_coco.py at 512 px: min_ratio 10, max_ratio 90, step 16,
#: conv4_3 at 4% and 10%): min_sizes 20.48..460.8 px, max_sizes 51.2..542.72, no clipping.
SSD512_COCO = PriorSpec(
    image_size=512,
    feature_map_sizes=SSD512_VOC.feature_map_sizes,
    steps=SSD512_VOC.steps,
    min_sizes=tuple(512 * r / 100 for r in (4, 10, 26, 42, 58, 74, 90)),
    max_sizes=tuple(512 * r / 100 for r in (10, 26, 42, 58, 74, 90, 106)),
    aspect_ratios=SSD512_VOC.aspect_ratios,
)

_TV_SCALES = (0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05)

#: torchvision's ssd300_vgg16 DefaultBoxGenerator: COCO scales, w and h clamped to [0, 1].
SSD300_TORCHVISION = PriorSpec(
    image_size=300,
    feature_map_sizes=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    min_sizes=tuple(s * 300 for s in _TV_SCALES[:-1]),
    max_sizes=tuple(s * 300 for s in _TV_SCALES[1:]),
    aspect_ratios=_VOC_RATIOS_300,
    clip="wh",
)

_LITE_SCALES = (0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0)

#: torchvision's ssdlite320_mobilenet_v3_large: DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2,
#: max_ratio=0.95) at 320 px: scales 0.2..0.95 in 6 steps (and 1.0 for the last s'_k), centres
#: (j + 0.5) / f_k (steps=None: 320 / f_k px), w and h clamped to [0, 1]; 3234 priors.
SSDLITE320 = PriorSpec(
    image_size=320,
    feature_map_sizes=(20, 10, 5, 3, 2, 1),
    steps=tuple(320 / f for f in (20, 10, 5, 3, 2, 1)),
    min_sizes=tuple(s * 320 for s in _LITE_SCALES[:-1]),
    max_sizes=tuple(s * 320 for s in _LITE_SCALES[1:]),
    aspect_ratios=((2.0, 3.0),) * 6,
    clip="wh",
)

#: NVIDIA DeepLearningExamples' SSD300 (ResNet-50): the COCO scales 21, 45, 99, 153, 207, 261, 315
#: px with w and h clamped to [0, 1]: the same boxes as torchvision's SSD300 (8732 priors).
SSD300_RESNET50 = SSD300_TORCHVISION

_COMPACT_SCALES = (0.06, 0.16, 0.34, 0.52, 0.70, 0.88)

#: Priors of the compact model: 128 px, 5 maps (strides 8..128); the smallest prior side is 6% of
#: the image, so objects from ~5% to ~70% of the image side each have a well-overlapping prior.
COMPACT_PRIORS = PriorSpec(
    image_size=128,
    feature_map_sizes=(16, 8, 4, 2, 1),
    steps=(8, 16, 32, 64, 128),
    min_sizes=tuple(s * 128 for s in _COMPACT_SCALES[:-1]),
    max_sizes=tuple(s * 128 for s in _COMPACT_SCALES[1:]),
    aspect_ratios=((2.0,), (2.0, 3.0), (2.0, 3.0), (2.0,), (2.0,)),
)

#: Priors of the compact model with a sixth, stride-4 source map (32x32, two aspect-1 boxes of
#: 4% and 5.7% of the image): objects of 5-8% of the image side get priors whose centres are at
#: most 1.6% of the image away (a stride-8 grid leaves 38% of them without a prior at IoU 0.5).
COMPACT6_PRIORS = PriorSpec(
    image_size=128,
    feature_map_sizes=(32, 16, 8, 4, 2, 1),
    steps=(4, 8, 16, 32, 64, 128),
    min_sizes=tuple(s * 128 for s in (0.04, 0.08) + _COMPACT_SCALES[1:-1]),
    max_sizes=tuple(s * 128 for s in (0.08,) + _COMPACT_SCALES[1:]),
    aspect_ratios=((),) + COMPACT_PRIORS.aspect_ratios,
)


#: Every preset by name: what `config.model.prior_spec` may hold (`prior_spec_by_name`).
PRIOR_SPECS: dict[str, PriorSpec] = {
    "ssd300_voc": SSD300_VOC,
    "ssd512_voc": SSD512_VOC,
    "ssd300_coco": SSD300_COCO,
    "ssd512_coco": SSD512_COCO,
    "ssd300_torchvision": SSD300_TORCHVISION,
    "ssdlite320": SSDLITE320,
    "ssd300_resnet50": SSD300_RESNET50,
    "compact": COMPACT_PRIORS,
    "compact6": COMPACT6_PRIORS,
}


def prior_spec_by_name(name: str) -> PriorSpec:
    """The preset registered as `name` in PRIOR_SPECS; ValueError naming the valid ones."""
    if name not in PRIOR_SPECS:
        raise ValueError(f"unknown prior spec {name!r}; valid names: {', '.join(PRIOR_SPECS)}")
    return PRIOR_SPECS[name]
