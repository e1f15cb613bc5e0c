"""The commands run as installed (`python -m experiments.X` from outside the repository): --help
exits 0, a user mistake ends as one `error:` line with exit status 1 and no traceback."""

import os
import subprocess
import sys

import pytest


def _run(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_convert_rejects_a_file_that_is_not_a_state_dict(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a state dict\n")
    proc = _run("experiments.convert_torchvision", "--kind=ssd300", f"--input={text}",
                f"--output={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-4000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and str(text) in errors[0], proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, needle", [
    (["--kind=ssd300", "--input=missing.pth", "--output=out"], "missing.pth"),
    (["--kind=vgg16", "--input=w.pth", "--output=a_file"], "a_file"),
])
def test_convert_other_mistakes_are_one_line(tmp_path, args, needle):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "w.pth").write_text("x")
    proc = _run("experiments.convert_torchvision", *args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-4000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("module, flag", [("experiments.convert_torchvision", "--[no]fc"),
                                          ("experiments.benchmark", "--[no]peer")])
def test_help_exits_0(tmp_path, module, flag):
    proc = _run(module, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert flag in proc.stdout
    assert not _errors(proc.stderr)


def test_a_pth_file_without_torch_is_one_line(tmp_path):
    """Reading a .pth needs torch (a test extra): without it, one line saying how to get it."""
    (tmp_path / "w.pth").write_text("x")
    code = ("import runpy, sys; sys.modules['torch'] = None; "  # as if torch were not installed
            "sys.argv = ['convert_torchvision', '--input=w.pth', '--output=out']; "
            "runpy.run_module('experiments.convert_torchvision', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-4000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "needs torch" in errors[0] and "pip install torch" in errors[0], \
        proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
