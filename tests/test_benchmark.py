"""The benchmark entry point runs and prints its table (no timing is asserted anywhere)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: Run before the benchmark: the modules a bare accelerator host lacks look uninstalled: importing
#: them raises ModuleNotFoundError and `importlib.util.find_spec` (how torch._dynamo, imported by
#: torchvision, probes for tensorflow) answers None, as it does where they are not installed.
BARE_HOST = """
import importlib.util
import sys
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "ml_collections", "pycocotools")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (bare accelerator host)",
                                      name=name)
sys.meta_path.insert(0, Blocker())
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    if name.split(".")[0] in BLOCKED:
        return None
    return _find_spec(name, package)
importlib.util.find_spec = find_spec
import torchvision.models.detection  # the peers' import works on such a host
from experiments import benchmark
try:
    benchmark.run(["benchmark", *sys.argv[1:]])  # the command's own path: absl + ssd_jax.cli
except SystemExit as e:
    assert not e.code, e.code
print("BLOCKED_LOADED", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_benchmark_quick_smoke_run_prints_a_table():
    """Also on a host without TensorFlow, clu, ml_collections and pycocotools (the GPU image)."""
    cmd = [sys.executable, "-c", BARE_HOST, "--quick", "--nopeer",
           "--suite", "core", "--suite=model", "--model_names", "compact",
           "--model_batch=1,2"]
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
    import types

    from experiments import benchmark
    from ssd_jax.errors import UserError

    with pytest.raises(UserError, match="--targets runs its own rows"):
        benchmark.main(["--targets", "--quick"])
    args = benchmark.options(_flag_values(["--targets"]))
    assert args.suite == ["model", "inference"] and args.model_names == ["ssd300_vgg16"]
    assert args.inference_models == ["ssd300_vgg16"]
    assert isinstance(args, types.SimpleNamespace) and args.peer is True


def _flag_values(argv):
    from absl import flags

    from experiments import benchmark

    fv = flags.FlagValues()
    benchmark.define_flags(fv, benchmark.suite_modules())
    fv(["benchmark", *argv])
    return fv


def test_benchmark_flags():
    """One absl flag style: --suite (repeatable enum), --peer/--nopeer, the suites' own flags with
    underscores; bad values are refused before anything is timed."""
    from experiments import benchmark
    from ssd_jax.errors import UserError

    args = benchmark.options(_flag_values(
        ["--suite=core", "--suite", "detect", "--nopeer", "--core_batch=8", "--detect_tile", "16",
         "--inference_batches=1,4", "--inference_dtypes=bf16", "--model_batch=2"]))
    assert args.suite == ["core", "detect"] and args.peer is False and args.quick is False
    assert (args.core_batch, args.detect_tile) == (8, 16)
    assert args.inference_batches == ["1", "4"] and args.inference_dtypes == ["bf16"]
    from experiments.benchmarks import inference, model

    assert args.model_batch == ["2"] and args.model_names == list(model.MODEL_NAMES)
    assert set(model.MODEL_NAMES) == set(inference.INFERENCE_MODELS)  # every model, both suites
    assert args.inference_models == list(inference.INFERENCE_MODELS)
    defaults = benchmark.options(_flag_values([]))
    assert defaults.suite is None and defaults.peer is True and defaults.dtype == "fp32"
    for bad in (["--suite=nope"], ["--no-peer"], ["--core_batch=0"], ["stray"]):
        with pytest.raises(UserError):
            benchmark.main(bad)
    with pytest.raises(UserError, match="--inference_models"):
        inference.run(benchmark.options(_flag_values(["--inference_models=resnet"])))
    with pytest.raises(UserError, match="--inference_dtypes"):
        inference.run(benchmark.options(_flag_values(["--inference_dtypes=fp16"])))
    with pytest.raises(UserError, match="--model_batch"):
        model.run(benchmark.options(_flag_values(["--model_batch=0"])))
    with pytest.raises(UserError, match="--model_names"):
        model.run(benchmark.options(_flag_values(["--model_names=resnet"])))


def test_benchmark_command_error_is_one_line(tmp_path):
    """The command (through ssd_jax.cli.run): a user mistake is one `error:` line, exit 1."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--targets", "--quick"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-4000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: --targets runs its own rows: drop --quick and --suite"]
    assert "Traceback" not in proc.stderr


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


def test_device_profile_sums_device_ops_per_step_from_one_line():
    """The profile's table: only the device process, the busiest line of it (a stream and an op
    line showing the same kernels are not added together), per-step milliseconds and shares."""
    from experiments.benchmarks.device_profile import top_ops

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}}]
    stream = [{"ph": "X", "pid": 1, "tid": 7, "name": n, "dur": d}
              for n, d in [("conv", 3000), ("conv", 3000), ("scatter", 2000)]]
    ops_line = [{"ph": "X", "pid": 1, "tid": 8, "name": "conv", "dur": 5000}]
    host = [{"ph": "X", "pid": 2, "tid": 1, "name": "python", "dur": 10**7}]
    text = top_ops({"traceEvents": meta + stream + ops_line + host}, steps=2, top=5)
    assert "/device:GPU:0 / Stream #7: 4.00 ms busy per step, 2 distinct ops" in text
    rows = text.split("ms per step, share of its busy time):\n")[1].splitlines()
    assert rows[0].split()[:3] == ["3.000", "ms", "75.0%"] and rows[0].endswith("conv")
    assert rows[1].split()[:3] == ["1.000", "ms", "25.0%"] and rows[1].endswith("scatter")
    assert "python" not in text


def test_interleaved_takes_turns_and_reports_each_sides_median():
    """The sides alternate round by round (a busy spell hits both), each reports its median."""
    from experiments.benchmarks.common import interleaved

    calls = []
    ours = iter([5.0, 1.0, 2.0])   # median 2.0, mean 2.67
    peer = iter([4.0, 4.0, 40.0])  # median 4.0 (a busy spell in its last round)

    def timer(name, values):
        return lambda: (calls.append(name), next(values))[1]

    assert interleaved([timer("a", ours), None, timer("b", peer)], rounds=3) == [2.0, None, 4.0]
    assert calls == ["a", "b"] * 3
    with pytest.raises(ValueError, match="rounds"):
        interleaved([lambda: 1.0], rounds=0)
