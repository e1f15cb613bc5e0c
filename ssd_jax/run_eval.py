"""A run's checkpoint evaluated as training evaluates it: the data-parallel evaluation step
(`detect_images` shard_mapped over all devices, which the trainer builds on too),
`evaluate_run` (the training loop's `evaluation.Evaluator` over the run's eval data or another
dataset of the same classes) and the report `experiments/evaluate.py` writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from ssd_jax.errors import ConfigError, UserError
from ssd_jax.inference import Run, detect_images


@dataclasses.dataclass
class EvalStep:
    """`detect_images` mapped over a Mesh of all devices of all processes (shard_map, axis
    "data"), for evaluation: `eval(variables, images)` takes variables replicated and images
    sharded over "data". `predict_fn()` is the `evaluation.Evaluator`'s predict function."""

    mesh: Any
    eval: Any
    replicated: Any
    data: Any

    def global_batch(self, local: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, Any]:
        """Per-host numpy batch -> global arrays sharded over "data" (explicit transfer)."""
        import jax

        return {k: jax.make_array_from_process_local_data(self.data, local[k]) for k in keys}

    def predict_fn(self) -> Callable[..., Any]:
        """(variables, eval batch of this host) -> the batch's Detections, as jax arrays still
        being computed (`evaluation.Evaluator` takes this host's rows when it needs them)."""
        def predict(variables, local):
            return self.eval(variables, self.global_batch(local, ("image",))["image"])

        return predict


