"""Evaluate a training run's checkpoint: metrics JSON, a per-class AP table, precision/recall curves.

    python -m experiments.evaluate --workdir=RUN_DIR --out=EVAL_DIR [--step=N]
    python -m experiments.evaluate --workdir=RUN_DIR --out=EVAL_DIR \
        --config=experiments/configs/ssd300_voc.py --config.dataset.data_dir=DIR

The model, its checkpoint and the detection settings come from the workdir (run_info.json); with
--config, that config's `dataset` and `max_boxes` replace the run's (e.g. another split or data
folder; the class list must match). The eval path is the training loop's: the same shard_mapped,
jitted `train_lib` eval step (model + `postprocess.detect`) over all local devices, the same
`pipeline.create_eval_iterator` batches and the same `evaluation.DetectionEvaluator`, so the mAP
equals the one `train_and_evaluate` reports for that checkpoint.

Written to --out:
  metrics.json   the evaluator's result ("mAP"/"AP"... per --metric), per-class AP and ground-truth
                 counts, the step and the metric's name
  pr_curves.png  per-class precision/recall curves (VOC matching at IoU 0.5), AP in each title

The per-class table (class name, AP, #gt) is printed on the console. For --metric=coco the table
and curves use VOC2010+ area AP at IoU 0.5 per class (COCOeval's summary has no per-class AP).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def evaluate_checkpoint(workdir: str, *, step: int | None = None,
                        dataset_config: Any | None = None, max_boxes: int | None = None,
                        metric: str | None = None, batch_size: int | None = None
                        ) -> dict[str, Any]:
    """Evaluate WORKDIR's checkpoint (latest or `step`) on its eval data or `dataset_config`.

    Returns {"metrics": evaluator result, "step", "metric", "class_names", "curves":
    {"precision", "recall", "AP", "num_gt"} per class (VOC matching at IoU 0.5)}.
    """
    import jax
    import optax

    from ssd_jax import evaluation, postprocess, train_lib
    from ssd_jax.data import pipeline

    model, variables, config, class_names = train_lib.load_for_inference(workdir, step)
    if step is None:
        step = _latest_step(workdir)
    config = config.copy_and_resolve_references()
    if dataset_config is not None:
        config.dataset = dataset_config
        info = pipeline.get_dataset_info(config.dataset)
        if info.num_classes != model.num_classes:
            raise ValueError(
                f"the dataset of --config has {info.num_classes} classes (with background) but "
                f"the checkpoint in {workdir} was trained with num_classes={model.num_classes}")
        if tuple(info.class_names) != tuple(class_names):
            print(f"warning: the dataset's class names {info.class_names} differ from the run's "
                  f"{class_names}; reporting the dataset's", file=sys.stderr)
            class_names = tuple(info.class_names)
    if max_boxes is not None:
        config.max_boxes = int(max_boxes)
    if metric is not None:
        config.metric = metric
    if batch_size is not None:
        config.eval_batch_size = int(batch_size)
    train_lib.validate_config(config)

    from experiments.predict import check_variables_fit

    check_variables_fit(model, variables, what=f"checkpoint in {workdir}")
    # The training loop's eval step (same model build, same shard_map + jit, same detect).
    sharded_model = train_lib.create_model(config, model.num_classes)
    steps = train_lib.make_steps(config, sharded_model, optax.identity())
    state = train_lib.TrainState(
        step=np.asarray(step, np.int32), params=variables["params"],
        batch_stats=variables.get("batch_stats", {}), opt_state=(),
        rng=np.zeros(2, np.uint32))
    state = jax.device_put(state, steps.replicated)
    n_proc = jax.process_count()
    batches = pipeline.create_eval_iterator(
        config.dataset, image_size=model.prior_spec.image_size,
        batch_size=config.eval_batch_size // n_proc, max_boxes=config.max_boxes,
        process_index=jax.process_index(), process_count=n_proc)
    evaluator = evaluation.DetectionEvaluator(model.num_classes, metric=config.metric,
                                              class_names=class_names)
    from tqdm import tqdm

    for local in tqdm(batches, total=len(batches), desc="evaluate", unit="batch",
                      file=sys.stderr, disable=jax.process_index() != 0):
        images = steps.global_batch(local, ("image",))["image"]
        dets = steps.eval(state, images)
        evaluator.add_batch(postprocess.Detections(*(train_lib.process_local(x) for x in dets)),
                            local)
    metrics = evaluator.result()
    gts, dets = evaluator.records()  # every process's images, as result() scored them
    curves = evaluation.evaluate_voc(gts, dets, model.num_classes,
                                     use_07_metric=config.metric != "voc", return_curves=True)
    num_gt = []
    for c in range(1, model.num_classes):
        n = 0
        for gt in gts:
            sel = np.asarray(gt["labels"]) == c
            difficult = np.asarray(gt.get("difficult", np.zeros(sel.shape, bool)), bool)
            n += int(np.sum(sel & ~difficult))
        num_gt.append(n)
    curves["num_gt"] = num_gt
    return {"metrics": metrics, "step": int(step), "metric": config.metric,
            "class_names": list(class_names), "curves": curves}


def _latest_step(workdir: str) -> int:
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints")) as m:
        return int(m.latest_step())


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


def plot_pr_curves(class_names: Sequence[str], precision: Sequence[Any], recall: Sequence[Any],
                   aps: Sequence[float], path: str, title: str = "") -> str:
    """One precision/recall subplot per class (matplotlib, Agg), AP in the title; saved to path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(class_names)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False,
                             sharex=True, sharey=True)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        p, r = precision[k], recall[k]
        if p is not None and len(p):
            # the envelope (what AP integrates) and the raw curve
            env = np.maximum.accumulate(np.asarray(p)[::-1])[::-1]
            ax.plot(r, p, color="0.7", lw=0.8)
            ax.step(r, env, where="post", color="tab:blue", lw=1.4)
        ap = aps[k]
        ax.set_title(f"{class_names[k]}: {'n/a' if math.isnan(ap) else f'{ap:.3f}'}",
                     fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("recall", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("precision", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """metrics.json and pr_curves.png in out_dir; returns their paths and prints the table."""
    os.makedirs(out_dir, exist_ok=True)
    curves, names = report["curves"], report["class_names"]
    names = names[-len(curves["AP"]):]
    metric = report["metric"]
    title = "AP50 (VOC area)" if metric == "coco" else "AP"
    nan_to_none = lambda v: None if isinstance(v, float) and math.isnan(v) else v
    metrics = dict(report["metrics"])
    ap_list = metrics.pop("AP") if isinstance(metrics.get("AP"), list) else None
    payload: dict[str, Any] = {"step": report["step"], "metric": metric,
                               **{k: nan_to_none(v) for k, v in metrics.items()}}
    if ap_list is not None:
        payload["AP"] = [nan_to_none(a) for a in ap_list]
    payload["per_class"] = {name: {title: nan_to_none(ap), "num_gt": n}
                            for name, ap, n in zip(names, curves["AP"], curves["num_gt"])}
    metrics_path = os.path.join(out_dir, "metrics.json")
    with open(metrics_path, "w") as f:
        json.dump(payload, f, indent=2)
    print(per_class_table(names, curves["AP"], curves["num_gt"], title=title))
    head = "AP" if metric == "coco" else "mAP"
    print(f"\n{metric} {head} = {report['metrics'].get(head)} at step {report['step']} "
          f"({report['metrics'].get('num_images')} images)")
    png = plot_pr_curves(names, curves["precision"], curves["recall"], curves["AP"],
                         os.path.join(out_dir, "pr_curves.png"),
                         title=f"step {report['step']}: {metric} {head} "
                               f"{report['metrics'].get(head, float('nan')):.4f}")
    print(f"wrote {metrics_path} and {png}")
    return {"metrics": metrics_path, "pr_curves": png}


def define_flags() -> None:
    """The command line's absl flags (defined only when run as a program, so that importing this
    module next to other experiments' mains never clashes on flag names like --workdir)."""
    flags.DEFINE_string("workdir", None, "Training workdir (run_info.json + checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/eval_<step>).")
    flags.DEFINE_enum("metric", None, ["voc07", "voc", "coco"], "Metric (default: the run's).")
    flags.DEFINE_integer("batch_size", None, "Global eval batch (default: the run's eval_batch_size).")
    config_flags.DEFINE_config_file("config", None, "Optional config whose dataset (and max_boxes) "
                                    "replaces the run's.", lock_config=False)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # TensorFlow only feeds data; JAX owns the devices
    config = FLAGS.config
    try:
        report = evaluate_checkpoint(
            FLAGS.workdir, step=FLAGS.step,
            dataset_config=None if config is None else config.dataset,
            max_boxes=None if config is None else config.get("max_boxes"),
            metric=FLAGS.metric, batch_size=FLAGS.batch_size)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    out = FLAGS.out or os.path.join(FLAGS.workdir, f"eval_{report['step']}")
    import jax

    if jax.process_index() == 0:
        write_report(report, out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
