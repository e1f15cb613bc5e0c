"""Training: configs, overfitting, 1 vs 8 devices, 1 vs 2 processes, exact resume, bad configs."""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

from experiments.configs import default
from ssd_jax import config as config_lib
from ssd_jax import models, train
from ssd_jax.errors import WorkdirMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config() -> ml_collections.ConfigDict:
    """The default config shrunk to seconds: few tiny synthetic images, a few steps."""
    config = default.get_config()
    config.dataset.num_train = 48
    config.dataset.num_eval = 12
    config.dataset.num_test = 8
    config.dataset.image_size = 128
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 6
    config.warmup_steps = 2
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 0
    config.num_eval_images_to_draw = 2
    config.dataset.generate_processes = 0  # a few images: no worker processes (tested below)
    return config


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra)
    return env


def _run_script(script: str, timeout: int = 600, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                          env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def _restore_params(workdir: str) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
        restored = mngr.restore(mngr.latest_step())
        step = mngr.latest_step()
    flat = jax.tree_util.tree_leaves_with_path(restored["params"])
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}, step


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("field,value,match", [
    ("dataset.kind", "imagenet", "config.dataset.kind"),
    ("batch_size", 10, "config.batch_size"),  # not divisible by 4 devices (below)
    ("model.name", "resnet", "config.model.name"),
    ("dtype", "float64", "config.dtype"),
    ("model.num_maps", 4, "num_maps"),
    ("model.width", 2, "no option width"),
])
def test_bad_config_is_a_clear_error(field, value, match):
    config = tiny_config()
    parent, _, leaf = field.rpartition(".")
    (config[parent] if parent else config)[leaf] = value
    with pytest.raises(ValueError, match=match):
        config_lib.validate(config, num_devices=4, num_processes=1)


def test_missing_data_dir_fails_before_any_compile(tmp_path, monkeypatch):
    config = importlib.import_module("experiments.configs.ssd300_voc").get_config()

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before the config was checked")

    monkeypatch.setattr(train.step, "make_steps", no_compile)
    monkeypatch.setattr(train.state, "create_train_state", no_compile)
    with pytest.raises(ValueError, match="data_dir"):
        train.train_and_evaluate(config, str(tmp_path))
    config.dataset.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nowhere"):
        train.train_and_evaluate(config, str(tmp_path))


# ----------------------------------------------------------------------------- learning


def test_loss_falls_when_overfitting_a_fixed_batch():
    from ssd_jax.data import pipeline

    config = tiny_config()
    config.learning_rate = 3e-3
    config.warmup_steps = 0
    config.schedule = "piecewise"
    info = pipeline.get_dataset_info(config.dataset)
    model = models.from_config(config, info.num_classes, axis_name="data")
    tx = train.create_optimizer(config)
    steps = train.make_steps(config, model, tx)
    it = pipeline.create_train_iterator(config.dataset, image_size=model.prior_spec.image_size,
                                        batch_size=8, max_boxes=config.max_boxes, seed=0)
    batch = steps.global_batch(next(it), ("image", "boxes", "labels"))
    state = jax.device_put(train.create_train_state(config, model, tx), steps.replicated)
    losses = []
    for _ in range(40):
        state, metrics = steps.train(state, batch)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.5 * first, losses
    # "steadily": the smoothed curve goes down over each quarter of the run
    quarters = [np.mean(q) for q in np.array_split(np.array(losses), 4)]
    assert all(b < a for a, b in zip(quarters, quarters[1:])), quarters


