"""Multi-process and multi-device training equals one device (issue 18): float64 shows the float32
gap is summation order; a lost process stops the others; a run written by several processes is
evaluated and predicted by one.

Each case launches `tests/multihost_worker.py` processes (gloo collectives on this CPU).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(tmp_path, name: str, processes: int = 1, devices: int = 1, **options) -> list:
    """Starts the processes of one run (workdir tmp_path/name); returns their Popen objects."""
    port = _free_port()
    procs = []
    for i in range(processes):
        args = {"processes": processes, "process_id": i, "port": port, "devices": devices,
                "workdir": str(tmp_path / name), "out": str(tmp_path / f"{name}.{i}.npz"),
                **options}
        log = open(tmp_path / f"{name}.{i}.log", "w")  # noqa: SIM115 - closed by the child's exit
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.multihost_worker",
                                       json.dumps(args)], cwd=ROOT, env=_env(), stdout=log,
                                      stderr=subprocess.STDOUT))
    return procs


def _wait(tmp_path, name: str, procs: list, timeout: float = 600) -> list[dict[str, np.ndarray]]:
    for i, p in enumerate(procs):
        rc = p.wait(timeout=timeout)
        log = (tmp_path / f"{name}.{i}.log").read_text()
        assert rc == 0, f"{name} process {i} exited {rc}:\n{log[-5000:]}"
    return [dict(np.load(tmp_path / f"{name}.{i}.npz")) for i in range(len(procs))]


def _train(tmp_path, name: str, processes: int = 1, devices: int = 1, **options):
    return _wait(tmp_path, name, _launch(tmp_path, name, processes, devices, **options))


def _leaves(out: dict[str, np.ndarray], part: str) -> list[np.ndarray]:
    keys = sorted((k for k in out if k.startswith(part + "/")), key=lambda k: int(k.split("/")[1]))
    return [out[k] for k in keys]


def _max_rel_diff(a: dict, b: dict, init: dict | None = None) -> dict[str, float]:
    """Per state part, the largest difference of a leaf relative to its size (the update's size
    when `init` is given: how far training moved it)."""
    out = {}
    for part in ("params", "batch_stats", "opt_state"):
        worst = 0.0
        for j, (x, y) in enumerate(zip(_leaves(a, part), _leaves(b, part), strict=True)):
            if not np.issubdtype(x.dtype, np.floating):
                assert np.array_equal(x, y), (part, j)
                continue
            scale = np.abs(x - _leaves(init, part)[j]).max() if init else np.abs(x).max()
            if scale > 0:
                worst = max(worst, float(np.abs(x - y).max() / scale))
        out[part] = worst
    return out
