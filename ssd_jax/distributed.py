"""Multi-process start-up (`jax.distributed.initialize` when the run spans several processes) and
the one helper that brings a batch-sharded global array back to this process's rows."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def _cluster_detected() -> bool:
    """TPU pod slices and SLURM jobs of several tasks are auto-detected by JAX."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Initialize jax.distributed when asked for explicitly or when a cluster is detected.

    On CPU (tests of the multi-host path) gloo collectives are selected first. Returns whether
    initialize was called.
    """
    explicit = coordinator_address is not None or num_processes is not None
    if not explicit and not _cluster_detected():
        return False
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        from ssd_jax.errors import UserError

        raise UserError("--coordinator_address, --num_processes and --process_id go together")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def host_local(x: Any) -> np.ndarray:
    """This process's rows of `x` in batch order, as numpy: a global batch-sharded jax.Array's
    addressable shards concatenated (a replicated shard once), anything else as is."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        shards: dict[Any, np.ndarray] = {}
        for s in x.addressable_shards:
            key = tuple((i.start or 0) for i in s.index) if s.index else ()
            shards.setdefault(key, np.asarray(s.data))
        return np.concatenate([shards[k] for k in sorted(shards)], axis=0)
    return np.asarray(jax.device_get(x))


# ----------------------------------------------------------------------------- lost processes

_ALIVE_DIR = "ssd_jax/alive/"


class Watchdog:
    """Notices a lost process of a multi-process run, so that the others stop with a message
    naming it instead of waiting in a collective that will never complete.

    A daemon thread in each process bumps its own counter in the coordination service's key-value
    store every `interval` seconds and reads everyone's. A process whose counter has not moved for
    `timeout` seconds (this process's clock) is lost; a store unreachable for as long means process
    0 (which hosts the coordination service) is. Then `on_lost(message)` runs in the thread; by default it
    logs the message and ends this process at once (`os._exit(1)`: the main thread may be blocked
    in a collective, and the runtime's shutdown would wait for the lost process).
    `lost_now(window)` is for the main thread after a collective failed: it waits up to `window`
    seconds for a process whose counter stops and returns the message (None if all keep beating).
    """

    def __init__(self, timeout: float = 60.0, interval: float = 2.0,
                 on_lost: Callable[[str], None] | None = None):
        from jax._src import distributed as jax_distributed

        self.client = jax_distributed.global_state.client
        self.n = jax.process_count()
        self.me = jax.process_index()
        self.timeout, self.interval = float(timeout), float(interval)
        self.on_lost = on_lost or exit_lost
        self._seen: dict[int, tuple[str, float]] = {}
        self._unreachable_since: float | None = None
        self._stop = threading.Event()
        self._beats = 0
        self._thread = None
        if self.client is not None and self.n > 1:
            self._beat()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="ssd_jax-watchdog")
            self._thread.start()

    def _beat(self, value: str | None = None) -> None:
        self._beats += 1
        self.client.key_value_set(f"{_ALIVE_DIR}{self.me}", value or str(self._beats),
                                  allow_overwrite=True)

    def _stale(self, timeout: float) -> list[int] | None:
        """Processes whose counter has not moved for `timeout` s ("done" never counts); None:
        the coordination service has been unreachable for `timeout` s."""
        now = time.monotonic()
        try:
            values = dict(self.client.key_value_dir_get(_ALIVE_DIR))
        except Exception:  # noqa: BLE001 - any RPC failure: the service may be gone
            self._unreachable_since = self._unreachable_since or now
            return None if now - self._unreachable_since > timeout else []
        self._unreachable_since = None
        lost = []
        for i in range(self.n):
            value = values.get(f"{_ALIVE_DIR}{i}", "")
            last = self._seen.get(i)
            if last is None or last[0] != value:
                self._seen[i] = (value, now)
            elif now - last[1] > timeout and i != self.me and value != "done":
                lost.append(i)
        return lost

    def _message(self, lost: list[int] | None, timeout: float) -> str:
        if lost is None:
            return (f"process 0 of {self.n} (the coordinator) is gone: this process "
                    f"({self.me}) cannot reach the coordination service")
        names = ", ".join(str(i) for i in lost)
        return (f"process {names} of {self.n} stopped (no sign of life for {timeout:.0f} s); "
                f"this process ({self.me}) stops too")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # noqa: BLE001
                pass
            lost = self._stale(self.timeout)
            if lost is None or lost:
                if not self._stop.is_set():
                    self.on_lost(self._message(lost, self.timeout))
                return

    def lost_now(self, window: float | None = None) -> str | None:
        """After a failed collective: the message naming the process that stopped, waiting up to
        `window` s (default 3 intervals + 1 s) for its counter to stand still; None if every
        process keeps beating (the failure was something else)."""
        window = 3 * self.interval + 1.0 if window is None else window
        quiet = 2 * self.interval + 0.5
        deadline = time.monotonic() + window + quiet
        while time.monotonic() < deadline:
            lost = self._stale(quiet)
            if lost is None or lost:
                return self._message(lost, quiet)
            time.sleep(self.interval / 2)
        return None

    def stop(self) -> None:
        """Ends the thread and tells the others this process finished (not lost)."""
        if self._thread is not None and not self._stop.is_set():
            self._stop.set()
            try:
                self._beat("done")
            except Exception:  # noqa: BLE001 - the service may already be gone
                pass


def exit_lost(message: str) -> None:
    """Logs `message`, prints it as ``error: ...`` and ends this process at once (exit status 1)
    without the distributed runtime's shutdown, which would wait for the lost process."""
    log.error("%s", message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)