def test_embedded_default_runs_end_to_end(tmp_path, monkeypatch):
    from ssd_jax.data import sources

    config = tiny_config()
    config.dataset.generate_processes = 2  # the default's
    events = []  # compiles of the steps, starts and reads of the synthetic splits, in order
    start, table = sources.start_synthetic, sources.synthetic_table
    monkeypatch.setattr(sources, "start_synthetic", lambda cfg, split, *a: events.append(
        f"start {split}") or start(cfg, split, *a))
    monkeypatch.setattr(sources, "synthetic_table", lambda cfg, split, job=None, *a: events.append(
        f"read {split}{'' if job is None else ' (started)'}") or table(cfg, split, job, *a))

    class Compiles(logging.Handler):
        def emit(self, record):
            for step in ("train_step", "eval_step"):
                if record.getMessage().startswith(f"Compiling jit({step})"):
                    events.append(f"compile {step}")

    handler = Compiles(logging.WARNING)
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles():
            state, metrics = train.train_and_evaluate(config, str(tmp_path))
    finally:
        logging.getLogger("jax").removeHandler(handler)
    # the worker processes start generating the training and validation images, then each step
    # compiles once, and only then are the images read (the compile's memory is returned to the
    # OS before this process touches them: the default's peak RSS); the held-out test split is
    # generated after training
    assert config.dataset.generate_processes == 2
    assert events[:4] == ["start train", "start eval", "compile train_step",
                          "compile eval_step"], events
    assert sorted(events[4:6]) == ["read eval (started)", "read train (started)"], events
    assert events[6:] == ["read test", "start test"], events
    assert int(state.step) == config.num_train_steps
    assert 0.0 <= metrics["mAP"] <= 1.0
    # the held-out test split is evaluated once, after training, on its own images
    assert metrics["test"]["num_images"] == config.dataset.num_test != metrics["num_images"]
    assert 0.0 <= metrics["test"]["mAP"] <= 1.0
    assert os.path.isdir(tmp_path / "checkpoints" / str(config.num_train_steps))
    assert any(f.endswith(".png") for f in os.listdir(tmp_path / "samples"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_non_finite_loss_stops_with_the_step_named(tmp_path):
    config = tiny_config()
    config.learning_rate = 1e30
    config.warmup_steps = 0
    config.schedule = "piecewise"
    config.optimizer = "sgd"
    config.checkpoint_every_steps = 0
    # before any checkpoint: the message says so (it said "step None")
    with pytest.raises(FloatingPointError, match=r"in steps 1\.\.2; stopping: no checkpoint was "
                       r"written yet \(a rerun starts from step 0\)") as e:
        train.train_and_evaluate(config, str(tmp_path))
    assert "None" not in str(e.value)


def test_workdir_with_another_config_is_refused_before_it_is_touched(tmp_path, monkeypatch):
    # three runs of a workdir: compiled without backend optimizations (what is tested is the
    # workdir's bookkeeping, not the numbers)
    monkeypatch.setattr(train.step, "make_steps", functools.partial(
        train.step.make_steps, compiler_options={"xla_backend_optimization_level": 0}))
    config = tiny_config()
    config.num_train_steps = 2
    config.checkpoint_every_steps = 0
    train.train_and_evaluate(config, str(tmp_path))
    before = {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)}
    info = (tmp_path / "run_info.json").read_bytes()
    changed = tiny_config()
    changed.model.width_mult = 0.5
    changed.learning_rate = 0.5
    with pytest.raises(WorkdirMismatchError,
                       match=r"(?s)learning_rate: 0.01 in the workdir, 0.5 now.*model.width_mult: "
                             r"1.0 in the workdir, 0.5 now"):
        train.train_and_evaluate(changed, str(tmp_path))
    assert (tmp_path / "run_info.json").read_bytes() == info
    assert {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)} == before
    # run length, logging and eval cadence may change: the same run goes on
    longer = tiny_config()
    longer.num_train_steps, longer.checkpoint_every_steps, longer.log_every_steps = 4, 0, 1
    state, _ = train.train_and_evaluate(longer, str(tmp_path))
    assert int(state.step) == 4
    # a checkpoint without its run_info.json (an older run): orbax's shape error becomes a message
    os.remove(tmp_path / "run_info.json")
    with pytest.raises(WorkdirMismatchError, match=r"checkpoint of step 4 .* does not "
                       r"fit the model and optimizer of this config"):
        train.train_and_evaluate(changed, str(tmp_path))


# ----------------------------------------------------------------------------- parallelism

