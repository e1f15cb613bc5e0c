"""VOC and COCO metrics: hand-made cases, an independent devkit-style reference, pycocotools."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from ssd_jax import evaluation, postprocess

# ------------------------------------------------------------------------------- helpers


def gt(boxes, labels, difficult=None, size=(100, 100), iscrowd=None):
    out = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
           "labels": np.asarray(labels, np.int64).reshape(-1), "size": size}
    if difficult is not None:
        out["difficult"] = np.asarray(difficult, bool)
    if iscrowd is not None:
        out["iscrowd"] = np.asarray(iscrowd, bool)
    return out


def det(boxes, scores, labels):
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "scores": np.asarray(scores, np.float32).reshape(-1),
            "labels": np.asarray(labels, np.int64).reshape(-1)}


A = [0.1, 0.1, 0.4, 0.4]
B = [0.5, 0.5, 0.9, 0.8]
FAR = [0.0, 0.8, 0.1, 0.95]

# ---------------------------------------------------------------------- hand-made VOC cases


@pytest.mark.parametrize("use_07", [True, False])
def test_perfect_detector(use_07):
    gts = [gt([A, B], [1, 2]), gt([B], [1])]
    dets = [det([A, B], [0.9, 0.8], [1, 2]), det([B], [0.7], [1])]
    out = evaluation.evaluate_voc(gts, dets, 3, use_07_metric=use_07)
    np.testing.assert_allclose(out["AP"], [1.0, 1.0], rtol=1e-12)
    assert out["mAP"] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("use_07, expected", [(True, (6 + 5 * 2 / 3) / 11), (False, 0.5 + 0.5 * 2 / 3)])
def test_false_positive_ranked_between_true_positives(use_07, expected):
    # ranked: TP (0.9), FP (0.8), TP (0.7): recall .5 .5 1, precision 1 .5 2/3
    gts = [gt([A, B], [1, 1])]
    dets = [det([A, FAR, B], [0.9, 0.8, 0.7], [1, 1, 1])]
    out = evaluation.evaluate_voc(gts, dets, 2, use_07_metric=use_07, return_curves=True)
    np.testing.assert_allclose(out["AP"], [expected])
    np.testing.assert_allclose(out["recall"][0], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(out["precision"][0], [1.0, 0.5, 2 / 3])


@pytest.mark.parametrize("use_07, expected", [(True, 0.5), (False, 0.5)])
def test_false_positive_ranked_first(use_07, expected):
    gts = [gt([A], [1])]
    dets = [det([FAR, A], [0.9, 0.8], [1, 1])]
    out = evaluation.evaluate_voc(gts, dets, 2, use_07_metric=use_07)
    np.testing.assert_allclose(out["AP"], [expected], rtol=1e-12)


@pytest.mark.parametrize("use_07, expected", [(True, (6 + 5 * 2 / 3) / 11), (False, 0.5 + 0.5 * 2 / 3)])
def test_duplicates_are_false_positives(use_07, expected):
    gts = [gt([A, B], [1, 1])]
    dup = [A[0] + 0.01, A[1], A[2], A[3] + 0.01]
    dets = [det([A, dup, B], [0.9, 0.8, 0.7], [1, 1, 1])]
    out = evaluation.evaluate_voc(gts, dets, 2, use_07_metric=use_07, return_curves=True)
    np.testing.assert_allclose(out["AP"], [expected])
    np.testing.assert_allclose(out["precision"][0], [1.0, 0.5, 2 / 3])


@pytest.mark.parametrize("use_07", [True, False])
def test_difficult_objects(use_07):
    # class 1: a difficult object detected first is neither TP nor FP -> AP 1;
    # class 2: only difficult ground truth -> AP nan, excluded from mAP;
    # class 3: no ground truth at all -> nan.
    gts = [gt([A, B, A], [1, 1, 2], difficult=[True, False, True])]
    dets = [det([A, B, A, B], [0.9, 0.8, 0.7, 0.6], [1, 1, 2, 3])]
    out = evaluation.evaluate_voc(gts, dets, 4, use_07_metric=use_07, return_curves=True)
    assert out["AP"][0] == pytest.approx(1.0, rel=1e-12)
    assert np.isnan(out["AP"][1]) and np.isnan(out["AP"][2])
    assert out["mAP"] == pytest.approx(1.0, rel=1e-12)
    # the difficult match is neither TP nor FP: cumulative tp = fp = 0 at that rank
    np.testing.assert_allclose(out["precision"][0], [0.0, 1.0])
    np.testing.assert_allclose(out["recall"][0], [0.0, 1.0])
    # without the flags the difficult detection is a TP of class 1 and class 2 counts
    plain = evaluation.evaluate_voc([gt([A, B, A], [1, 1, 2])], dets, 4, use_07_metric=use_07)
    np.testing.assert_allclose(plain["AP"][:2], [1.0, 1.0], rtol=1e-12)


def test_legacy_plus_one_pixel_convention():
    # 100x100 image: gt 10x10 px, detection 10x4.8 px. Plain IoU 0.48 (a miss); with the
    # devkit's +1 widths/heights 11*5.8/121 = 0.527 (a hit).
    gts = [gt([[0.0, 0.0, 0.1, 0.1]], [1])]
    dets = [det([[0.0, 0.0, 0.1, 0.048]], [0.9], [1])]
    assert evaluation.evaluate_voc(gts, dets, 2)["AP"][0] == pytest.approx(1.0, rel=1e-12)
    # pixel scale matters: in a 1000x1000 image the +1 barely changes IoU -> a miss
    gts[0]["size"] = (1000, 1000)
    assert evaluation.evaluate_voc(gts, dets, 2)["AP"] == [0.0]


def test_no_detections_gives_zero_ap():
    out = evaluation.evaluate_voc([gt([A], [1])], [det(np.zeros((0, 4)), [], [])], 2)
    assert out["AP"] == [0.0] and out["mAP"] == 0.0


# -------------------------------------------------- reference: classic voc_eval.py, plain loops


def reference_voc_eval(gts, dets, classname, ovthresh=0.5, use_07_metric=True):
    """voc_eval.py (Bharath Hariharan) for one class, on pixel boxes, with VOCevaldet's `>=`."""
    class_recs = {}
    npos = 0
    for img, g in enumerate(gts):
        h, w = g["size"]
        bbox = [[b[0] * w, b[1] * h, b[2] * w, b[3] * h]
                for b, lab in zip(g["boxes"], g["labels"], strict=True) if lab == classname]
        diff = [bool(d) for d, lab in zip(g.get("difficult", [False] * len(g["labels"])),
                                          g["labels"], strict=True) if lab == classname]
        npos += sum(not d for d in diff)
        class_recs[img] = {"bbox": np.array(bbox).reshape(-1, 4), "difficult": np.array(diff),
                           "det": [False] * len(bbox)}
    image_ids, confidence, bbs = [], [], []
    for img, d in enumerate(dets):
        h, w = gts[img]["size"]
        for b, s, lab in zip(d["boxes"], d["scores"], d["labels"], strict=True):
            if lab == classname:
                image_ids.append(img)
                confidence.append(float(s))
                bbs.append([b[0] * w, b[1] * h, b[2] * w, b[3] * h])
    if npos == 0:
        return float("nan")
    sorted_ind = np.argsort(-np.array(confidence), kind="stable")
    tp = np.zeros(len(image_ids))
    fp = np.zeros(len(image_ids))
    for d in range(len(image_ids)):
        R = class_recs[image_ids[sorted_ind[d]]]
        bb = np.array(bbs[sorted_ind[d]], dtype=float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax >= ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def random_dataset(rng, num_images=60, num_classes=7, crowd=False, max_gt=6):
    """Ground truth (some difficult / crowd) and plausible detections: jittered hits, duplicates,
    wrong classes, random boxes. Class num_classes-1 never appears in the ground truth."""
    gts, dets = [], []
    for _ in range(num_images):
        n = int(rng.integers(0, max_gt + 1))
        wh = rng.uniform(0.05, 0.6, (n, 2))
        lo = rng.uniform(0, 1, (n, 2)) * (1 - wh)
        boxes = np.concatenate([lo, lo + wh], 1)
        labels = rng.integers(1, num_classes - 1, n)
        size = (int(rng.integers(200, 640)), int(rng.integers(200, 640)))
        g = gt(boxes, labels, difficult=rng.uniform(size=n) < 0.15, size=size,
               iscrowd=(rng.uniform(size=n) < 0.1) if crowd else None)
        d_boxes, d_labels, d_scores = [], [], []
        for b, lab in zip(boxes, labels, strict=True):
            for _ in range(int(rng.integers(0, 3))):  # 0, 1 or 2 (a duplicate) hits
                d_boxes.append(np.clip(b + rng.normal(0, 0.04, 4), 0, 1))
                d_labels.append(lab if rng.uniform() < 0.85 else rng.integers(1, num_classes))
                d_scores.append(rng.uniform(0.2, 1.0))
        for _ in range(int(rng.integers(0, 4))):
            w, h = rng.uniform(0.05, 0.5, 2)
            x, y = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
            d_boxes.append([x, y, x + w, y + h])
            d_labels.append(rng.integers(1, num_classes))
            d_scores.append(rng.uniform(0.01, 0.8))
        gts.append(g)
        dets.append(det(np.array(d_boxes).reshape(-1, 4), d_scores, d_labels))
    return gts, dets


@pytest.mark.parametrize("use_07", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_voc_matches_reference_implementation(use_07, seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    gts, dets = random_dataset(rng, 60, num_classes)
    out = evaluation.evaluate_voc(gts, dets, num_classes, use_07_metric=use_07)
    ref = [reference_voc_eval(gts, dets, c, use_07_metric=use_07) for c in range(1, num_classes)]
    assert np.isnan(ref[-1]) and sum(np.isfinite(ref)) >= 5
    assert 0.2 < np.nanmean(ref) < 0.95  # neither trivial nor hopeless
    np.testing.assert_allclose(out["AP"], ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out["mAP"], np.nanmean(ref), rtol=1e-12)


def test_voc_iou_threshold_argument():
    rng = np.random.default_rng(5)
    gts, dets = random_dataset(rng, 50, 6)
    out = evaluation.evaluate_voc(gts, dets, 6, iou_threshold=0.7)
    ref = [reference_voc_eval(gts, dets, c, ovthresh=0.7) for c in range(1, 6)]
    np.testing.assert_allclose(out["AP"], ref, rtol=1e-12)


# --------------------------------------------------------------------------------------- COCO


def pycocotools_on_json_files(tmp_path, gts, dets):
    """pycocotools as a user would run it: a ground-truth JSON and a results JSON on disk."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, results, cats = [], [], [], set()
    for i, (g, d) in enumerate(zip(gts, dets, strict=True)):
        h, w = g["size"]
        images.append({"id": 100 + i, "height": h, "width": w, "file_name": f"{i}.jpg"})
        crowd = g.get("iscrowd", np.zeros(len(g["labels"]), bool))
        for b, lab, c in zip(g["boxes"], g["labels"], crowd, strict=True):
            bw, bh = (b[2] - b[0]) * w, (b[3] - b[1]) * h
            anns.append({"id": 1000 + len(anns), "image_id": 100 + i, "category_id": int(lab),
                         "bbox": [float(b[0] * w), float(b[1] * h), float(bw), float(bh)],
                         "area": float(bw * bh), "iscrowd": int(c)})
            cats.add(int(lab))
        for b, s, lab in zip(d["boxes"], d["scores"], d["labels"], strict=True):
            results.append({"image_id": 100 + i, "category_id": int(lab), "score": float(s),
                            "bbox": [float(b[0] * w), float(b[1] * h), float((b[2] - b[0]) * w),
                                     float((b[3] - b[1]) * h)]})
    gt_file, res_file = tmp_path / "gt.json", tmp_path / "results.json"
    gt_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": c, "name": f"c{c}", "supercategory": "x"} for c in sorted(cats)]}))
    res_file.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        coco_dt = coco_gt.loadRes(str(res_file))
        e = COCOeval(coco_gt, coco_dt, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats[:6]


def test_coco_matches_pycocotools_on_json_files(tmp_path):
    rng = np.random.default_rng(7)
    gts, dets = random_dataset(rng, 50, 6, crowd=True, max_gt=8)
    assert sum(int(np.sum(g["iscrowd"])) for g in gts) > 0
    out = evaluation.evaluate_coco(gts, dets, [g["size"] for g in gts])
    ref = pycocotools_on_json_files(tmp_path, gts, dets)
    assert list(out) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    np.testing.assert_allclose([out[k] for k in out], ref, rtol=1e-6, atol=1e-9)
    assert 0.05 < out["AP"] < out["AP50"] < 1
    # crowd ground truth matters (it is an ignore region, not a missed object)
    plain = [{k: v for k, v in g.items() if k != "iscrowd"} for g in gts]
    assert evaluation.evaluate_coco(plain, dets)["AP"] != out["AP"]


def test_coco_without_detections():
    out = evaluation.evaluate_coco([gt([A], [1])], [det(np.zeros((0, 4)), [], [])])
    assert out["AP"] == 0.0 and out["AP50"] == 0.0


# ------------------------------------------------------------------------ the accumulator


def padded_batches(gts, dets, batch_size, max_gt, max_det, rng):
    """Yield (Detections, batch) with padding rows, and padding examples (mask False)."""
    for start in range(0, len(gts), batch_size):
        chunk = list(range(start, min(start + batch_size, len(gts))))
        n_real = len(chunk)
        b = batch_size
        boxes = rng.uniform(0, 1, (b, max_gt, 4)).astype(np.float32)  # garbage in padding rows
        labels = np.zeros((b, max_gt), np.int32)
        difficult = rng.uniform(size=(b, max_gt)) < 0.5
        size = np.tile([[300, 300]], (b, 1))
        d_boxes = rng.uniform(0, 1, (b, max_det, 4)).astype(np.float32)
        d_scores = rng.uniform(0, 1, (b, max_det)).astype(np.float32)
        d_classes = rng.integers(1, 5, (b, max_det)).astype(np.int32)
        num = rng.integers(0, max_det + 1, b).astype(np.int32)  # garbage for padding examples
        for row, i in enumerate(chunk):
            g, d = gts[i], dets[i]
            # real boxes at random rows, padding in between
            rows = np.sort(rng.choice(max_gt, len(g["labels"]), replace=False))
            boxes[row, rows] = g["boxes"]
            labels[row, rows] = g["labels"]
            difficult[row, rows] = g["difficult"]
            size[row] = g["size"]
            k = len(d["scores"])
            d_boxes[row, :k], d_scores[row, :k], d_classes[row, :k] = (
                d["boxes"], d["scores"], d["labels"])
            num[row] = k
        mask = np.arange(b) < n_real
        if n_real < b:  # a padding example carries "ground truth" that must not count
            labels[n_real:, 0] = 1
        yield (postprocess.Detections(d_boxes, d_scores, d_classes, num),
               {"boxes": boxes, "labels": labels, "difficult": difficult, "image_size": size,
                "mask": mask, "image_id": np.arange(start, start + b)})


def test_evaluator_over_padded_batches_equals_evaluate_voc():
    rng = np.random.default_rng(11)
    gts, dets = random_dataset(rng, 53, 5, max_gt=6)
    max_det = max(len(d["scores"]) for d in dets) + 3
    names = ["background", "cat", "dog", "cow", "bird"]
    for metric, use_07 in (("voc07", True), ("voc", False)):
        ev = evaluation.DetectionEvaluator(5, metric=metric, class_names=names)
        for d, batch in padded_batches(gts, dets, 8, 9, max_det, rng):
            ev.add_batch(d, batch)
        assert len(ev) == 53
        got = ev.result()
        ref = evaluation.evaluate_voc(gts, dets, 5, use_07_metric=use_07)
        np.testing.assert_allclose(got["AP"], ref["AP"], rtol=1e-6)
        assert got["mAP"] == pytest.approx(ref["mAP"], rel=1e-6)
        np.testing.assert_allclose([got[f"AP/{n}"] for n in names[1:]], ref["AP"], rtol=1e-6)
        assert got["num_images"] == 53
        ev.reset()
        assert len(ev) == 0


def test_evaluator_coco_and_repeated_image_ids():
    rng = np.random.default_rng(12)
    gts, dets = random_dataset(rng, 20, 5, crowd=True)
    ev = evaluation.DetectionEvaluator(5, metric="coco")
    for i, (g, d) in enumerate(zip(gts, dets, strict=True)):
        m, k = len(g["labels"]), len(d["scores"])
        batch = {"boxes": g["boxes"][None], "labels": g["labels"][None],
                 "iscrowd": g["iscrowd"][None], "image_size": np.array([g["size"]]),
                 "image_id": np.array([i])}
        ev.add_batch(postprocess.Detections(d["boxes"][None], d["scores"][None],
                                            d["labels"][None], np.array([k])), batch)
        assert m == len(g["labels"])
    # the first image again (e.g. repeated to fill a batch): counted once
    g, d = gts[0], dets[0]
    ev.add_batch(postprocess.Detections(d["boxes"][None], d["scores"][None], d["labels"][None],
                                        np.array([len(d["scores"])])),
                 {"boxes": g["boxes"][None], "labels": g["labels"][None],
                  "iscrowd": g["iscrowd"][None], "image_size": np.array([g["size"]]),
                  "image_id": np.array([0])})
    got = ev.result()
    plain = [{k: v for k, v in g.items() if k != "difficult"} for g in gts]
    ref = evaluation.evaluate_coco(plain, dets)
    assert got["num_images"] == 20
    assert {k: got[k] for k in ref} == ref
    rec_gts, rec_dets = ev.records()  # what evaluate's PR curves use: the same 20 images
    assert len(rec_gts) == len(rec_dets) == 20
    np.testing.assert_array_equal(rec_dets[0]["scores"], dets[0]["scores"])


def test_gather_packing_round_trip():
    """The fixed-shape packing used across processes loses nothing (run here on one process)."""
    rng = np.random.default_rng(13)
    gts, dets = random_dataset(rng, 12, 5, crowd=True)
    gts[3].pop("iscrowd")
    ids = list(range(12))
    ids[5] = None
    g2, d2, i2 = evaluation._allgather_records(gts, dets, ids)
    assert i2 == ids
    for a, b in zip(gts + dets, g2 + d2, strict=True):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_evaluator_accepts_jax_detections():
    import jax.numpy as jnp

    ev = evaluation.DetectionEvaluator(3, metric="voc07")
    d = postprocess.Detections(jnp.asarray([[A, B, [0, 0, 0, 0]]]), jnp.asarray([[0.9, 0.8, 0.0]]),
                               jnp.asarray([[1, 2, 0]], jnp.int32), jnp.asarray([2], jnp.int32))
    ev.add_batch(d, {"boxes": jnp.asarray([[A, B]]), "labels": jnp.asarray([[1, 2]]),
                     "image_size": jnp.asarray([[100, 200]])})
    np.testing.assert_allclose(ev.result()["AP"], [1.0, 1.0], rtol=1e-12)


_WORKER = r'''
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, repo = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)
import numpy as np
sys.path[:0] = [repo, repo + "/tests"]
from ssd_jax import evaluation
from test_evaluation import padded_batches, random_dataset
gts, dets = random_dataset(np.random.default_rng(0), 23, 5)
mine = list(range(pid, 23, 2))  # 12 images on process 0, 11 on process 1
ev = evaluation.DetectionEvaluator(5, metric="voc07")
for d, batch in padded_batches([gts[i] for i in mine], [dets[i] for i in mine], 4, 8, 12,
                               np.random.default_rng(pid)):
    batch["image_id"] = np.asarray(mine + [-1] * 4)[batch["image_id"]]
    ev.add_batch(d, batch)
print(json.dumps({"AP": ev.result()["AP"], "n": len(ev)}))
'''


@pytest.mark.slow
def test_evaluator_gathers_across_two_processes(tmp_path):
    """Two JAX processes (gloo on CPU), each with part of the images: both get the full result."""
    import os
    import pathlib
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), repo], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    gts, dets = random_dataset(np.random.default_rng(0), 23, 5)
    ref = evaluation.evaluate_voc(gts, dets, 5)["AP"]
    assert [r["n"] for r in results] == [12, 11]
    for r in results:
        np.testing.assert_allclose(np.asarray(r["AP"], float), ref, rtol=1e-6)
