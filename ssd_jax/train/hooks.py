"""What the training loop does around the steps: stop at a step boundary on Ctrl-C or SIGTERM
(every process at one agreed step), save a checkpoint only of finite parameters, and write
every log line of the run into WORKDIR/train.log. Each installs its handler for the training
call only and restores what was there."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from ssd_jax import workdir as workdir_lib
from ssd_jax.errors import NonFiniteLossError


class StopRequested(KeyboardInterrupt):
    """A stop asked for by a signal, raised by `StopOnInterrupt.check` at a step boundary: the
    train state is that of the step reached, so it can be saved."""


class StopOnInterrupt:
    """Ctrl-C (SIGINT) or SIGTERM (what `timeout`, SLURM, Kubernetes, docker and preemptible
    cloud VMs send) during training: a flag the loop checks once per step, so the stop lands at a
    step boundary, where the state can be saved, and is never swallowed by a callback it happens
    to land in (JAX's GC callback ignores a KeyboardInterrupt); a second signal interrupts at once.
    Only in the main thread (signal handlers live there).

    Several processes (jax.distributed with its preemption service, on by default): SIGTERM is
    left to JAX's preemption notifier, which tells every process; `check(step)` then stops all of
    them at the same step (`multihost_utils.reached_preemption_sync_point`, called at every step
    by every process), where they save that step together. Ctrl-C stops each process where it is
    (they keep the last periodic checkpoint)."""

    def __init__(self):
        import signal
        import threading

        from jax._src import distributed as jax_distributed

        self.requested: str | None = None  # the name of the signal that asked for the stop
        self._previous: dict[int, Any] = {}
        self.synced = jax_distributed.global_state.preemption_sync_manager is not None
        signals = (signal.SIGINT,) if self.synced else (signal.SIGINT, signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal

        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def check(self, step: int | None = None) -> None:
        """Raises StopRequested when a signal asked for a stop; with several processes, also
        at the step all of them agreed on after a preemption notice (call with every step)."""
        if self.requested:
            raise StopRequested
        if self.synced and step is not None:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = "SIGTERM"
                raise StopRequested

    def restore(self) -> None:
        import signal

        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class WorkdirLog:
    """Every log record of the run into WORKDIR/train.log (ssd_jax's INFO lines and orbax's
    through absl included), for the training call only: `close` removes the handler and puts
    the levels it raised to INFO back."""

    def __init__(self, workdir: str):
        import logging as py_logging

        i = jax.process_index()
        self.path = os.path.join(workdir, "train.log" if i == 0 else f"train.{i}.log")
        self.handler = py_logging.FileHandler(self.path)
        self.handler.setFormatter(py_logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s"))
        self.root = py_logging.getLogger()
        self.root.addHandler(self.handler)
        # the run's own INFO lines reach the file whatever the process's logging configuration
        self.levels = {name: py_logging.getLogger(name).level for name in ("ssd_jax", "absl")}
        for name, level in self.levels.items():
            if level == py_logging.NOTSET or level > py_logging.INFO:
                py_logging.getLogger(name).setLevel(py_logging.INFO)

    def close(self) -> None:
        import logging as py_logging

        self.root.removeHandler(self.handler)
        self.handler.close()
        for name, level in self.levels.items():
            py_logging.getLogger(name).setLevel(level)


def save_if_finite(manager: Any, state: Any, step: int) -> None:
    """Checkpoint `step` of `state`, unless its parameters are not finite (NonFiniteLossError
    naming the last good checkpoint, which is kept)."""
    leaves = jax.tree.leaves(state.params)
    # numpy on the host copies: jnp.isfinite per leaf compiled one program per leaf shape (~9 s
    # for the 267 leaves of SSDLite on a 2-core CPU, at every checkpoint)
    finite = all(bool(np.isfinite(x).all()) for x in jax.device_get(leaves))
    if not finite:
        raise NonFiniteLossError(
            f"parameters became non-finite by step {step}; not saving: "
            f"{workdir_lib.last_checkpoint_message(manager)}.")
    workdir_lib.save(manager, step, state)
