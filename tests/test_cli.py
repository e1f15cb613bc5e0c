"""The commands as a user runs them: `python -m experiments.X` (and the `ssd-*` console scripts)
in a subprocess, from a folder outside the repository, with no PYTHONPATH (so `experiments` must
be installed) and JAX on the CPU.

A user mistake ends as a short `error:` message (at most 3 lines) with a non-zero exit status and
no traceback (``--debug`` / ``SSD_JAX_DEBUG=1`` shows it); --help exits 0; --print_config prints
every field with its comment; a workdir holding another model's run is refused untouched; Ctrl-C
ends training with exit status 130 and the same command resumes; show_data generates only the
images it draws. Nothing here trains more than a few steps; most runs fail before any compile.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

#: a tiny run: 16 synthetic 96 px images, batch 4, a progress line per step, no pictures
TINY = ("--config.dataset.num_train=16", "--config.dataset.num_eval=4",
        "--config.dataset.num_test=4",
        "--config.dataset.image_size=96", "--config.batch_size=4", "--config.eval_batch_size=4",
        "--config.log_every_steps=1", "--config.warmup_steps=1",
        "--config.num_eval_images_to_draw=0")
#: the shared trained workdir: 2 steps, one checkpoint (step 2), one evaluation at the end
FIXTURE_RUN = (*TINY, "--config.num_train_steps=2", "--config.checkpoint_every_steps=0",
               "--config.eval_every_steps=0")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SSD_JAX_DEBUG")}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _run_argv(argv: list[str], cwd, timeout: float = 240, **env: str) -> tuple[int, str, str]:
    assert os.path.abspath(cwd) != ROOT, "commands must run outside the repository"
    proc = subprocess.run(argv, cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _run(module: str, *args: str, cwd, timeout: float = 240, **env: str) -> tuple[int, str, str]:
    """`python -m module args` in `cwd`: (returncode, stdout, stderr)."""
    return _run_argv([sys.executable, "-m", module, *args], cwd, timeout, **env)


def _error_message(stderr: str) -> list[str]:
    """The non-empty lines from the first `error:` line to the end of stderr."""
    lines = stderr.splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.startswith("error:")), None)
    assert first is not None, f"no 'error:' line in stderr:\n{stderr[-4000:]}"
    return [ln for ln in lines[first:] if ln.strip()]


def _assert_short_error(rc: int, out: str, err: str, *needles: str) -> str:
    """A non-zero exit, no traceback, an `error:` message of at most 3 lines naming `needles`."""
    assert rc != 0, f"exit status 0:\n{out[-2000:]}\n{err[-4000:]}"
    assert "Traceback" not in out + err, err[-6000:]
    message = _error_message(err)
    assert len(message) <= 3, "error message longer than 3 lines:\n" + "\n".join(message)
    text = "\n".join(message)
    for needle in needles:
        assert needle in text, f"{needle!r} not in the error message:\n{text}"
    return text


def _write_png(path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 32), (200, 30, 30)).save(path)


def _tree(path) -> list[tuple[str, int]]:
    """(relative path, size) of every file and folder under `path`, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            size = os.path.getsize(full) if os.path.isfile(full) else -1
            out.append((os.path.relpath(full, path), size))
    return sorted(out)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A workdir trained for 2 steps (checkpoint 2), built once per test session: under
    pytest-xdist the workers share it (a file lock; the first one builds it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of one session
    base = root / "cli_trained"
    base.mkdir(exist_ok=True)
    workdir, result = base / "W", base / "result.json"
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.exists():
            rc, out, err = _run("experiments.train", f"--workdir={workdir}", *FIXTURE_RUN,
                                cwd=base, timeout=300)
            result.write_text(json.dumps({"rc": rc, "out": out, "err": err}))
    res = json.loads(result.read_text())
    assert res["rc"] == 0, res["out"][-2000:] + res["err"][-6000:]
    assert "Traceback" not in res["err"]
    assert (workdir / "run_info.json").is_file() and (workdir / "checkpoints" / "2").is_dir()
    return workdir


# ----------------------------------------------------------------------------- Ctrl-C
# (first in the file: the slowest test, so that pytest-xdist starts it first)

def _reader(stream, lines: list[str], found: threading.Event | None, needle: str) -> None:
    for line in stream:
        lines.append(line)
        if found is not None and needle in line:
            found.set()
    if found is not None:
        found.set()  # EOF: the process ended without printing the needle


def test_sigterm_saves_the_step_reached_and_the_same_command_resumes(tmp_path):
    """SIGTERM (timeout, SLURM, Kubernetes, preemptible VMs) or Ctrl-C (the same handler, see
    test_train's unit test) stops at the next step boundary, saves that step and exits 143."""
    workdir = tmp_path / "W2"
    args = [f"--workdir={workdir}", *TINY, "--config.checkpoint_every_steps=0",
            "--config.eval_every_steps=0"]
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *args,
                             "--config.num_train_steps=1000"], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_lines: list[str] = []
    err_lines: list[str] = []
    seen = threading.Event()
    threads = [threading.Thread(target=_reader, args=(proc.stdout, out_lines, None, ""),
                                daemon=True),
               threading.Thread(target=_reader, args=(proc.stderr, err_lines, seen, "step 4/"),
                                daemon=True)]
    for t in threads:
        t.start()
    try:
        assert seen.wait(timeout=150), "no 'step 4/' progress line in 150 s"
        assert proc.poll() is None, "".join(err_lines)[-6000:]
        proc.send_signal(signal.SIGTERM)
        # one signal must stop it (a KeyboardInterrupt raised inside JAX's gc callback used to
        # be dropped by Python and training went on: the loop now checks a flag each step)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for t in threads:
        t.join(timeout=10)
    out, err = "".join(out_lines), "".join(err_lines)
    assert rc == 143, err[-6000:]
    assert "Traceback" not in out + err, err[-6000:]
    for words in ("interrupted by SIGTERM at step", "the last checkpoint is step",
                  "(saved now)", "run the same command to resume"):
        assert words in err, err[-3000:]
    interrupted = int(re.search(r"interrupted by SIGTERM at step (\d+)", err).group(1))
    last = int(re.search(r"the last checkpoint is step (\d+)", err).group(1))
    assert 4 <= interrupted < 1000 and last == interrupted, err[-3000:]  # no step lost
    assert (workdir / "checkpoints" / str(last)).is_dir()

    # the same command, with a shorter run (the run length may change): resumes, ends at 8
    total = 8 if last < 8 else last + 2
    rc, out, err = _run("experiments.train", *args, f"--config.num_train_steps={total}",
                        cwd=tmp_path, timeout=300)
    assert rc == 0, err[-6000:]
    assert "Traceback" not in out + err
    assert f"resumed from checkpoint step {last}" in err, err[-4000:]
    assert f"step {last + 1}/{total}" in err and f"step 1/{total} " not in err, err[-4000:]
    assert (workdir / "checkpoints" / str(total)).is_dir()


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("command, flags", [
    (["-m", "experiments.train"], ["--workdir:", "--config:", "--[no]print_config:", "--[no]debug:"]),
    (["-m", "experiments.predict"], ["--images:", "--torchvision_checkpoint:", "--[no]debug:"]),
    (["-m", "experiments.evaluate"], ["--workdir:", "--config:", "--[no]print_config:"]),
    (["-m", "experiments.show_data"], ["--num_images:", "--config:", "--[no]print_config:"]),
    (["-m", "experiments.benchmark"], ["--[no]peer"]),
    (["-m", "experiments.convert_torchvision"], ["--[no]fc"]),
    (["ssd-train"], ["--workdir:", "--config:", "--[no]print_config:", "--[no]debug:"]),
    (["ssd-predict"], ["--images:", "--torchvision_checkpoint:", "--[no]debug:"]),
], ids=["train", "predict", "evaluate", "show_data", "benchmark", "convert_torchvision",
        "ssd-train", "ssd-predict"])
