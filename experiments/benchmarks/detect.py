"""Suite `detect`: jitted postprocess.detect against torchvision's SSD.postprocess_detections.

SSD300-shaped head outputs (8732 priors; 21 VOC or 91 torchvision-COCO classes) at batch 1 and 32,
shaped like a trained model's: background wins at almost every prior, a few hundred candidate
priors per image score above the 0.01 threshold, in clusters that NMS has to thin out. A `dense`
row (random logits: every class of every prior above the threshold, so top-400 per class, a full
NMS and the final cut of 200 all bind) is the worst case of an untrained model.
Imports only jax/numpy (torch lazily, for the peer).
"""

from __future__ import annotations

import types
from typing import Any

import jax
import numpy as np
from absl import flags

from experiments.benchmarks.common import Row, time_jax, time_torch
from ssd_jax import box_ops, postprocess, priors


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("detect_batch", 32, "detect suite: the large batch (batch 1 runs too; "
                         "--quick: 4).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("detect_candidates", 300, "detect suite: priors per image above the "
                         "score threshold (trained-like outputs).", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("detect_tile", 32, "detect suite: NMS tile size of detect().",
                         lower_bound=1, flag_values=fv)


def trained_like_outputs(batch: int, num_classes: int, num_candidates: int, pri: np.ndarray,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(logits [B,P,C], offsets [B,P,4]): background dominant except `num_candidates` priors/image.

    Candidates are the priors near a few object centres (so they overlap and NMS suppresses),
    each with one or two foreground classes at softmax scores from ~0.005 to ~0.98.
    """
    rng = np.random.default_rng(seed)
    num_priors = pri.shape[0]
    logits = rng.normal(0.0, 1.0, (batch, num_priors, num_classes)).astype(np.float32)
    logits[..., 0] += 10.0 + np.log(num_classes / 21.0)  # foreground scores ~5e-5 elsewhere
    offsets = rng.normal(0.0, 0.3, (batch, num_priors, 4)).astype(np.float32)
    for b in range(batch):
        objects = rng.uniform(0.1, 0.9, (max(1, num_candidates // 30), 2))
        obj_class = rng.integers(1, num_classes, objects.shape[0])
        dist = np.linalg.norm(pri[None, :, :2] - objects[:, None], axis=-1)  # [O, P]
        nearest = np.argmin(dist, axis=0)
        idx = np.argsort(np.min(dist, axis=0))[:num_candidates]  # priors closest to an object
        cls = obj_class[nearest[idx]]
        logits[b, idx, cls] = logits[b, idx, 0] + rng.uniform(-5.0, 4.0, idx.size)
        confused = idx[rng.uniform(size=idx.size) < 0.3]
        logits[b, confused, rng.integers(1, num_classes, confused.size)] = (
            logits[b, confused, 0] + rng.uniform(-5.0, 1.0, confused.size))
    return logits, offsets


def dense_outputs(batch: int, num_classes: int, num_priors: int, seed: int = 0):
    """Random logits: the worst case (every candidate above threshold)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (batch, num_priors, num_classes)).astype(np.float32),
            rng.normal(0, 0.5, (batch, num_priors, 4)).astype(np.float32))


def run(args: Any) -> list[Row]:
    pri = priors.generate_priors(priors.SSD300_VOC)
    min_time = 0.3 if args.quick else 1.5
    big = 4 if args.quick else getattr(args, "detect_batch", 32)
    candidates = getattr(args, "detect_candidates", 300)
    tile = getattr(args, "detect_tile", 32)
    cases = [(c, b, "trained-like") for c in (21, 91) for b in (1, big)]
    cases += [(21, 1, "dense")] if args.quick else [(21, 1, "dense"), (21, 8, "dense")]

    fn = jax.jit(lambda lg, off: postprocess.detect(lg, off, pri, nms_tile_size=tile))
    rows = []
    for num_classes, batch, kind in cases:
        if kind == "dense":
            logits, offsets = dense_outputs(batch, num_classes, pri.shape[0])
        else:
            logits, offsets = trained_like_outputs(batch, num_classes, candidates, pri)
        dev_args = jax.device_put((logits, offsets))
        out = jax.device_get(fn(*dev_args))
        sec = time_jax(lambda dev_args=dev_args: fn(*dev_args), min_time=min_time)
        peer = None
        if getattr(args, "peer", True):
            peer = batch / _torchvision_time(logits, offsets, pri, min_time)
        note = f"{np.mean(out.num_detections):.0f} dets/img, tile {tile}"
        rows.append(Row(f"detect {kind}, 8732 priors, {num_classes} classes, batch {batch}",
                        batch / sec, peer, note=note))
    return rows


def _torchvision_time(logits: np.ndarray, offsets: np.ndarray, pri: np.ndarray,
                      min_time: float) -> float:
    import torch
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.ssd import SSD

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    anchors = torch.from_numpy(np.asarray(box_ops.centers_to_corners(pri)) * 300.0).to(dev)
    ssd = types.SimpleNamespace(box_coder=BoxCoder((10.0, 10.0, 5.0, 5.0)), score_thresh=0.01,
                                topk_candidates=400, nms_thresh=0.45, detections_per_img=200)
    head = {"cls_logits": torch.from_numpy(logits).to(dev),
            "bbox_regression": torch.from_numpy(offsets).to(dev)}
    batch = logits.shape[0]

    def fn():
        with torch.no_grad():
            return SSD.postprocess_detections(ssd, head, [anchors] * batch, [(300, 300)] * batch)

    return time_torch(fn, min_time=min_time)
