"""A training run's folder: the one module that knows its layout.

    WORKDIR/run_info.json     the config, class names, dataset category ids, last topology
    WORKDIR/checkpoints/<N>/  orbax checkpoints of the TrainState (atomic: temp dir + rename)
    WORKDIR/train.log         every log line of the run; TensorBoard events; samples/ pictures

Used by the trainer (check before writing, save, resume) and by inference/export (read a run
and restore its checkpoint into any topology), so serving never imports the trainer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any

import jax

from ssd_jax.errors import UserError, WorkdirMismatchError, first_line

RUN_INFO = "run_info.json"
CHECKPOINTS = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


# ----------------------------------------------------------------------------- run_info.json


def read_run_info(workdir: str) -> dict[str, Any] | None:
    """WORKDIR/run_info.json as a dict, or None when there is none."""
    path = os.path.join(workdir, RUN_INFO)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            info = json.load(f)
        if not isinstance(info, dict) or not isinstance(info.get("config"), dict) or \
                "num_classes" not in info or "class_names" not in info:
            raise ValueError("missing config, num_classes or class_names")
    except (ValueError, UnicodeDecodeError) as e:
        raise WorkdirMismatchError(f"{path} is damaged ({e}); it is written only by a training "
                                   "run: restore it or use a new workdir") from None
    return info


def require_run_info(workdir: str) -> dict[str, Any]:
    """run_info.json of a finished or running training run; UserError (parameter "workdir")
    when `workdir` is not one."""
    if not os.path.isdir(workdir):
        raise UserError(f"workdir={workdir}: no such folder", parameter="workdir")
    info = read_run_info(workdir)
    if info is None:
        raise UserError(f"workdir={workdir} is not a training workdir of ssd_jax (no {RUN_INFO}); "
                        "give the workdir a training run wrote", parameter="workdir")
    return info


def read_run_config(workdir: str) -> Any:
    """The config the run in `workdir` was trained with, as a ConfigDict."""
    import ml_collections

    return ml_collections.ConfigDict(require_run_info(workdir)["config"])


def topology() -> dict[str, int]:
    return {"processes": jax.process_count(), "devices": jax.device_count()}


def previous_topology(workdir: str) -> dict[str, int] | None:
    """The process and device counts of the last start of the run in WORKDIR (run_info.json)."""
    return (read_run_info(workdir) or {}).get("topology")


def save_run_info(workdir: str, config: Any, num_classes: int, class_names: tuple[str, ...],
                  category_ids: tuple[int, ...] = ()) -> None:
    """WORKDIR/run_info.json (process 0, atomically): the config, class names and the dataset's
    category ids, so predict/evaluate rebuild the model and report results in the dataset's ids."""
    import ssd_jax

    if jax.process_index() != 0:
        return
    info = {"config": json.loads(config.to_json_best_effort()), "num_classes": num_classes,
            "class_names": list(class_names),
            "category_ids": [int(c) for c in category_ids] or list(range(1, num_classes)),
            "ssd_jax_version": ssd_jax.__version__, "topology": topology()}
    tmp = os.path.join(workdir, RUN_INFO + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(workdir, RUN_INFO))


def check_workdir(workdir: str, config: Any) -> None:
    """Before a run touches `workdir`: it must be a writable folder (or creatable), and a run
    already there must have the same config but for `config.RESUMABLE_FIELDS` (else
    WorkdirMismatchError listing the fields that differ). Writes nothing but the folder."""
    import uuid

    from ssd_jax import config as config_lib

    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirMismatchError(f"workdir={workdir} is a file; give a folder",
                                   parameter="workdir")
    info = read_run_info(workdir) if os.path.isdir(workdir) else None
    if info is not None:
        diffs = config_lib.differences(info.get("config", {}), config)
        if diffs:
            shown = "\n  ".join(diffs[:12]) + ("\n  ..." if len(diffs) > 12 else "")
            raise WorkdirMismatchError(
                f"workdir={workdir} holds a run with another config; to resume it, use the "
                f"same values (they are in {os.path.join(workdir, RUN_INFO)}); for a new run, "
                f"use a new workdir. Fields that differ:\n  {shown}", parameter="workdir")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe_{jax.process_index()}_{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise WorkdirMismatchError(f"workdir={workdir}: cannot write there ({e.strerror or e}); "
                                   "choose a folder you can write", parameter="workdir") from None


# ----------------------------------------------------------------------------- checkpoints


@contextlib.contextmanager
def keep_root_handlers():
    """Undoes what orbax does to the root logger inside the block: orbax logs through absl, and
    absl calls `logging.basicConfig()` when the root logger has no handler yet (outside the
    commands, which install absl's), so a notebook's own `logging.basicConfig(...)` later did
    nothing. Handlers the block added to the root logger are removed at its end."""
    import logging

    before = list(logging.root.handlers)
    try:
        yield
    finally:
        for handler in logging.root.handlers[:]:
            if handler not in before:
                logging.root.removeHandler(handler)


def orbax_checkpoint() -> Any:
    """`orbax.checkpoint`, imported inside `keep_root_handlers` (its import logs too)."""
    with keep_root_handlers():
        import orbax.checkpoint as ocp
    return ocp


def checkpoint_manager(workdir: str, keep: int | None = None, create: bool = True) -> Any:
    """Orbax manager of WORKDIR/checkpoints: atomic synchronous saves, keep the last `keep`."""
    ocp = orbax_checkpoint()

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=False)
    with keep_root_handlers():
        return _quiet_manager_class(ocp)(checkpoint_dir(workdir), options=options,
                                         item_handlers=ocp.StandardCheckpointHandler())


