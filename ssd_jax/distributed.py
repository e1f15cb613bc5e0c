"""Multi-process start-up (`jax.distributed.initialize` when the run spans several processes) and
the one helper that brings a batch-sharded global array back to this process's rows."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging


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
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
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