def test_help_exits_0_and_lists_the_flags(tmp_path, command, flags):
    if command[0] == "-m":
        argv = [sys.executable, *command]
    else:  # a console script, installed next to the interpreter
        argv = [os.path.join(BIN, command[0])]
        assert os.path.isfile(argv[0]), f"{argv[0]}: console script not installed"
    rc, out, err = _run_argv([*argv, "--help"], tmp_path)
    assert rc == 0, err[-4000:]
    assert "Traceback" not in out + err and "error:" not in err, err[-4000:]
    missing = [f for f in flags if f not in out]
    assert not missing, f"--help does not list {missing}:\n{out}"


# ----------------------------------------------------------------------------- a trained workdir
# (built once and shared by these tests; early in the file, so it is built while Ctrl-C runs)


def test_workdir_with_another_model_is_refused_untouched(tmp_path, trained_workdir):
    info = (trained_workdir / "run_info.json").read_bytes()
    checkpoints = _tree(trained_workdir / "checkpoints")
    top = sorted(os.listdir(trained_workdir))
    rc, out, err = _run("experiments.train", f"--workdir={trained_workdir}", *FIXTURE_RUN,
                        "--config.model.width_mult=0.5", cwd=tmp_path)
    _assert_short_error(rc, out, err, "model.width_mult")
    assert (trained_workdir / "run_info.json").read_bytes() == info
    assert _tree(trained_workdir / "checkpoints") == checkpoints
    assert sorted(os.listdir(trained_workdir)) == top


