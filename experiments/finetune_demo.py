r"""Fine-tuning a detector on other classes, shown on data the library can make (issue 35).

    python -m experiments.finetune_demo --out=/tmp/finetune_demo [--steps=600] [--source_steps=3000]

1. Writes two COCO-JSON folders of synthetic shapes (`ssd_jax.data.synthetic`, 192 px JPEGs):
   "source" (6000 training and 300 validation images) labels five shapes and leaves the rings
   unlabelled; "target" (300 training and 300 held-out images, other images) labels two of the
   source's shapes under their names (circle, triangle) and the ring, which the source never
   learnt as a class.
2. Trains the source detector (the default compact model) for --source_steps.
3. On the target: the source run loaded as `config.init_checkpoint` and evaluated before any
   step (the shared classes' rows copied: their AP should be close to the source's, the ring's
   near 0); fine-tuned for --steps; and trained from scratch for the same steps.
4. Prints the table (per-class AP on the held-out images, VOC AP@0.5) for experiments/RESULTS.md.

Everything goes through `ssd_jax.train.train_and_evaluate`, as `python -m experiments.train` does.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from absl import flags

from ssd_jax import cli
from ssd_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Folder for the data and the runs (created). Required.")
flags.DEFINE_integer("steps", 600, "Training steps of the fine-tuned and the from-scratch run.")
flags.DEFINE_integer("source_steps", 3000, "Training steps of the source run.")
flags.DEFINE_integer("source_images", 6000, "Training images of the source dataset.")
flags.DEFINE_integer("target_images", 300, "Training images of the target dataset.")
flags.DEFINE_integer("eval_images", 300, "Validation / held-out images of each dataset.")

SOURCE_CLASSES = ("circle", "rectangle", "triangle", "star", "cross")  # no ring
TARGET_CLASSES = ("circle", "triangle", "ring")


def write_coco(root: str, classes: Sequence[str], seed: int, split: str, n: int,
               name: str) -> tuple[str, str]:
    """`n` synthetic images of (seed, split) as JPEGs in root/name/ and root/name.json, boxes
    of `classes` only (the other shapes stay in the pictures, unlabelled)."""
    from PIL import Image

    from ssd_jax.data import synthetic

    images_dir, ann_file = os.path.join(root, name), os.path.join(root, f"{name}.json")
    if os.path.exists(ann_file):
        return ann_file, images_dir
    os.makedirs(images_dir, exist_ok=True)
    ids = {c: i + 1 for i, c in enumerate(classes)}
    images, anns = [], []
    for i in range(n):
        ex = synthetic.generate_example(seed, split, i, image_size=192)
        file = f"{i:05d}.jpg"
        Image.fromarray(ex["image"]).save(os.path.join(images_dir, file), quality=95)
        images.append({"id": i + 1, "file_name": file, "width": 192, "height": 192})
        for box, label in zip(ex["boxes"], ex["labels"], strict=True):
            cls = synthetic.CLASS_NAMES[int(label) - 1]
            if cls in ids:
                x0, y0, x1, y1 = (float(v) * 192 for v in box)
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": ids[cls],
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                             "iscrowd": 0})
    with open(ann_file + ".tmp", "w") as f:
        json.dump({"images": images, "annotations": anns,
                   "categories": [{"id": i, "name": c} for c, i in ids.items()]}, f)
    os.replace(ann_file + ".tmp", ann_file)
    return ann_file, images_dir


def _config(train: tuple[str, str], val: tuple[str, str], steps: int, **fields):
    from ssd_jax import config as config_lib

    config = config_lib.get_config()
    config.dataset.kind = "coco_json"
    config.dataset.train_annotations, config.dataset.train_images = train
    config.dataset.eval_annotations, config.dataset.eval_images = val
    config.num_train_steps = steps
    config.eval_every_steps = 0
    config.checkpoint_every_steps = max(steps, 1)
    config.log_every_steps = 100
    config.metric = "voc"
    for k, v in fields.items():
        config[k] = v
    return config


def _run(name: str, config, workdir: str) -> dict:
    """train_and_evaluate's final metrics and wall time (kept in WORKDIR/demo_result.json: a
    second call of the demo prints the table without training again)."""
    from ssd_jax.train import train_and_evaluate

    result_file = os.path.join(workdir, "demo_result.json")
    if os.path.exists(result_file):
        with open(result_file) as f:
            return json.load(f)
    t = time.perf_counter()
    _, metrics = train_and_evaluate(config, workdir)
    result = {"wall": time.perf_counter() - t, **{
        k: float(v) for k, v in metrics.items() if k.startswith(("AP/", "mAP"))}}
    print(f"{name}: {result['wall']:.0f} s, " + ", ".join(
        f"{k}={v:.4f}" for k, v in result.items() if k != "wall"), flush=True)
    with open(result_file, "w") as f:
        json.dump(result, f)
    return result


def _source_on_target(source_dir: str, heldout: tuple[str, str]) -> dict:
    """The source run's own detections of the shared classes on the target's held-out images
    (its 6-way softmax: before the heads are cut to the target's classes), VOC AP."""
    import numpy as np
    from PIL import Image

    from ssd_jax import evaluation, inference

    run = inference.load_run(source_dir)
    predictor = inference.Predictor.from_run(run)
    with open(heldout[0]) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    target_label = {n: i + 1 for i, n in enumerate(TARGET_CLASSES)}
    source_label = {i + 1: n for i, n in enumerate(run.class_names)}
    boxes = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[a["image_id"]].append(([x / 192, y / 192, (x + w) / 192, (y + h) / 192],
                                     target_label[names[a["category_id"]]]))
    gts, dets = [], []
    for im in coco["images"]:
        pixels = np.asarray(Image.open(os.path.join(heldout[1], im["file_name"])).convert("RGB"))
        d = predictor.predict(pixels)
        keep = [i for i, lab in enumerate(d.labels) if source_label[int(lab)] in target_label]
        dets.append({"boxes": np.asarray(d.boxes, np.float32)[keep].reshape(-1, 4) / 192,
                     "scores": np.asarray(d.scores)[keep],
                     "labels": np.array([target_label[source_label[int(d.labels[i])]]
                                         for i in keep], np.int32)})
        b = boxes[im["id"]]
        gts.append({"boxes": np.array([x for x, _ in b], np.float32).reshape(-1, 4),
                    "labels": np.array([lab for _, lab in b], np.int32), "size": (192, 192)})
    aps = evaluation.evaluate_voc(gts, dets, len(TARGET_CLASSES) + 1, use_07_metric=False)["AP"]
    return {"wall": 0.0, **{f"AP/{n}": a for n, a in zip(TARGET_CLASSES, aps, strict=True)
                            if n in run.class_names}}


def main(argv: Sequence[str]) -> None:
    del argv
    cli.import_tensorflow_quietly()  # the data (TensorFlow sees no GPU)
    if not FLAGS.out:
        raise UserError("--out is required: the folder for the data and the runs")
    out = os.path.abspath(FLAGS.out)
    os.makedirs(out, exist_ok=True)
    n_eval = FLAGS.eval_images
    src_train = write_coco(out, SOURCE_CLASSES, 11, "train", FLAGS.source_images, "source_train")
    src_val = write_coco(out, SOURCE_CLASSES, 11, "val", n_eval, "source_val")
    tgt_train = write_coco(out, TARGET_CLASSES, 12, "train", FLAGS.target_images, "target_train")
    tgt_test = write_coco(out, TARGET_CLASSES, 12, "val", n_eval, "target_heldout")

    rows = {}
    src_dir = os.path.join(out, "source_run")
    rows["source (its own validation images)"] = _run(
        "source", _config(src_train, src_val, FLAGS.source_steps), src_dir)
    rows["source, its own detections on the target's held-out images"] = \
        _source_on_target(src_dir, tgt_test)
    # the recipe: a tenth of the learning rate, a short warmup, the same cosine schedule
    tune = dict(learning_rate=1e-3, warmup_steps=50)
    rows["fine-tuned, step 0"] = _run(
        "step 0", _config(tgt_train, tgt_test, 0, init_checkpoint=src_dir, **tune),
        os.path.join(out, "finetune_step0"))
    rows[f"fine-tuned, {FLAGS.steps} steps"] = _run(
        "fine-tuned", _config(tgt_train, tgt_test, FLAGS.steps, init_checkpoint=src_dir, **tune),
        os.path.join(out, "finetune"))
    rows[f"from scratch, {FLAGS.steps} steps"] = _run(
        "scratch", _config(tgt_train, tgt_test, FLAGS.steps),
        os.path.join(out, "scratch"))

    cols = ("circle", "triangle", "ring")
    lines = ["| run | steps | wall (s) | " + " | ".join(f"AP {c}" for c in cols) + " | mAP |",
             "|---|---|---|" + "---|" * (len(cols) + 1)]
    steps = [FLAGS.source_steps, FLAGS.source_steps, 0, FLAGS.steps, FLAGS.steps]
    for (name, r), n in zip(rows.items(), steps, strict=True):
        aps = " | ".join(f"{r[f'AP/{c}']:.3f}" if f"AP/{c}" in r else "-" for c in cols)
        wall = f"{r['wall']:.0f}" if r["wall"] else "-"
        m_ap = f"{r['mAP']:.3f}" if "mAP" in r else "-"
        lines.append(f"| {name} | {n} | {wall} | {aps} | {m_ap} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    cli.run(main)
