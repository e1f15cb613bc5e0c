"""Suite `core`: jitted match_batch + multibox_loss (value and gradient) against torchvision's
SSDMatcher + SSD.compute_loss (+ backward) on the same inputs: SSD300 priors, ~10 boxes/image."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import flags

from experiments.benchmarks.common import Row, interleaved, time_jax, time_torch
from ssd_jax import box_ops, loss, matching, priors


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("core_batch", 32, "core suite: batch (--quick: 4).", lower_bound=1,
                         flag_values=fv)


def _inputs(batch: int, num_classes: int = 21, max_boxes: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    num_priors = priors.SSD300_VOC.num_priors
    boxes = np.zeros((batch, max_boxes, 4), np.float32)
    labels = np.zeros((batch, max_boxes), np.int32)
    counts = rng.integers(6, 15, size=batch)  # ~10 ground-truth boxes per image
    for i, n in enumerate(counts):
        wh = rng.uniform(0.05, 0.6, (n, 2))
        lo = rng.uniform(0, 1, (n, 2)) * (1 - wh)
        boxes[i, :n] = np.concatenate([lo, lo + wh], 1)
        labels[i, :n] = rng.integers(1, num_classes, n)
    logits = rng.normal(0, 1, (batch, num_priors, num_classes)).astype(np.float32)
    preds = rng.normal(0, 1, (batch, num_priors, 4)).astype(np.float32)
    return boxes, labels, counts, logits, preds


def run(args: Any) -> list[Row]:
    batch = 4 if args.quick else getattr(args, "core_batch", 32)
    # each side runs `rounds` blocks of `min_time` seconds, taking turns (`interleaved`)
    min_time, rounds = (0.3, 1) if args.quick else (0.5, 7)
    boxes, labels, counts, logits, preds = _inputs(batch)
    pri = priors.generate_priors(priors.SSD300_VOC)

    @jax.jit
    def step(logits, preds, boxes, labels):
        cls_t, box_t = matching.match_batch(boxes, labels, pri)
        fn = lambda lg, pr: loss.multibox_loss(lg, pr, cls_t, box_t)[0]
        return jax.value_and_grad(fn, argnums=(0, 1))(logits, preds)

    args_dev = jax.device_put((logits, preds, boxes, labels))
    ours = lambda: time_jax(lambda: step(*args_dev), min_time=min_time)
    peer = _torchvision_timer(boxes, labels, counts, logits, preds, pri, min_time) \
        if getattr(args, "peer", True) else None
    sec, peer_sec = interleaved([ours, peer], rounds)
    note = f"median of {rounds} interleaved rounds" if rounds > 1 else ""
    return [Row(f"match + multibox_loss value&grad, SSD300 priors, batch {batch}", batch / sec,
                None if peer_sec is None else batch / peer_sec, note=note)]


def _torchvision_timer(boxes, labels, counts, logits, preds, pri, min_time
                      ) -> Callable[[], float]:
    """A zero-argument timer: seconds per call of torchvision's matching + loss + backward."""
    import torch
    from torchvision.models.detection._utils import BoxCoder, SSDMatcher
    from torchvision.models.detection.ssd import SSD
    from torchvision.ops import box_iou

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    anchors = torch.from_numpy(np.array(box_ops.centers_to_corners(pri))).to(dev)
    ssd = types.SimpleNamespace(box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)), neg_to_pos_ratio=3)
    matcher = SSDMatcher(0.5)
    targets = [{"boxes": torch.from_numpy(boxes[i, :n]).to(dev),
                "labels": torch.from_numpy(labels[i, :n].astype(np.int64)).to(dev)}
               for i, n in enumerate(counts)]
    lg = torch.from_numpy(logits).to(dev).requires_grad_(True)
    pr = torch.from_numpy(preds).to(dev).requires_grad_(True)

    def fn():
        matched = [matcher(box_iou(t["boxes"], anchors)) for t in targets]
        out = SSD.compute_loss(ssd, targets, {"cls_logits": lg, "bbox_regression": pr},
                               [anchors] * len(targets), matched)
        total = out["classification"] + out["bbox_regression"]
        lg.grad = pr.grad = None
        total.backward()

    return lambda: time_torch(fn, min_time=min_time)
