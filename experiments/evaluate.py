"""Evaluate a training run's checkpoint: metrics, COCO results, a per-class AP table, PR curves.

    python -m experiments.evaluate --workdir=RUN_DIR [--out=EVAL_DIR] [--step=N] [--metric=coco]
    python -m experiments.evaluate --workdir=RUN_DIR --split=test   # synthetic: the held-out split
    python -m experiments.evaluate --workdir=RUN_DIR --config.dataset.eval_annotations=PATH
        --config.dataset.eval_images=DIR     # the run's data, moved (fields of the run's config)
    python -m experiments.evaluate --workdir=RUN_DIR --config=ssd300_voc
        --config.dataset.data_dir=DIR        # another dataset/split (same classes)
    python -m experiments.evaluate --workdir=RUN_DIR --print_config   # the run's config

Without --config, --config.FIELD=VALUE overrides the run's own config (run_info.json). Only the
config's `dataset` and `max_boxes` are used (the model, detect settings and metric stay the
run's; --metric and --batch_size change those).

The evaluation is the training loop's (`ssd_jax.run_eval.evaluate_run`: the same shard_mapped
eval step, eval batches and `evaluation.Evaluator`), so it reports the mAP training reported for
that checkpoint. Written to --out (default WORKDIR/eval_<step>): metrics.json, detections.json
(COCO results in the dataset's image and category ids) and pr_curves.png; the per-class table is
printed. For --metric=coco the table and curves use VOC2010+ area AP at IoU 0.5 per class.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from absl import flags

from ssd_jax import cli
from ssd_jax.errors import UserError
from ssd_jax.evaluation import METRICS

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined by `run`, so that importing several commands in one
    process never clashes on names like --workdir)."""
    flags.DEFINE_string("workdir", None, "Training workdir (run_info.json + checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/eval_<step>).")
    flags.DEFINE_enum("metric", None, list(METRICS), "Metric (default: the run's).")
    flags.DEFINE_integer("batch_size", None, "Global eval batch (default: the run's eval_batch_size).")
    flags.DEFINE_enum("split", "eval", ["eval", "test"], "The run's eval split, or the held-out "
                      "test split of synthetic data (the training command's last figure).")

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def main(argv: Sequence[str], config: Any) -> None:
    import jax

    from ssd_jax import evaluation, inference, run_eval
    cli.import_tensorflow_quietly()  # the eval data (TensorFlow sees no GPU)

    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        raise UserError("--workdir is required (--help lists the flags)")
    run = inference.load_run(FLAGS.workdir, FLAGS.step)
    report = run_eval.evaluate_run(
        run, dataset_config=None if config is None else config.dataset,
        max_boxes=None if config is None else config.max_boxes, metric=FLAGS.metric,
        batch_size=FLAGS.batch_size, split=FLAGS.split)
    if jax.process_index() != 0:
        return
    suffix = "_test" if FLAGS.split == "test" else ""
    out = FLAGS.out or os.path.join(FLAGS.workdir, f"eval_{report['step']}{suffix}")
    paths = run_eval.write_eval_report(report, out)
    curves = report["curves"]
    names = report["class_names"][-len(curves["AP"]):]
    title = "AP50 (VOC area)" if report["metric"] == "coco" else "AP"
    print(evaluation.per_class_table(names, curves["AP"], curves["num_gt"], title=title))
    head = evaluation.headline(report["metric"])
    print(f"\n{FLAGS.split} split: {report['metric']} {head} = {report['metrics'].get(head)} "
          f"at step {report['step']} "
          f"({report['metrics'].get('num_images')} images; input: {report['input']})")
    print(f"wrote {paths['metrics']}, {paths['detections']} and {paths['pr_curves']}")


def run() -> None:
    """The `ssd-evaluate` console script."""
    define_flags()
    cli.run(main, configs_dir=CONFIGS, default_config=None, run_config=_run_config)


def _run_config() -> Any:
    """The run's own config, for --config.FIELD=VALUE without --config and --print_config."""
    from ssd_jax import workdir

    if not FLAGS.workdir:
        raise UserError("--workdir is required (--help lists the flags)")
    return workdir.read_run_config(FLAGS.workdir)


if __name__ == "__main__":
    run()