def test_predict_out_is_a_file(tmp_path, trained_workdir):
    (tmp_path / "imgs").mkdir()
    _write_png(tmp_path / "imgs" / "a.png")
    out_file = tmp_path / "result.txt"
    out_file.write_text("keep me\n")
    rc, out, err = _run("experiments.predict", f"--workdir={trained_workdir}",
                        f"--images={tmp_path / 'imgs'}", f"--out={out_file}", cwd=tmp_path)
    _assert_short_error(rc, out, err, str(out_file), "is a file")
    assert out_file.read_text() == "keep me\n"


def test_resume_with_a_run_shorter_than_the_checkpoint(tmp_path, trained_workdir):
    """A num_train_steps below the workdir's checkpoint evaluates that checkpoint (it ended in
    orbax's StepAlreadyExistsError traceback)."""
    workdir = tmp_path / "W"
    shutil.copytree(trained_workdir, workdir)  # checkpoint 2; the shared workdir stays intact
    args = [a for a in FIXTURE_RUN if not a.startswith("--config.num_train_steps=")]
    rc, out, err = _run("experiments.train", f"--workdir={workdir}", *args,
                        "--config.num_train_steps=1", cwd=tmp_path)
    assert "Traceback" not in out + err, err[-3000:]
    assert rc == 0, err[-3000:]
    assert "nothing to train; evaluating that checkpoint" in err
    assert "Done in" in out
    done = out[out.index("Done in"):].splitlines()[0]
    assert "held-out test voc07 mAP = " in done and "; validation voc07 mAP = " in done, done


# ----------------------------------------------------------------------------- mistakes


def _setup_files(tmp_path) -> dict[str, str]:
    """Files the mistakes refer to: a text file, a folder with one PNG, an empty folder."""
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "imgs").mkdir()
    _write_png(tmp_path / "imgs" / "a.png")
    (tmp_path / "empty").mkdir()
    return {"TXT": str(tmp_path / "notes.txt"), "IMGS": str(tmp_path / "imgs"),
            "EMPTY": str(tmp_path / "empty"), "OUT": str(tmp_path / "out")}


