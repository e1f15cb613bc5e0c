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
    from ssd_jax.train import train_and_evaluate

    t = time.perf_counter()
    _, metrics = train_and_evaluate(config, workdir)
    wall = time.perf_counter() - t
    print(f"{name}: {wall:.0f} s, " + ", ".join(
        f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith(("AP/", "mAP"))), flush=True)
    return {"wall": wall, **{k: v for k, v in metrics.items()
                             if isinstance(v, float | int) and k.startswith(("AP/", "mAP"))}}


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
    steps = [FLAGS.source_steps, 0, FLAGS.steps, FLAGS.steps]
    for (name, r), n in zip(rows.items(), steps, strict=True):
        aps = " | ".join(f"{r[f'AP/{c}']:.3f}" if f"AP/{c}" in r else "-" for c in cols)
        lines.append(f"| {name} | {n} | {r['wall']:.0f} | {aps} | {r.get('mAP', float('nan')):.3f} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    cli.run(main)
