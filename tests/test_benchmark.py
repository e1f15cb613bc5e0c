"""The benchmark entry point runs and prints its table (no timing is asserted anywhere)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: Run before the benchmark: the modules a bare accelerator host lacks cannot be imported.
BARE_HOST = """
import sys
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "ml_collections", "pycocotools")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked (bare accelerator host)")
sys.meta_path.insert(0, Blocker())
from experiments import benchmark
benchmark.main(sys.argv[1:])
print("BLOCKED_LOADED", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_benchmark_quick_smoke_run_prints_a_table():
    """Also on a host without TensorFlow, clu, ml_collections and pycocotools (the GPU image)."""
    cmd = [sys.executable, "-c", BARE_HOST, "--quick", "--no-peer",
           "--suite", "core", "--suite", "model", "--model-names", "compact",
           "--model-batch", "1,2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "BLOCKED_LOADED []" in out
    assert "unavailable" not in out.replace("suite data unavailable", "")  # GPU suites import
    assert "match + multibox_loss" in out
    for row in ("model/forward compact b=1 fp32", "model/train_step compact b=2 fp32"):
        line = next(ln for ln in out.splitlines() if ln.startswith(row))
        assert float(line.split()[len(row.split())]) > 0.0, line


def test_targets_verdicts():
    from experiments import benchmark
    from experiments.benchmarks.common import Row

    (train_b64, target), (train_fp32, _), (infer_b64, _), _ = benchmark.TARGETS
    rows = [Row(train_b64, target + 1.0, 440.0), Row(train_fp32, 10.0), Row(infer_b64, 0.5)]
    lines = benchmark.format_targets(rows, "TPU v5 lite").splitlines()
    assert "this device: TPU v5 lite" in lines[0]
    verdicts = [ln.rsplit("img/s", 1)[1].strip() for ln in lines[1:]]
    assert verdicts == ["met", "NOT met", "NOT met", "not run"]


def test_targets_refuses_other_row_selections():
    from experiments import benchmark

    with pytest.raises(SystemExit):
        benchmark.main(["--targets", "--quick"])


def test_benchmark_train_config_is_the_voc_recipe():
    """The model suite times the product's step under ssd300_voc.py's fields (its own copy, for
    hosts without ml_collections): the copy must follow the config file."""
    from experiments.benchmarks import model as model_suite
    from experiments.configs import ssd300_voc

    voc = ssd300_voc.get_config()
    bench = model_suite.voc_train_config("ssd300_vgg16", "bf16")
    for key, value in model_suite.VOC_TRAIN_FIELDS.items():
        assert voc.get(key) == value, key
    assert bench.dtype == voc.dtype and bench.model.name == voc.model.name
