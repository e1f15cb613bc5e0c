"""`train_and_evaluate(config, workdir)`: the whole run, callable from a notebook;
`experiments/train.py` is its command line.

Everything the user can get wrong is checked before anything is written or compiled (the config,
the workdir, the data); then the steps compile while the data loads, the loop runs the
data-parallel step (`ssd_jax.train.step`), logs, evaluates and checkpoints, and a stop (Ctrl-C,
SIGTERM, a lost process) keeps the work done (`ssd_jax.train.hooks`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax import config as config_lib
from ssd_jax import distributed, evaluation, models
from ssd_jax import workdir as workdir_lib
from ssd_jax.errors import (
    LostProcessError,
    NonFiniteLossError,
    TrainingInterrupted,
    UserError,
)
from ssd_jax.host import release_freed_memory
from ssd_jax.train import hooks
from ssd_jax.train import state as state_lib
from ssd_jax.train import step as step_lib
from ssd_jax.train.state import TrainState
from ssd_jax.train.step import eval_variables, train_batch_spec

log = logging.getLogger(__name__)


def train_and_evaluate(config: Any, workdir: str) -> tuple[TrainState, dict[str, Any]]:
    """Train (resuming from WORKDIR if it holds a checkpoint) and evaluate.

    Returns the final state (replicated over the mesh) and the final evaluation metrics. Writes
    WORKDIR/checkpoints (orbax), run_info.json, train.log, TensorBoard events and PNGs of
    validation detections. Everything the user can get wrong is checked before anything is
    written or compiled: the config (ConfigError), the workdir (WorkdirMismatchError: another
    run's config, not writable) and the data (DataError: no usable box).
    """
    from ssd_jax.data import pipeline

    config = config.copy_and_resolve_references()  # the caller's config stays as it was
    config_lib.resolve_paths(config.dataset)  # run_info.json holds paths valid from any folder
    config_lib.validate(config)
    workdir = os.path.abspath(workdir)
    workdir_lib.check_workdir(workdir, config)
    data = pipeline.InputPipeline(config.dataset)
    info = data.info()  # reads the annotations: DataError here, before any compile
    init = None  # config.init_checkpoint, read and checked to fit (on shapes) before any write
    if workdir_lib.latest_step(workdir) is None:
        init = state_lib.load_init(config, models.from_config(config, info.num_classes),
                                   info.class_names)
    log = hooks.WorkdirLog(workdir)
    manager = workdir_lib.checkpoint_manager(workdir, config.keep_checkpoints)
    run = _Run(config, workdir, data, info, manager, init)
    if run.is_lead:
        print(f"workdir {workdir}\n  checkpoints: {manager.directory}\n"
              f"  TensorBoard: tensorboard --logdir {workdir}\n  pictures: {run.samples_png}\n"
              f"  log: {log.path}", flush=True)

    def lost(message: str) -> str:
        return (f"{message}; {workdir_lib.last_checkpoint_message(manager)}; run the same "
                "commands again on every host to resume from it")

    # multi-process runs: a lost process stops the others (distributed.Watchdog)
    watchdog = distributed.Watchdog(timeout=config.lost_process_timeout,
                                    on_lost=lambda m: distributed.exit_lost(lost(m)))
    try:
        run.build()
        run.train()
        return run.state, run.finish()
    except Exception as e:
        # a collective that failed because another process is gone (gloo: "connection reset")
        message = None if isinstance(e, UserError) or jax.process_count() == 1 else \
            watchdog.lost_now()
        if message is not None:
            raise LostProcessError(lost(message)) from None
        raise
    finally:
        watchdog.stop()
        data.close()
        manager.close()
        log.close()


class _Run:
    """One call of `train_and_evaluate`: its parts, built in order, and the loop."""

    def __init__(self, config: Any, workdir: str, data: Any, info: Any, manager: Any,
                 init: state_lib.Init | None = None):
        self.config, self.workdir, self.data, self.info, self.manager, self.init = \
            config, workdir, data, info, manager, init
        self.is_lead = jax.process_index() == 0
        self.n_proc = jax.process_count()
        self.samples_png = os.path.join(workdir, "samples")
        self.last_eval: dict[str, Any] = {}
        self.t_start = time.perf_counter()

    def build(self) -> None:
        """Model, steps and state (compiled while the synthetic data generates), evaluator,
        run_info.json, the data iterator at the resumed step, the metric writer."""
        from clu import metric_writers  # imports TensorFlow: the module stays importable without

        config, data, info = self.config, self.data, self.info
        model = models.from_config(config, info.num_classes, axis_name="data")
        self.size = size = model.prior_spec.image_size
        # the synthetic images are generated in worker processes while the steps compile
        data.start_loading(train_image_size=size)
        tx = state_lib.create_optimizer(config)
        self.steps = step_lib.make_steps(config, model, tx)
        self.local_batch = config.batch_size // self.n_proc
        self.local_eval_batch = config.eval_batch_size // self.n_proc
        hint = state_lib.pretrained_backbone_hint(config, resuming=self.manager.latest_step() is not None)
        if hint:
            log.warning(hint)
        fresh = state_lib.create_train_state(config, model, tx, self.info.class_names, self.init,
                                             use_init_checkpoint=self.init is not None)
        self.state = state_lib.restore_or_init(self.manager, fresh, self.steps.replicated)
        step_lib.compile_steps(self.steps, self.state, config, size)
        # XLA's compiles leave ~0.5 GB of freed heap: back to the OS before the data is read (the
        # synthetic images are generated meanwhile into a buffer this process touches only when
        # it reads them), so the two never add up in the peak.
        release_freed_memory()
        self.evaluator = self._evaluator("eval", config.num_eval_images_to_draw)
        previous = workdir_lib.previous_topology(self.workdir)
        workdir_lib.save_run_info(self.workdir, config, info.num_classes, info.class_names,
                                  info.category_ids)
        self.start_step = int(jax.device_get(self.state.step))
        if self.start_step > 0 and previous and previous != workdir_lib.topology():
            log.warning(
                "resuming step %d on %d process(es) with %d device(s) in all; the run was last "
                "started on %d process(es) with %d device(s). The global batch and its order are "
                "the same, split differently: the result equals an uninterrupted run up to "
                "float32 rounding, not bit for bit (README: multi-host)", self.start_step,
                jax.process_count(), jax.device_count(), previous["processes"],
                previous["devices"])
        self.train_keys = tuple(train_batch_spec(config, size))  # the fields the step takes
        self.train_iter = data.train_iterator(
            image_size=size, batch_size=self.local_batch, max_boxes=config.max_boxes,
            seed=config.seed, start_step=self.start_step, process_index=jax.process_index(),
            process_count=self.n_proc)
        self.writer = metric_writers.create_default_writer(self.workdir,
                                                           just_logging=not self.is_lead)
        if self.start_step == 0:
            self.writer.write_hparams({k: v for k, v in config.to_dict().items()
                                       if isinstance(v, int | float | str | bool)})
        os.makedirs(self.samples_png, exist_ok=True)

    def _evaluator(self, split: str, num_draw: int) -> evaluation.Evaluator:
        batches = self.data.eval_iterator(
            image_size=self.size, batch_size=self.local_eval_batch,
            max_boxes=self.config.max_boxes, process_index=jax.process_index(),
            process_count=self.n_proc, **({"split": split} if split != "eval" else {}))
        return evaluation.Evaluator(self.steps.predict_fn(), batches,
                                    num_classes=self.info.num_classes, metric=self.config.metric,
                                    class_names=self.info.class_names, num_draw=num_draw)

    # ------------------------------------------------------------------------- the loop

    def train(self) -> None:
        """The steps from the resumed one to config.num_train_steps, then the last checkpoint
        and evaluation; Ctrl-C / SIGTERM stop at a step boundary (`hooks.StopOnInterrupt`)."""
        config, total = self.config, int(self.config.num_train_steps)
        log.info("training %s on %s (%d classes) for %d steps, batch %d over %d devices; "
                     "starting at step %d", config.model.name, config.dataset.kind,
                     self.info.num_classes, total, config.batch_size, jax.device_count(),
                     self.start_step)
        if self.start_step > total:
            log.warning("the workdir's checkpoint (step %d) is past config.num_train_steps="
                            "%d: nothing to train; evaluating that checkpoint", self.start_step,
                            total)
        self.done = self.start_step
        self.progress = _Progress(self, state_lib.learning_rate_schedule(config))
        stop = hooks.StopOnInterrupt()
        try:
            for step in range(self.start_step, total):
                stop.check(step)
                self._step(step)
            if self.start_step < total and self.manager.latest_step() != total:
                hooks.save_if_finite(self.manager, self.state, total)
            stop.check()
            self.last_eval = self.evaluate(max(total, self.start_step))
        except KeyboardInterrupt as e:
            raise self._interrupted(e, stop) from None
        finally:
            stop.restore()

    def _step(self, step: int) -> None:
        config, total = self.config, int(self.config.num_train_steps)
        batch = self.steps.global_batch(next(self.train_iter), self.train_keys)
        with jax.transfer_guard("disallow"):
            self.state, metrics = self.steps.train(self.state, batch)
        self.done = done = step + 1
        self.progress.add(metrics)
        if done % config.log_every_steps == 0 or done == total:
            self.progress.report(step)
        if config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0 \
                and done < total:
            hooks.save_if_finite(self.manager, self.state, done)
        if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total:
            self.last_eval = self.evaluate(done)
            log.info("eval at step %d: %s", done, _summary(self.last_eval, config.metric))

    def _interrupted(self, e: KeyboardInterrupt, stop: hooks.StopOnInterrupt
                     ) -> TrainingInterrupted:
        """The error to stop with; at a step boundary (`state` is step `done`'s) the work done
        since the last checkpoint is saved first (several processes save together at the step
        they agreed on after SIGTERM; after Ctrl-C each would stop at its own step: they keep the
        last periodic checkpoint)."""
        saved, done = "", self.done
        agreed = self.n_proc == 1 or (stop.synced and stop.requested == "SIGTERM")
        if isinstance(e, hooks.StopRequested) and agreed and done > 0 \
                and self.manager.latest_step() != done:
            try:
                hooks.save_if_finite(self.manager, self.state, done)
                saved = " (saved now)"
            except NonFiniteLossError as bad:
                saved = f" ({bad})"
        by = f" by {stop.requested}" if stop.requested else ""
        if agreed and self.n_proc > 1:
            by += " (a preemption notice to one of the processes: all stopped at this step)"
        return TrainingInterrupted(
            f"interrupted{by} at step {done}; "
            f"{workdir_lib.last_checkpoint_message(self.manager)}{saved}; run the same command "
            "to resume", signal_name=stop.requested or "SIGINT")

    # ------------------------------------------------------------------------- reports

    def report_input(self, step: int) -> None:
        self.writer.write_scalars(step, {f"input/{split}/{k}": v
                                         for split, counts in self.data.split_stats.items()
                                         for k, v in counts.items()})
        log.info("input at step %d: %s", step, self.data.summary())

    def evaluate(self, step: int) -> dict[str, Any]:
        """The evaluator's result at `step`, written to TensorBoard with a picture of samples."""
        result = self.evaluator.run(eval_variables(self.state))
        self.writer.write_scalars(step, _scalars(result, "eval"))
        self.report_input(step)
        samples = self.evaluator.samples
        if samples is not None and self.is_lead:
            from PIL import Image

            from ssd_jax.data import visualize

            path = os.path.join(self.samples_png, f"detections_step{step:07d}.png")
            visualize.save_sample_grid(samples, self.info.class_names, path,
                                       score_threshold=self.config.draw_score_threshold)
            picture = np.asarray(Image.open(path).convert("RGB"))
            self.writer.write_images(step, {"eval/detections": picture[None]})
        return result

    def finish(self) -> dict[str, Any]:
        """The final lines (and the held-out test split's evaluation where there is one);
        returns the final evaluation's metrics."""
        config = self.config
        last = max(int(config.num_train_steps), self.start_step)
        log.info("final eval at step %d: %s", last, _summary(self.last_eval, config.metric))
        final = f"validation {_summary(self.last_eval, config.metric)}"
        if self.data.has_test_split:
            test = self._evaluator("test", 0).run(eval_variables(self.state))
            self.writer.write_scalars(last, _scalars(test, "test"))
            log.info("held-out test split at step %d: %s", last, _summary(test, config.metric))
            final = f"held-out test {_summary(test, config.metric)}; {final}"
            self.last_eval = {**self.last_eval, "test": test}
        self.writer.flush()
        elapsed = time.perf_counter() - self.t_start
        if self.is_lead:
            warnings = "".join(f"\n  warning: {w}" for w in self.data.warnings)
            print(f"\nDone in {_fmt_duration(elapsed)}: {final}\n"
                  f"  input: {self.data.summary()}{warnings}\n"
                  f"  checkpoints: {self.manager.directory}\n"
                  f"  TensorBoard: tensorboard --logdir {self.workdir}\n"
                  f"  sample pictures: {self.samples_png}", flush=True)
        return self.last_eval


class _Progress:
    """Sums the step metrics on the device and reports their means every log_every_steps: the
    progress line, TensorBoard scalars; a non-finite loss stops the run."""

    def __init__(self, run: _Run, schedule: Any):
        self.run, self.schedule = run, schedule
        self.sum: dict[str, jax.Array] | None = None
        self.n, self.t_last, self.step_last = 0, time.perf_counter(), run.start_step

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.sum = metrics if self.sum is None else jax.tree.map(jnp.add, self.sum, metrics)
        self.n += 1

    def report(self, step: int) -> None:
        run, config = self.run, self.run.config
        done, total = step + 1, int(config.num_train_steps)
        means = {f"train/{k}": float(v) / self.n for k, v in jax.device_get(self.sum).items()}
        if not math.isfinite(means["train/loss"]):
            raise NonFiniteLossError(
                f"non-finite training loss {means['train/loss']} in steps "
                f"{done - self.n + 1}..{done}; stopping: "
                f"{workdir_lib.last_checkpoint_message(run.manager)}. "
                "Lower config.learning_rate or set config.grad_clip_norm.")
        now = time.perf_counter()
        rate = (done - self.step_last) * config.batch_size / max(now - self.t_last, 1e-9)
        means["train/learning_rate"] = float(self.schedule(step))
        means["train/images_per_sec"] = rate
        run.writer.write_scalars(done, means)
        eta = (total - done) * config.batch_size / max(rate, 1e-9)
        log.info("step %d/%d (%.0f%%) loss %.4f (conf %.4f, loc %.4f) %.1f img/s ETA %s",
                     done, total, 100 * done / total, means["train/loss"],
                     means["train/conf_loss"], means["train/loc_loss"], rate, _fmt_duration(eta))
        self.sum, self.n, self.t_last, self.step_last = None, 0, now, done


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _scalars(result: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite number entries of an evaluator's result, as TensorBoard scalars PREFIX/name."""
    return {f"{prefix}/{k}": v for k, v in result.items()
            if isinstance(v, int | float) and not math.isnan(v)}


def _summary(result: dict[str, Any], metric: str) -> str:
    key = evaluation.headline(metric)
    value = result.get(key)
    return f"{metric} {key} = {value:.4f}" if isinstance(value, float) else str(result)