MISTAKES = [
    pytest.param("experiments.train", ["--workdir=OUT", "--config.dataset.train_anotations=x"],
                 ["--config.dataset.train_annotations"], id="train-typo-suggests-field"),
    pytest.param("experiments.train", ["--workdir=OUT", "--config.foo=1"], ["foo"],
                 id="train-unknown-field"),
    pytest.param("experiments.train", ["--workdir=OUT", "--config=no_such_config"],
                 ["no_such_config", "default", "ssd300_voc"], id="train-unknown-config-name"),
    pytest.param("experiments.train", ["--workdir=OUT", "--config=/no/such/file.py"],
                 ["/no/such/file.py", "default", "ssd300_voc"], id="train-missing-config-file"),
    pytest.param("experiments.train", ["--workdir=OUT", "--config.batch_size=abc"],
                 ["config.batch_size", "integer"], id="train-bad-int"),
    pytest.param("experiments.train", ["--workdir=OUT", "--config.dataset.kind=coco_json"],
                 ["config.dataset.train_annotations", "required"], id="train-coco-json-no-files"),
    pytest.param("experiments.train", ["--workdir=TXT/run"], ["TXT/run", "cannot write"],
                 id="train-workdir-under-a-file"),
    pytest.param("experiments.train", [], ["--workdir", "required"], id="train-no-workdir"),
    pytest.param("experiments.train", ["--workdir=OUT", "--num_train_steps=5"],
                 ["--num_train_steps", "--config.num_train_steps="],
                 id="train-config-field-as-a-flag"),  # absl alone suggested --num_processes
    pytest.param("experiments.predict",
                 ["--images=/no/such/dir", "--out=OUT", "--torchvision_checkpoint=TXT"],
                 ["/no/such/dir"], id="predict-missing-images-first"),
    pytest.param("experiments.predict", ["--images=IMGS", "--out=OUT",
                                         "--torchvision_checkpoint=TXT"],
                 ["TXT", "state dict"], id="predict-text-file-as-checkpoint"),
    pytest.param("experiments.predict", ["--workdir=EMPTY", "--images=IMGS", "--out=OUT"],
                 ["EMPTY", "run_info.json"], id="predict-empty-workdir"),
    pytest.param("experiments.evaluate", ["--workdir=EMPTY"], ["EMPTY", "run_info.json"],
                 id="evaluate-empty-workdir"),
    pytest.param("experiments.show_data", ["--config.foo=1", "--out=OUT/x.png"], ["foo"],
                 id="show-data-unknown-field"),
]


def _subst(items: list[str], files: dict[str, str]) -> list[str]:
    pattern = re.compile("|".join(sorted(files, key=len, reverse=True)))
    return [pattern.sub(lambda m: files[m.group(0)], s) for s in items]


@pytest.mark.parametrize("module, args, needles", MISTAKES)
def test_mistake_is_a_short_error(tmp_path, module, args, needles):
    files = _setup_files(tmp_path)
    rc, out, err = _run(module, *_subst(args, files), cwd=tmp_path)
    text = _assert_short_error(rc, out, err, *_subst(needles, files))
    if module == "experiments.predict" and "/no/such/dir" in args[0]:
        assert "state dict" not in text and files["TXT"] not in text, text  # images fail first
    assert not os.path.exists(files["OUT"]), "a failed command wrote its output folder"


@pytest.mark.parametrize("module, args, env", [
    # a mistake found in the training code, after jax is imported
    ("experiments.train", ["--workdir=run", "--config.dataset.kind=coco_json"],
     {"SSD_JAX_DEBUG": "1"}),
    # a mistake found while the command line is parsed
    ("experiments.show_data", ["--debug", "--config.foo=1"], {}),
], ids=["train-SSD_JAX_DEBUG", "parser---debug"])
def test_debug_shows_the_traceback(tmp_path, module, args, env):
    rc, out, err = _run(module, *args, cwd=tmp_path, **env)
    assert rc != 0
    assert "Traceback" in err, err[-4000:]
    assert "ConfigError" in err and ("required" in err or "'foo'" in err), err[-4000:]


# ----------------------------------------------------------------------------- --print_config


def _printed_fields(out: str) -> dict[str, str]:
    """{field: its whole line} of --print_config's output (the first line names the file)."""
    lines = out.splitlines()
    assert lines and lines[0].startswith("# "), out[:2000]
    return {ln.split(" = ", 1)[0]: ln for ln in lines[1:] if ln.strip()}


@pytest.mark.parametrize("config", ["default", "ssd300_voc"])
def test_print_config_prints_every_field_with_its_comment(tmp_path, config):
    import importlib

    from ssd_jax import cli

    rc, out, err = _run("experiments.train", f"--config={config}", "--print_config", cwd=tmp_path)
    assert rc == 0, err[-4000:]
    printed = _printed_fields(out)
    expected = cli.field_paths(importlib.import_module(f"experiments.configs.{config}").get_config())
    assert sorted(printed) == sorted(expected)
    uncommented = [ln for ln in printed.values() if not re.search(r"\S\s+# \S", ln)]
    assert not uncommented, "fields printed without a comment:\n" + "\n".join(uncommented)


