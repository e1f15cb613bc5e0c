"""The benchmark entry point runs and prints its table (no timing is asserted anywhere)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_quick_smoke_run_prints_a_table():
    cmd = [sys.executable, "-m", "experiments.benchmark", "--quick", "--no-peer",
           "--suite", "core", "--suite", "model", "--model-names", "compact",
           "--model-batch", "1,2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "match + multibox_loss" in out
    for row in ("model/forward compact b=1 fp32", "model/train_step compact b=2 fp32"):
        line = next(ln for ln in out.splitlines() if ln.startswith(row))
        assert float(line.split()[len(row.split())]) > 0.0, line