_ONE_VS_EIGHT = """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import Mesh
    from ssd_jax import models, train
    from ssd_jax.data import pipeline
    from tests.test_train import tiny_config

    assert jax.device_count() == 8
    config = tiny_config()
    # SGD at a constant rate: parameter differences are gradient differences (Adam's
    # g / sqrt(v) would amplify float noise in near-zero gradients). Each leaf's update must also
    # agree to 0.1% of its size (BatchNorm's fast variance E[x^2] - E[x]^2 failed this at 1%).
    # A split batch compiles to other reductions, which can swap one hard negative at a near tie
    # (a ~1e-3 change of a few gradient entries): lr 0.005 keeps that within 1e-5.
    config.optimizer, config.schedule, config.warmup_steps = "sgd", "piecewise", 0
    config.learning_rate = 0.005
    config.dataset.canvas_size = 160
    info = pipeline.get_dataset_info(config.dataset)
    model = models.from_config(config, info.num_classes, axis_name="data")
    tx = train.create_optimizer(config)
    size = model.prior_spec.image_size
    # One step with the host augmentation. The device mode's step is this same program after
    # augment_on_device, whose batch is checked bit for bit below (measured once: its whole step
    # also agrees at this bound with flips and colour only; with zoom-out and crops, leaves
    # differed up to 0.7% of their update, flat mean-fill regions tying many hard negatives that
    # a split batch breaks differently, while the augmented batches were identical)
    it = pipeline.create_train_iterator(config.dataset, image_size=size, batch_size=8,
                                        max_boxes=config.max_boxes, seed=0)
    local = [next(it)]  # one step, as the issue asks
    keys = tuple(train.train_batch_spec(config, size))
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        steps = train.make_steps(config, model, tx, Mesh(np.array(devices), ("data",)))
        state = jax.device_put(train.create_train_state(config, model, tx),
                               steps.replicated)
        for b in local:
            state, metrics = steps.train(state, steps.global_batch(b, keys))
        results.append((jax.device_get(state.params), jax.device_get(state.batch_stats),
                        float(metrics["loss"])))
    (p1, s1, l1), (p8, s8, l8) = results
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    moved = 0.0
    p0 = jax.device_get(train.create_train_state(config, model, tx).params)
    for a, b, c in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), jax.tree.leaves(p0)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        update = float(np.abs(a - c).max())
        assert float(np.abs((a - c) - (b - c)).max()) <= 1e-3 * update + 1e-7
        moved = max(moved, update)
    assert moved > 5e-4, moved  # the step really changed the params
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    print("agree", l1, l8)

    # the full device augmentation of one batch: the same bits on 1 and on 8 devices
    from jax.sharding import PartitionSpec as P
    config.dataset.augment_on_device = True
    config.dataset.augment_expand = config.dataset.augment_crop = True
    batch = next(pipeline.create_train_iterator(config.dataset, image_size=size, batch_size=8,
                                                max_boxes=config.max_boxes, seed=0))
    rng = train.create_train_state(config, model, tx).rng
    outs = []
    for devices in (jax.devices()[:1], jax.devices()):
        fn = jax.shard_map(lambda b: train.augment_on_device(b, rng, config, size),
                           mesh=Mesh(np.array(devices), ("data",)), in_specs=P("data"),
                           out_specs=P("data"))
        outs.append(jax.device_get(jax.jit(fn)(batch)))
    for k in ("image", "boxes", "labels"):
        np.testing.assert_array_equal(outs[0][k], outs[1][k], err_msg=k)
    assert outs[0]["image"].shape == (8, size, size, 3)
    print("same augmented batch")
"""


def test_eight_devices_match_one_device():
    """One step on 1 and on 8 devices; and the device mode's augmented batch (each example's key
    from its global index) the same bits on 1 and 8 devices."""
    out = _run_script(_ONE_VS_EIGHT)
    assert "agree" in out and "same augmented batch" in out


# ----------------------------------------------------------------------------- resume

_TRAIN_ARGS = ["--config.dataset.num_train=48", "--config.dataset.num_eval=8",
               "--config.dataset.num_test=8",
               "--config.dataset.image_size=128", "--config.batch_size=8",
               "--config.eval_batch_size=8", "--config.num_train_steps=10",
               "--config.warmup_steps=2", "--config.log_every_steps=1",
               "--config.checkpoint_every_steps=3", "--config.eval_every_steps=0",
               "--config.num_eval_images_to_draw=0"]


def _train_cmd(workdir) -> list[str]:
    # the device mode with the full augmentation: a resumed step's augmentation keys must be the
    # uninterrupted run's (the host mode's stream resumes exactly: test_data_pipeline)
    return [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *_TRAIN_ARGS,
            "--config.dataset.augment_on_device=True", "--config.dataset.canvas_size=160",
            "--config.dataset.augment_expand=True", "--config.dataset.augment_crop=True"]