@pytest.mark.parametrize("args, expected", [
    ([], [("dataset.train_annotations = ''", "# (coco_json)"), ("model.name = 'compact'", "# ")]),
    (["--config=ssd300_voc"], [("model.name = 'ssd300_vgg16'", "# the paper's SSD300"),
                               ("dataset.kind = 'tfds'", "# ")]),
    (["--config.batch_size=4"], [("batch_size = 4 ", "# global batch")]),
    (["--config=ssd300_voc", "--config.batch_size=4"], [("batch_size = 4 ", "# ")]),
])
def test_print_config_values(tmp_path, args, expected):
    rc, out, err = _run("experiments.train", *args, "--print_config", cwd=tmp_path)
    assert rc == 0, err[-4000:]
    lines = out.splitlines()
    for start, comment in expected:
        hits = [ln for ln in lines if ln.startswith(start)]
        assert len(hits) == 1, f"no line starting with {start!r}:\n{out}"
        assert comment in hits[0], hits[0]


def test_print_config_comment_is_the_fields_own(tmp_path):
    """The continuation lines of one field's comment are not the next field's comment."""
    rc, out, _ = _run("experiments.train", "--print_config", cwd=tmp_path)
    assert rc == 0
    fields = _printed_fields(out)
    # dataset.num_test's comment continues on a second line; the next field keeps its own
    assert fields["dataset.num_test"].endswith("evaluated once after training; 0 = none")
    assert fields["dataset.test_seed"].endswith("# (synthetic) the test images' own seed")


# ----------------------------------------------------------------------------- show_data

_RECORD_N = """
import atexit, json, runpy, sys
from ssd_jax.data import synthetic
asked = []
class SplitJob(synthetic.SplitJob):  # every generation, in this process or in workers
    def __init__(self, seed, split, num_examples, *args, **kwargs):
        asked.append(num_examples)
        super().__init__(seed, split, num_examples, *args, **kwargs)
synthetic.SplitJob = SplitJob
atexit.register(lambda: print("GENERATED=" + json.dumps(asked), flush=True))
sys.argv = ["show_data", *sys.argv[1:]]
runpy.run_module("experiments.show_data", run_name="__main__", alter_sys=True)
"""


def test_show_data_generates_only_the_images_it_draws(tmp_path):
    png = tmp_path / "OUT" / "x.png"
    t0 = time.perf_counter()
    rc, out, err = _run_argv([sys.executable, "-c", _RECORD_N, "--num_images=4", f"--out={png}"],
                             tmp_path, timeout=180)
    elapsed = time.perf_counter() - t0
    assert rc == 0, err[-6000:]
    assert "Traceback" not in out + err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    asked = json.loads(re.search(r"^GENERATED=(.*)$", out, re.M).group(1))
    assert asked, "synthetic.SplitJob was never created"
    assert all(n <= 4 for n in asked), f"generated {asked} images to draw 4"
    assert elapsed < 120, f"show_data took {elapsed:.0f} s"



def test_prefer_eigen_convolutions_appends_once_and_keeps_the_users_choice(monkeypatch):
    from ssd_jax import host

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert host.prefer_eigen_convolutions()
    assert host.prefer_eigen_convolutions()  # a second call adds nothing
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_cpu_enable_fast_math=false",
        "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")  # the user's own
    assert not host.prefer_eigen_convolutions()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
    monkeypatch.delenv("XLA_FLAGS")
    assert host.prefer_eigen_convolutions()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


@pytest.mark.parametrize("args", [["--help"], ["--print_config"]], ids=["help", "print_config"])
def test_a_reader_that_goes_away_is_no_error(tmp_path, args):
    """`ssd-train --help | head -1`: the pipe closes before the output is written; the command
    stops quietly (141, SIGPIPE's code), no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *args], cwd=tmp_path,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err[-4000:]
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-4000:]
