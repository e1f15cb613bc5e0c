"""Detection metrics on the host: PASCAL VOC AP (2007 11-point and 2010+ area) and COCO AP.

Inputs are per-image dicts of numpy arrays, boxes in normalized corner form (xmin, ymin, xmax, ymax):

  ground truth: ``boxes`` [N,4], ``labels`` [N] (1..C-1), optional ``difficult`` [N] bool,
                optional ``iscrowd`` [N] bool, ``size`` (height, width) in pixels;
  detections:   ``boxes`` [D,4], ``scores`` [D], ``labels`` [D].

`DetectionEvaluator` accumulates them from padded batches (`postprocess.Detections` plus the
input batch); `Evaluator` runs a predict function over the eval batches into one and returns the
metrics: the one evaluation of the training loop and of experiments/evaluate.py.

Over 500 lines on purpose: the VOC and COCO metrics and the Evaluator that gathers them across
hosts are one concept; the metric functions are each short.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ssd_jax.distributed import host_local

Record = Mapping[str, Any]

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: config.metric: VOC07 11-point mAP (the paper's), VOC2010+ area mAP, COCO AP@[.5:.95]
METRICS = ("voc07", "voc", "coco")


def headline(metric: str) -> str:
    """The result key a metric is reported by: "AP" (COCO's AP@[.5:.95]) or "mAP" (VOC)."""
    return "AP" if metric == "coco" else "mAP"


# ----------------------------------------------------------------------------------------- VOC


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """AP from a precision/recall curve, as the VOC devkit.

    VOC2007: mean over t in 0, 0.1, ..., 1 of the best precision at recall >= t (0 if none),
    with t = np.arange(0, 1.1, 0.1) as voc_eval.py. VOC2010+: area under the precision envelope
    (precision made monotonically non-increasing), summed where recall changes.
    """
    recall = np.asarray(recall, np.float64)
    precision = np.asarray(precision, np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            above = recall >= t
            ap += (np.max(precision[above]) if np.any(above) else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _to_pixels(boxes: Any, size: Sequence[int]) -> np.ndarray:
    """Normalized corner boxes [N,4] -> pixel corner boxes [N,4] (float64) for an image (h, w)."""
    h, w = float(size[0]), float(size[1])
    return np.asarray(boxes, np.float64).reshape(-1, 4) * np.array([w, h, w, h])


def _voc_class_curve(
    ground_truths: Sequence[Record],
    detections: Sequence[Record],
    cls: int,
    iou_threshold: float,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Cumulative recall and precision of one class over all images (VOCevaldet), and #non-difficult."""
    gt_boxes, gt_difficult, gt_used = [], [], []
    npos = 0
    det_img, det_scores, det_boxes = [], [], []
    for i, (gt, det) in enumerate(zip(ground_truths, detections, strict=True)):
        labels = np.asarray(gt["labels"]).reshape(-1)
        sel = labels == cls
        gt_boxes.append(_to_pixels(gt["boxes"], gt["size"])[sel])
        difficult = np.asarray(gt.get("difficult", np.zeros(labels.shape, bool)), bool).reshape(-1)
        gt_difficult.append(difficult[sel])
        gt_used.append(np.zeros(int(sel.sum()), bool))
        npos += int(np.sum(~difficult[sel]))
        dsel = np.asarray(det["labels"]).reshape(-1) == cls
        det_boxes.append(_to_pixels(det["boxes"], gt["size"])[dsel])
        det_scores.append(np.asarray(det["scores"], np.float64).reshape(-1)[dsel])
        det_img.append(np.full(int(dsel.sum()), i))
    scores = np.concatenate(det_scores) if det_scores else np.zeros(0)
    images = np.concatenate(det_img) if det_img else np.zeros(0, int)
    boxes = np.concatenate(det_boxes) if det_boxes else np.zeros((0, 4))
    order = np.argsort(-scores, kind="stable")  # MATLAB's sort(-confidence) is stable
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for d, j in enumerate(order):
        img = images[j]
        bb = boxes[j]
        gts = gt_boxes[img]
        ovmax = -np.inf
        if len(gts):
            # the devkit's +1 pixel convention for widths, heights and intersections
            iw = np.maximum(np.minimum(gts[:, 2], bb[2]) - np.maximum(gts[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gts[:, 3], bb[3]) - np.maximum(gts[:, 1], bb[1]) + 1.0, 0.0)
            inter = iw * ih
            union = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                     + (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0) - inter)
            overlaps = inter / union
            jmax = int(np.argmax(overlaps))
            ovmax = overlaps[jmax]
        if ovmax >= iou_threshold:
            if not gt_difficult[img][jmax]:
                if not gt_used[img][jmax]:
                    tp[d] = 1.0
                    gt_used[img][jmax] = True
                else:
                    fp[d] = 1.0  # duplicate detection
            # a match with a difficult object is neither a TP nor an FP
        else:
            fp[d] = 1.0
    tp = np.cumsum(tp)
    fp = np.cumsum(fp)
    recall = tp / npos if npos > 0 else np.full_like(tp, np.nan)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return recall, precision, npos


def evaluate_voc(
    ground_truths: Sequence[Record],
    detections: Sequence[Record],
    num_classes: int,
    use_07_metric: bool = True,
    iou_threshold: float = 0.5,
    return_curves: bool = False,
) -> dict[str, Any]:
    """PASCAL VOC detection AP per class and mAP, as the official devkit (VOCevaldet.m).

    Per class, detections of all images are ranked by descending score (stable order for ties)
    and greedily assigned: the ground truth of highest IoU in the same image is a match when
    IoU >= iou_threshold (the devkit's `ovmax >= minoverlap`); a match with a `difficult` object is
    neither TP nor FP, a second match with the same object is an FP (duplicate), no match is an FP.
    Boxes are scaled to pixels with each image's (height, width) and use the devkit's legacy +1
    convention for widths, heights and intersections (as detectron2 and mmdetection do for VOC).

    Args:
      ground_truths, detections: one dict per image each, in the same order (module docstring).
      num_classes: C, counting background (VOC: 21); classes 1..C-1 are evaluated.
      use_07_metric: VOC2007 11-point AP if True, else VOC2010+ area under the PR envelope.
      iou_threshold: the devkit's 0.5.
      return_curves: also return per-class "precision" and "recall" arrays (cumulative over the
        ranked detections; None for a class without non-difficult ground truth).

    Returns:
      {"mAP": float, "AP": [AP of class 1, ..., AP of class C-1]}. A class without any
      non-difficult ground truth has AP nan and is excluded from mAP (nan if no class has any).
    """
    if len(ground_truths) != len(detections):
        raise ValueError(f"{len(ground_truths)} ground truths but {len(detections)} detections")
    aps, precisions, recalls = [], [], []
    for cls in range(1, num_classes):
        recall, precision, npos = _voc_class_curve(ground_truths, detections, cls, iou_threshold)
        if npos == 0:
            aps.append(float("nan"))
            precisions.append(None)
            recalls.append(None)
            continue
        aps.append(voc_ap(recall, precision, use_07_metric))
        precisions.append(precision)
        recalls.append(recall)
    valid = [a for a in aps if not np.isnan(a)]
    out: dict[str, Any] = {"mAP": float(np.mean(valid)) if valid else float("nan"), "AP": aps}
    if return_curves:
        out["precision"] = precisions
        out["recall"] = recalls
    return out


# ---------------------------------------------------------------------------------------- COCO


def _xywh(boxes: Any, size: Sequence[int]) -> np.ndarray:
    b = _to_pixels(boxes, size)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def coco_ground_truth_dataset(
    ground_truths: Sequence[Record], image_sizes: Sequence[Sequence[int]] | None = None
) -> dict[str, Any]:
    """The COCO-format ground-truth dict (images, annotations, categories); image ids are 1..N.

    Boxes become pixel [x, y, w, h]; `area` is the box area in pixels (it decides small/medium/
    large); `iscrowd` ground truth is an ignore region for COCOeval. Categories are the labels seen.
    """
    images, annotations, categories = [], [], set()
    for i, gt in enumerate(ground_truths):
        size = image_sizes[i] if image_sizes is not None else gt["size"]
        h, w = int(size[0]), int(size[1])
        images.append({"id": i + 1, "height": h, "width": w})
        labels = np.asarray(gt["labels"]).reshape(-1)
        crowd = np.asarray(gt.get("iscrowd", np.zeros(labels.shape, bool)), bool).reshape(-1)
        for box, label, c in zip(_xywh(gt["boxes"], (h, w)), labels, crowd, strict=True):
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label),
                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                "iscrowd": int(c)})
            categories.add(int(label))
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": str(c)} for c in sorted(categories)]}


def coco_results(
    detections: Sequence[Record], image_sizes: Sequence[Sequence[int]]
) -> list[dict[str, Any]]:
    """Detections as a COCO results list: {image_id (1..N), category_id, bbox pixel xywh, score}."""
    results = []
    for i, (det, size) in enumerate(zip(detections, image_sizes, strict=True)):
        boxes = _xywh(det["boxes"], size)
        scores = np.asarray(det["scores"]).reshape(-1)
        labels = np.asarray(det["labels"]).reshape(-1)
        for box, score, label in zip(boxes, scores, labels, strict=True):
            results.append({"image_id": i + 1, "category_id": int(label),
                            "bbox": [float(v) for v in box], "score": float(score)})
    return results


def evaluate_coco(
    ground_truths: Sequence[Record],
    detections: Sequence[Record],
    image_sizes: Sequence[Sequence[int]] | None = None,
) -> dict[str, float]:
    """COCO box AP through pycocotools' COCOeval (never re-implemented).

    Args:
      ground_truths, detections: one dict per image each (module docstring); boxes normalized.
      image_sizes: (height, width) in pixels per image; defaults to each ground truth's `size`.

    Returns:
      {"AP", "AP50", "AP75", "APs", "APm", "APl"} (COCOeval.stats[0:6], 100 detections per image;
      -1 where COCOeval has no ground truth to score, e.g. no small objects).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if image_sizes is None:
        image_sizes = [gt["size"] for gt in ground_truths]
    if len(ground_truths) != len(detections) or len(image_sizes) != len(detections):
        raise ValueError("ground_truths, detections and image_sizes must have one entry per image")
    gt_dataset = coco_ground_truth_dataset(ground_truths, image_sizes)
    results = coco_results(detections, image_sizes)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt_dataset
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes rejects an empty list
            coco_dt = COCO()
            coco_dt.dataset = {**gt_dataset, "annotations": []}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {name: float(v) for name, v in zip(COCO_METRICS, coco_eval.stats[:6], strict=True)}


def per_class_table(class_names: Sequence[str], aps: Sequence[float], num_gt: Sequence[int],
                    title: str = "AP") -> str:
    """A plain-text table: class, AP (or '-' without ground truth), #gt; then the mean."""
    width = max([len("class")] + [len(n) for n in class_names])
    col = max(8, len(title))
    lines = [f"{'class':<{width}}  {title:>{col}}  {'#gt':>6}", "-" * (width + col + 10)]
    for name, ap, n in zip(class_names, aps, num_gt):
        value = f"{ap:{col}.4f}" if not math.isnan(ap) else f"{'-':>{col}}"
        lines.append(f"{name:<{width}}  {value}  {n:6d}")
    valid = [a for a in aps if not math.isnan(a)]
    mean = f"{np.mean(valid):{col}.4f}" if valid else f"{'-':>{col}}"
    lines += ["-" * (width + col + 10), f"{'mean':<{width}}  {mean}  {sum(num_gt):6d}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the accumulator


class DetectionEvaluator:
    """Accumulates detections and ground truth over batches, then computes VOC or COCO metrics.

    Usage (training loop or experiments/evaluate.py)::

        evaluator = DetectionEvaluator(21, metric="voc07", class_names=VOC_CLASSES)
        for batch in eval_batches:
            evaluator.add_batch(detect_fn(params, batch["image"]), batch)
        metrics = evaluator.result()  # {"mAP": ..., "AP": [...], "AP/aeroplane": ..., ...}

    Metrics: "voc07" (11-point, the paper's), "voc" (VOC2010+ area) or "coco" (pycocotools).
    On several JAX processes, `result()` gathers every process's images with
    `multihost_utils.process_allgather` (a collective: call it on all processes) and EVERY
    process computes and returns the same dict. Images with an `image_id` seen before are skipped
    (e.g. examples repeated to fill the last batch); without ids every unmasked example counts.
    """

    def __init__(self, num_classes: int, metric: str = "voc07",
                 class_names: Sequence[str] | None = None):
        if metric not in METRICS:
            raise ValueError(f"metric must be 'voc07', 'voc' or 'coco', got {metric!r}")
        if class_names is not None and len(class_names) not in (num_classes, num_classes - 1):
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.metric = metric
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget every image added so far."""
        self.ground_truths: list[dict[str, np.ndarray]] = []
        self.detections: list[dict[str, np.ndarray]] = []
        self.image_ids: list[int | None] = []

    def __len__(self) -> int:
        return len(self.ground_truths)

    def add_batch(self, detections: Any, batch: Mapping[str, Any]) -> None:
        """Adds a batch of detections and its ground truth.

        Args:
          detections: `postprocess.Detections` ([B,K] padded rows past num_detections), or any
            object with the same fields (numpy or jax arrays).
          batch: `boxes` [B,M,4] normalized corners, `labels` [B,M] (0 = padding row),
            `image_size` int [B,2] (height, width: the metrics work in pixels, with the VOC
            devkit's +1), optional `difficult` [B,M] bool, `iscrowd` [B,M], `mask` bool [B]
            (False: a padding example, skipped), `image_id` [B].
        """
        missing = [k for k in ("boxes", "labels", "image_size") if k not in batch]
        if missing:
            raise ValueError(f"add_batch: the batch has no {', '.join(missing)} (needs boxes "
                             "[B,M,4], labels [B,M] and image_size [B,2] (height, width))")
        det_boxes = host_local(detections.boxes)
        det_scores = host_local(detections.scores)
        det_classes = host_local(detections.classes)
        num = host_local(detections.num_detections)
        boxes = host_local(batch["boxes"])
        labels = host_local(batch["labels"])
        sizes = host_local(batch["image_size"])
        b = labels.shape[0]
        difficult = host_local(batch["difficult"]) if "difficult" in batch else None
        iscrowd = host_local(batch["iscrowd"]) if "iscrowd" in batch else None
        mask = host_local(batch["mask"]).astype(bool) if "mask" in batch else np.ones(b, bool)
        ids = host_local(batch["image_id"]) if "image_id" in batch else None
        if det_scores.shape[0] != b:
            raise ValueError(f"detections have {det_scores.shape[0]} images, the batch {b}")
        for i in range(b):
            if not mask[i]:
                continue
            real = labels[i] > 0
            gt = {"boxes": boxes[i][real].astype(np.float32), "labels": labels[i][real].astype(
                np.int64), "size": tuple(int(s) for s in sizes[i][:2])}
            if difficult is not None:
                gt["difficult"] = difficult[i][real].astype(bool)
            if iscrowd is not None:
                gt["iscrowd"] = iscrowd[i][real].astype(bool)
            n = int(num[i])
            det = {"boxes": det_boxes[i, :n].astype(np.float32),
                   "scores": det_scores[i, :n].astype(np.float32),
                   "labels": det_classes[i, :n].astype(np.int64)}
            self._add(gt, det, None if ids is None else _scalar_id(ids[i]))

    def _add(self, gt: dict[str, Any], det: dict[str, Any], image_id: Any) -> None:
        self.ground_truths.append(gt)
        self.detections.append(det)
        self.image_ids.append(image_id)

    def records(self) -> tuple[list[dict], list[dict]]:
        """(ground truths, detections) of every image added on every process, one per image id.

        A collective on several processes (all of them must call it). Images added twice with
        the same id (the padded tail of a sharded dataset) count once; images without an id
        always count. These are the lists `result()` scores.
        """
        gts, dets, _ = self.records_with_ids()
        return gts, dets

    def records_with_ids(self) -> tuple[list[dict], list[dict], list[Any]]:
        """`records()` and the image id of each (None where the batch had none); a collective."""
        gts, dets, ids = self.ground_truths, self.detections, self.image_ids
        if jax.process_count() > 1:
            gts, dets, ids = _allgather_records(gts, dets, ids)
        seen: set[Any] = set()
        keep = []
        for i, image_id in enumerate(ids):
            if image_id is not None:
                if image_id in seen:
                    continue
                seen.add(image_id)
            keep.append(i)
        return [gts[i] for i in keep], [dets[i] for i in keep], [ids[i] for i in keep]

    def coco_results(self, category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Every detection as a COCO result in the dataset's ids: {"image_id" (the batch's id),
        "category_id" (`category_ids[label - 1]`, else the label), "bbox" pixel [x, y, w, h],
        "score"}; what `COCO(annotations).loadRes` takes. A collective on several processes."""
        gts, dets, ids = self.records_with_ids()
        results = []
        for gt, det, image_id in zip(gts, dets, ids, strict=True):
            boxes = _xywh(det["boxes"], gt["size"])
            for box, score, label in zip(boxes, det["scores"], det["labels"], strict=True):
                label = int(label)
                cat = int(category_ids[label - 1]) if category_ids else label
                results.append({"image_id": image_id, "category_id": cat,
                                "bbox": [float(v) for v in box], "score": float(score)})
        return results

    def result(self) -> dict[str, Any]:
        """The metrics of every image added (on all processes: a collective, same dict everywhere).

        VOC: {"mAP", "AP": [classes 1..C-1]}; COCO: {"AP", "AP50", "AP75", "APs", "APm", "APl"}.
        With class names, also "AP/<name>" per class (VOC) and "num_images".
        """
        gts, dets = self.records()
        if self.metric == "coco":
            out: dict[str, Any] = dict(evaluate_coco(gts, dets))
        else:
            out = evaluate_voc(gts, dets, self.num_classes, use_07_metric=self.metric == "voc07")
            if self.class_names is not None:
                names = self.class_names[-(self.num_classes - 1):]
                for name, ap in zip(names, out["AP"], strict=True):
                    out[f"AP/{name}"] = ap
        out["num_images"] = len(gts)
        return out


class Evaluator:
    """One pass of a model over evaluation batches -> metrics (big_vision's evaluator shape).

        evaluator = Evaluator(predict_fn, batches, num_classes=21, metric="voc07",
                              class_names=names)
        metrics = evaluator.run(variables)     # {"mAP": ..., "AP": [...], "num_images": ...}

    Used by the training loop (`ssd_jax.train.train_and_evaluate`) and by `experiments/evaluate.py`
    alike, so both report the same number for the same checkpoint.

    Args:
      predict_fn: (variables, batch) -> `postprocess.Detections` of the batch's images ([b, K]
        rows of this process, numpy or jax arrays); `batch` is one element of `batches`.
      batches: re-iterable dicts with "image", "boxes", "labels", "image_size", "mask", ... (the
        `pipeline.EvalIterator` contract); each `run` is one full pass.
      num_classes, metric, class_names: as `DetectionEvaluator`.
      num_draw: keep the first `num_draw` images with their detections in `self.samples`
        ("image", "boxes", "labels", "scores"), for pictures.
      progress: a tqdm bar on stderr (process 0 only).

    After `run`: `self.accumulator` holds every image (its `records()`, `coco_results()`).
    """

    def __init__(self, predict_fn: Any, batches: Any, *, num_classes: int, metric: str = "voc07",
                 class_names: Sequence[str] | None = None, num_draw: int = 0,
                 progress: bool = False):
        self.predict_fn = predict_fn
        self.batches = batches
        self.num_draw = int(num_draw)
        self.progress = progress
        self.accumulator = DetectionEvaluator(num_classes, metric=metric, class_names=class_names)
        self.samples: dict[str, np.ndarray] | None = None

    def run(self, variables: Any) -> dict[str, Any]:
        """Metrics of `variables` over one pass of the batches (a collective on several
        processes: every process calls it and gets the same dict)."""
        self.accumulator.reset()
        drawn: list[dict[str, np.ndarray]] = []
        batches = self.batches
        if self.progress and jax.process_index() == 0:
            import sys

            from tqdm import tqdm

            batches = tqdm(batches, total=len(self.batches) if hasattr(self.batches, "__len__")
                           else None, desc="evaluate", unit="batch", file=sys.stderr)
        def add(dets, batch):
            dets = type(dets)(*(host_local(x) for x in dets))
            self.accumulator.add_batch(dets, batch)
            if sum(len(d["image"]) for d in drawn) < self.num_draw:
                keep = np.asarray(batch["mask"], bool) if "mask" in batch else np.ones(
                    len(batch["image"]), bool)
                drawn.append({"image": np.asarray(batch["image"])[keep],
                              "boxes": dets.boxes[keep], "labels": dets.classes[keep],
                              "scores": dets.scores[keep]})

        # one batch in flight: the next batch's detections compute (jax dispatches
        # asynchronously) while this thread scores the previous one
        pending = None
        for batch in batches:
            dets = self.predict_fn(variables, batch)
            if pending is not None:
                add(*pending)
            pending = (dets, batch)
        if pending is not None:
            add(*pending)
        self.samples = None
        if drawn:
            self.samples = {k: np.concatenate([d[k] for d in drawn])[:self.num_draw]
                            for k in drawn[0]}
        return self.accumulator.result()


def _scalar_id(x: Any) -> Any:
    x = np.asarray(x)
    if x.dtype.kind in "SUO":
        v = x.item()
        return v.decode() if isinstance(v, bytes) else str(v)
    return int(x.reshape(-1)[0]) if x.size == 1 else tuple(x.reshape(-1).tolist())


def _pack(gts: list[dict], dets: list[dict], ids: list[Any], m: int, k: int, n: int):
    """Per-image records -> fixed-shape padded arrays with n rows (m gt, k detections each)."""
    arrays = {
        "gt_boxes": np.zeros((n, m, 4), np.float32), "gt_labels": np.zeros((n, m), np.int32),
        "gt_difficult": np.zeros((n, m), bool), "gt_iscrowd": np.zeros((n, m), bool),
        "gt_flags": np.zeros((n, 2), bool), "size": np.zeros((n, 2), np.int32),
        "det_boxes": np.zeros((n, k, 4), np.float32), "det_scores": np.zeros((n, k), np.float32),
        "det_labels": np.zeros((n, k), np.int32), "num_gt": np.zeros(n, np.int32),
        "num_det": np.zeros(n, np.int32), "image_id": np.full(n, -1, np.int32),
        "has_id": np.zeros(n, bool), "valid": np.zeros(n, bool)}
    for i, (gt, det, image_id) in enumerate(zip(gts, dets, ids, strict=True)):
        g, d = len(gt["labels"]), len(det["scores"])
        arrays["valid"][i] = True
        arrays["num_gt"][i], arrays["num_det"][i] = g, d
        arrays["gt_boxes"][i, :g] = gt["boxes"]
        arrays["gt_labels"][i, :g] = gt["labels"]
        arrays["gt_flags"][i] = ("difficult" in gt, "iscrowd" in gt)
        if "difficult" in gt:
            arrays["gt_difficult"][i, :g] = gt["difficult"]
        if "iscrowd" in gt:
            arrays["gt_iscrowd"][i, :g] = gt["iscrowd"]
        arrays["size"][i] = gt["size"]
        arrays["det_boxes"][i, :d] = det["boxes"]
        arrays["det_scores"][i, :d] = det["scores"]
        arrays["det_labels"][i, :d] = det["labels"]
        if image_id is not None:
            if not isinstance(image_id, int):
                raise ValueError("multi-process evaluation needs integer (int32) image ids")
            arrays["image_id"][i], arrays["has_id"][i] = image_id, True
    return arrays


def _unpack(arrays: dict[str, np.ndarray]) -> tuple[list[dict], list[dict], list[Any]]:
    gts, dets, ids = [], [], []
    for i in np.flatnonzero(arrays["valid"]):
        g, d = int(arrays["num_gt"][i]), int(arrays["num_det"][i])
        gt = {"boxes": arrays["gt_boxes"][i, :g], "labels": arrays["gt_labels"][i, :g].astype(
            np.int64), "size": tuple(int(s) for s in arrays["size"][i])}
        if arrays["gt_flags"][i, 0]:
            gt["difficult"] = arrays["gt_difficult"][i, :g]
        if arrays["gt_flags"][i, 1]:
            gt["iscrowd"] = arrays["gt_iscrowd"][i, :g]
        gts.append(gt)
        dets.append({"boxes": arrays["det_boxes"][i, :d], "scores": arrays["det_scores"][i, :d],
                     "labels": arrays["det_labels"][i, :d].astype(np.int64)})
        ids.append(int(arrays["image_id"][i]) if arrays["has_id"][i] else None)
    return gts, dets, ids


def _allgather_records(gts: list[dict], dets: list[dict], ids: list[Any]):
    """Every process's records, in process order, on every process (fixed-shape allgather)."""
    from jax.experimental import multihost_utils

    local = np.array([len(gts), max([len(g["labels"]) for g in gts], default=0),
                      max([len(d["scores"]) for d in dets], default=0)], np.int32)
    n, m, k = (int(v) for v in np.max(multihost_utils.process_allgather(local), axis=0))
    packed = _pack(gts, dets, ids, max(m, 1), max(k, 1), max(n, 1))
    gathered = multihost_utils.process_allgather(packed)  # each leaf [num_processes, n, ...]
    flat = {key: np.asarray(v).reshape((-1,) + v.shape[2:]) for key, v in gathered.items()}
    return _unpack(flat)