def make_eval_step(model: Any, detect_kwargs: dict[str, Any], mesh: Any | None = None,
                   compiler_options: dict[str, Any] | None = None) -> EvalStep:
    """The data-parallel evaluation step (`EvalStep`) over `mesh` (default: all devices).
    `compiler_options` go to `jax.jit` (tests compile unoptimized:
    {"xla_backend_optimization_level": 0})."""
    import functools

    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ssd_jax import priors

    mesh = mesh or jax.make_mesh((jax.device_count(),), ("data",))
    step = functools.partial(detect_images, model,
                             prior_boxes=priors.generate_priors(model.prior_spec), **detect_kwargs)
    def eval_step(variables, images):  # this device's shard of the batch
        return step(variables, images)

    mapped = jax.shard_map(eval_step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    return EvalStep(mesh=mesh, eval=jax.jit(mapped, compiler_options=compiler_options),
                    replicated=NamedSharding(mesh, P()), data=NamedSharding(mesh, P("data")))


def _moved_data_error(e: ConfigError, run: Run) -> ConfigError:
    """`e` about a dataset path of the run's own config, said as one: the path came from
    run_info.json, and how to give the data's place now."""
    import re

    from ssd_jax import config as config_lib

    m = re.match(r"config\.dataset\.(\w+)=", str(e))
    if m is None or m.group(1) not in config_lib.PATH_FIELDS:
        return e
    name, path = m.group(1), str(run.config.dataset[m.group(1)])
    where = ("a relative path, read from the folder the run was started in (runs store "
             "absolute paths since 2026-12)" if not os.path.isabs(path) and "://" not in path
             else "the data has moved since")
    return ConfigError(
        f"{e}: the path is the run's ({os.path.join(run.workdir, 'run_info.json')}), {where}. "
        f"Give the data's place now: --config.dataset.{name}=PATH on the ssd-evaluate command "
        f"line, or evaluate_run(run, dataset_config=...) with it")


def evaluate_run(run: Run, *, dataset_config: Any | None = None, max_boxes: int | None = None,
                 metric: str | None = None, batch_size: int | None = None,
                 progress: bool = True, split: str = "eval") -> dict[str, Any]:
    """The training loop's evaluation (`evaluation.Evaluator` over the shard_mapped eval step)
    of a run's checkpoint, on its eval data or `dataset_config` (same classes); split="test":
    the held-out test split of synthetic data (what the training command reports last).

    Returns {"metrics": the evaluator's result, "step", "metric", "class_names", "curves":
    {"precision", "recall", "AP", "num_gt"} per class (VOC matching at IoU 0.5), "results": COCO
    results in the dataset's image and category ids}. Imports TensorFlow (the eval data).
    """
    import jax

    from ssd_jax import config as config_lib
    from ssd_jax import evaluation, models
    from ssd_jax.data import pipeline
    from ssd_jax.errors import DataError

    config = run.config.copy_and_resolve_references()
    class_names = run.class_names
    with config.unlocked():
        if dataset_config is not None:
            config.dataset = dataset_config
        if max_boxes is not None:
            config.max_boxes = int(max_boxes)
        if metric is not None:
            config.metric = metric
        if batch_size is not None:
            config.eval_batch_size = int(batch_size)
    try:
        config_lib.validate(config, purpose="eval")
        data = pipeline.InputPipeline(config.dataset, splits=("eval",))
    except ConfigError as e:
        raise _moved_data_error(e, run) if dataset_config is None else e from None
    if split not in ("eval", "test"):
        raise ValueError(f"split must be 'eval' or 'test', got {split!r}")
    if split == "test":
        data.source("test")  # ConfigError where the dataset has no held-out test split
    if dataset_config is not None:
        info = data.info()
        if info.num_classes != run.model.num_classes:
            raise DataError(
                f"the dataset of --config has {info.num_classes} classes (with background) but "
                f"the checkpoint in {run.workdir} was trained with num_classes="
                f"{run.model.num_classes}")
        if tuple(info.class_names) != tuple(class_names):
            print(f"warning: the dataset's class names {info.class_names} differ from the run's "
                  f"{class_names}; reporting the dataset's", file=sys.stderr)
            class_names = tuple(info.class_names)
    model = models.from_config(config, run.model.num_classes)
    steps = make_eval_step(model, dict(config.detect))
    variables = jax.device_put({"params": run.variables["params"],
                                "batch_stats": run.variables.get("batch_stats", {})},
                               steps.replicated)
    n_proc = jax.process_count()
    batches = data.eval_iterator(image_size=model.prior_spec.image_size,
                                 batch_size=config.eval_batch_size // n_proc,
                                 max_boxes=config.max_boxes, process_index=jax.process_index(),
                                 process_count=n_proc, split=split)
    evaluator = evaluation.Evaluator(steps.predict_fn(), batches, num_classes=model.num_classes,
                                     metric=config.metric, class_names=class_names,
                                     progress=progress)
    metrics = evaluator.run(variables)
    gts, dets = evaluator.accumulator.records()  # every process's images, as result() scored
    # per-class curves: VOC matching at IoU 0.5; the AP is VOC07's for voc07, else the area AP
    curves = evaluation.evaluate_voc(gts, dets, model.num_classes,
                                     use_07_metric=config.metric == "voc07", return_curves=True)
    num_gt = []
    for c in range(1, model.num_classes):
        n = 0
        for gt in gts:
            sel = np.asarray(gt["labels"]) == c
            difficult = np.asarray(gt.get("difficult", np.zeros(sel.shape, bool)), bool)
            n += int(np.sum(sel & ~difficult))
        num_gt.append(n)
    curves["num_gt"] = num_gt
    category_ids = run.category_ids if dataset_config is None else data.info().category_ids
    return {"metrics": metrics, "step": run.step, "metric": config.metric,
            "class_names": list(class_names), "curves": curves,
            "results": evaluator.accumulator.coco_results(category_ids),
            "input": data.summary(), "split": split}


def write_eval_report(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """metrics.json, detections.json (COCO results in the dataset's ids) and pr_curves.png in
    `out_dir`; returns their paths. The per-class table is `evaluation.per_class_table`."""
    import math

    from ssd_jax import evaluation
    from ssd_jax.data import visualize

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir={out_dir} is a file; give a folder", parameter="out_dir")
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
    paths = {"metrics": os.path.join(out_dir, "metrics.json"),
             "detections": os.path.join(out_dir, "detections.json"),
             "pr_curves": os.path.join(out_dir, "pr_curves.png")}
    with open(paths["metrics"], "w") as f:
        json.dump(payload, f, indent=2)
    with open(paths["detections"], "w") as f:
        json.dump(report.get("results", []), f)
    head = evaluation.headline(metric)
    visualize.plot_pr_curves(names, curves["precision"], curves["recall"], curves["AP"],
                             paths["pr_curves"],
                             title=f"step {report['step']}: {metric} {head} "
                                   f"{report['metrics'].get(head, float('nan')):.4f}")
    return paths