@functools.cache
def _quiet_manager_class(ocp: Any) -> type:
    """orbax's CheckpointManager whose calls leave the root logger as they found it
    (`keep_root_handlers`): saving, restoring and closing log through absl too."""

    def quiet(name: str):
        method = getattr(ocp.CheckpointManager, name)

        @functools.wraps(method)
        def wrapped(self, *args, **kwargs):
            with keep_root_handlers():
                return method(self, *args, **kwargs)
        return wrapped

    names = ("save", "restore", "close", "wait_until_finished", "item_metadata", "all_steps",
             "latest_step", "reload")
    return type("CheckpointManager", (ocp.CheckpointManager,),
                {n: quiet(n) for n in names if hasattr(ocp.CheckpointManager, n)})


def save(manager: Any, step: int, state: Any) -> None:
    """Save `state` as checkpoint `step` and wait until it is on disk (every process calls)."""
    ocp = orbax_checkpoint()

    with keep_root_handlers():
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()


def restore_into(manager: Any, step: int, target: Any, sharding: Any | None = None) -> Any:
    """Checkpoint `step` with the tree structure, shapes and dtypes of `target` (arrays or
    ShapeDtypeStructs), placed with `sharding` (replicated over a mesh of all processes, say), or
    as `target`'s leaves are. Restored straight into that placement, whatever process and device
    count wrote it. WorkdirMismatchError when the checkpoint does not fit `target`."""
    ocp = orbax_checkpoint()

    if sharding is None:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    else:  # a device_put of restored arrays to a multi-process sharding is a cross-host transfer
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target)
    try:
        with keep_root_handlers():
            return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
        first = first_line(e)
        raise WorkdirMismatchError(
            f"the checkpoint of step {step} in {manager.directory} does not fit the model and "
            f"optimizer of this config ({first}). Use a new workdir, or the config the run "
            "was started with.") from None


def restore_on_this_host(manager: Any, step: int) -> dict[str, Any]:
    """Checkpoint `step` as saved (its own tree) with every array on this host's first device,
    whatever mesh and process count wrote it (`abstract_on_this_host`)."""
    ocp = orbax_checkpoint()

    abstract = abstract_on_this_host(manager.item_metadata(step))
    with keep_root_handlers():
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def abstract_on_this_host(metadata: Any) -> Any:
    """The saved tree of orbax checkpoint metadata (a CheckpointManager's item_metadata or a
    StandardCheckpointer's metadata) as ShapeDtypeStructs on this host's first device: a restore
    into it works whatever mesh and process count wrote the checkpoint (restoring with the saved
    shardings fails on another topology: a run trained on 8 devices or 2 processes, evaluated on
    a laptop; a checkpoint converted by one process, read by each process of a run)."""
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps saved in WORKDIR/checkpoints (complete ones only), oldest first; UserError
    (parameter "workdir") when there is none."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        raise UserError(f"workdir={workdir} has no checkpoints/ yet (the run has not saved one)",
                        parameter="workdir")
    steps = _complete_steps(workdir)
    if not steps:
        raise UserError(f"workdir={workdir} has no checkpoint yet (the run has not saved one)",
                        parameter="workdir")
    return steps


def latest_step(workdir: str) -> int | None:
    """The step of WORKDIR's latest complete checkpoint, None when it has none (or does not
    exist); creates nothing."""
    steps = _complete_steps(workdir)
    return steps[-1] if steps else None


def _complete_steps(workdir: str) -> list[int]:
    """The complete (renamed into place) checkpoints' steps, oldest first, read from the folder
    names alone: no CheckpointManager, whose constructor is a barrier of all processes. The
    processes of one run ask this at different moments (one may already have created
    checkpoints/): a manager built only where the folder existed joined a barrier the others
    never reached (a multi-process start failed with 'sync_global_devices name mismatch')."""
    ocp = orbax_checkpoint()
    return sorted(ocp.utils.checkpoint_steps(checkpoint_dir(workdir)))


def last_checkpoint_message(manager: Any) -> str:
    step = manager.latest_step()
    return (f"the last checkpoint is step {step} in {manager.directory}" if step is not None
            else "no checkpoint was written yet (a rerun starts from step 0)")