def test_resume_after_sigkill_is_exact(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(full), cwd=ROOT, env=_env(), check=True, capture_output=True,
                   timeout=600)
    proc = subprocess.Popen(_train_cmd(killed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    ckpt = killed / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_dir() and any(d.isdigit() and int(d) >= 3 for d in os.listdir(ckpt)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_train_cmd(killed), cwd=ROOT, env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resumed from checkpoint step" in resumed.stderr
    a, step_a = _restore_params(str(full))
    b, step_b = _restore_params(str(killed))
    assert step_a == step_b == 10
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_checkpoint_steps_read_the_folder_and_build_no_manager(tmp_path, monkeypatch):
    """The steps a workdir holds, as orbax's manager lists them (an unfinished save's temporary
    folder is not one), read without constructing a CheckpointManager: its constructor is a
    barrier of all processes, and the processes of one run ask at different moments."""
    import orbax.checkpoint as ocp

    from ssd_jax import workdir as workdir_lib

    with workdir_lib.checkpoint_manager(str(tmp_path)) as manager:
        for step in (1, 5):
            workdir_lib.save(manager, step, {"w": np.arange(3.0)})
        listed = sorted(manager.all_steps())
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234").mkdir()  # a save cut short

    def no_manager(*args, **kwargs):
        raise AssertionError("a CheckpointManager was built")

    monkeypatch.setattr(ocp.CheckpointManager, "__init__", no_manager)
    assert workdir_lib.checkpoint_steps(str(tmp_path)) == listed == [1, 5]
    assert workdir_lib.latest_step(str(tmp_path)) == 5
    assert workdir_lib.latest_step(str(tmp_path / "none")) is None


def test_sigint_and_sigterm_stop_at_the_next_step_boundary():
    """The handler the train loop installs: either signal sets a flag that the loop's check turns
    into a stop at a step boundary (where the state is saved); a second one interrupts at once;
    the previous handlers come back after training. (The command-line run: test_cli.)"""
    import threading

    assert threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGINT, signal.SIGTERM):
        stop = train.hooks.StopOnInterrupt()
        try:
            stop.check()  # nothing asked yet
            os.kill(os.getpid(), sig)
            assert stop.requested == sig.name
            with pytest.raises(train.hooks.StopRequested):
                stop.check()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # the handler runs between bytecodes of the main thread
                    pass
        finally:
            stop.restore()
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_fresh_vgg16_run_without_a_backbone_checkpoint_is_warned():
    """The README's own-data VOC line (--config=ssd300_voc, no init_checkpoint) trained VGG16 from
    random weights without a word; the run now says so at its start, and how to convert one."""
    config = importlib.import_module("experiments.configs.ssd300_voc").get_config()
    hint = train.pretrained_backbone_hint(config, resuming=False)
    assert "config.init_checkpoint is empty" in hint and "--kind=vgg16" in hint
    assert train.pretrained_backbone_hint(config, resuming=True) is None
    config.init_checkpoint = "ckpt"
    assert train.pretrained_backbone_hint(config, resuming=False) is None
    default = importlib.import_module("experiments.configs.default").get_config()
    assert train.pretrained_backbone_hint(default, resuming=False) is None  # from scratch


def test_show_data_in_the_device_mode_draws_what_the_step_trains_on():
    """ssd-show-data with augment_on_device drew the raw canvas (image top-left on black, boxes
    scaled to the canvas); it now augments the canvases with the run's key, as the train step
    does with TrainState.rng."""
    from ssd_jax.data import pipeline

    config = tiny_config()
    config.dataset.augment_on_device = True
    config.dataset.augment_expand = config.dataset.augment_crop = True
    info = pipeline.get_dataset_info(config.dataset)
    model = models.from_config(config, info.num_classes, axis_name="data")
    size = model.prior_spec.image_size
    it = pipeline.create_train_iterator(config.dataset, image_size=size, batch_size=4,
                                        max_boxes=config.max_boxes, seed=0)
    batch = next(it)
    assert batch["image"].shape[1] == config.dataset.canvas_size != size  # canvases
    shown = train.displayed_train_batch(config, batch, size)
    assert shown["image"].shape == (4, size, size, 3) and set(shown) >= {"boxes", "labels"}
    state = train.create_train_state(config, model, train.create_optimizer(config))
    trained = jax.device_get(train.augment_on_device(batch, state.rng, config, size))
    for k in ("image", "boxes", "labels"):
        np.testing.assert_array_equal(shown[k], trained[k])


def test_dataset_paths_are_one_folder_however_typed(tmp_path, monkeypatch):
    """Resuming with 'coco/val' where the run was started with 'coco/val/' (or with the absolute
    path) was refused as another config; paths are compared normalized and stored absolute."""

    monkeypatch.chdir(tmp_path)
    saved = default.get_config()
    saved.dataset.kind = "coco_json"
    saved.dataset.eval_images = "coco/val/"
    now = saved.copy_and_resolve_references()
    as_saved = json.loads(saved.to_json_best_effort())  # what run_info.json holds
    for typed in ("coco/val", str(tmp_path / "coco" / "val"), "./coco/../coco/val"):
        now.dataset.eval_images = typed
        assert config_lib.differences(as_saved, now) == [], typed
    now.dataset.eval_images = "coco/train"
    assert config_lib.differences(as_saved, now) == [
        f"dataset.eval_images: {str(tmp_path / 'coco/val')!r} in the workdir, "
        f"{str(tmp_path / 'coco/train')!r} now"]
    config_lib.resolve_paths(saved.dataset)
    assert saved.dataset.eval_images == str(tmp_path / "coco" / "val")
    assert saved.dataset.train_images == "" and config_lib.normalize_path("gs://b/x/") == "gs://b/x/"
