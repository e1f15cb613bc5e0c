"""The library's structure (issue 34): layers with no upward use, and no process-wide effects
from importing or calling it.

Each check runs in a fresh interpreter, where a module imported by another test cannot hide
what an import does.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ssd_jax"


def _python(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",)}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=str(ROOT),
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _library_modules() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in PACKAGE.rglob("*.py"))


def _imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at its top or inside functions."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_no_module_uses_a_layer_above_it():
    """Nothing in the library imports the trainer (but the trainer itself), the command layer
    (but itself) or `experiments`."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for name in _imports(path):
            if name == "experiments" or name.startswith("experiments."):
                offenders.append(f"{module} imports {name}")
            if (name == "ssd_jax.train" or name.startswith("ssd_jax.train.")) and \
                    not module.startswith("ssd_jax.train"):
                offenders.append(f"{module} imports {name}")
            if name == "ssd_jax.cli" and module != "ssd_jax.cli":
                offenders.append(f"{module} imports {name}")
    assert not offenders, offenders


def test_serving_does_not_load_the_trainer_or_the_commands():
    out = _python("""
        import sys
        import ssd_jax.export, ssd_jax.inference, ssd_jax.run_eval
        print(sorted(m for m in sys.modules if m.startswith(("ssd_jax.train", "ssd_jax.cli",
                                                              "experiments"))))
        """).stdout
    assert out.strip().splitlines()[-1] == "[]", out


#: The third-party packages the library imports: what they do to the process on their own is
#: theirs (jax and TensorFlow set environment variables when imported), the rest would be ours.
_DEPENDENCIES = ("jax", "flax", "optax", "chex", "tensorflow", "tensorflow_datasets",
                 "clu.metric_writers", "ml_collections", "pycocotools.coco", "PIL.Image",
                 "matplotlib", "tqdm", "dm_pix")

_SNAPSHOT = """
import importlib, json, logging, os, signal, sys, threading, time

def snapshot():
    return {"env": dict(os.environ), "handlers": [repr(h) for h in logging.root.handlers],
            "level": logging.root.level,
            "signals": {s.name: repr(signal.getsignal(s))
                        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)}}

ticks, stop = [0], threading.Event()
def tick():  # another thread of the user's writing to stderr meanwhile
    while not stop.is_set():
        os.write(2, f"tick {ticks[0]}\\n".encode())
        ticks[0] += 1
        time.sleep(0.005)

before = snapshot()
thread = threading.Thread(target=tick)
thread.start()
for name in MODULES:
    importlib.import_module(name)
stop.set()
thread.join()
after = snapshot()
print("RESULT " + json.dumps({"before": before, "after": after, "ticks": ticks[0]}))
"""


def _import_effects(modules) -> dict:
    out = _python(f"MODULES = {list(modules)!r}\n" + _SNAPSHOT, timeout=600)
    result = json.loads(next(line for line in out.stdout.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])
    result["stderr"] = out.stderr
    return result


def _env_changes(result: dict) -> dict:
    before, after = result["before"]["env"], result["after"]["env"]
    return {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
            if before.get(k) != after.get(k)}


def test_importing_the_library_changes_nothing_in_the_process():
    """Every module of ssd_jax imported in a fresh process while a thread writes to stderr:
    no line is lost (the data modules redirected file descriptor 2 for TensorFlow's import and
    dropped 3-10 lines of a thread writing every 0.5 s), the environment changes only as the
    dependencies' own imports change it, the root logger has no handler (orbax's import added
    one: a notebook's logging.basicConfig then did nothing), and the signal handlers are the
    process's."""
    ours = _import_effects(_library_modules())
    theirs = _import_effects(_DEPENDENCIES)
    printed = {int(line.split()[1]) for line in ours["stderr"].splitlines()
               if line.startswith("tick ") and line.split()[1].isdigit()}
    assert ours["ticks"] > 10
    assert printed == set(range(ours["ticks"])), \
        f"lost {sorted(set(range(ours['ticks'])) - printed)[:20]} of {ours['ticks']} lines"
    assert _env_changes(ours) == _env_changes(theirs), (_env_changes(ours), _env_changes(theirs))
    assert ours["after"]["handlers"] == ours["before"]["handlers"] == []
    assert ours["after"]["level"] == ours["before"]["level"]
    assert ours["after"]["signals"] == ours["before"]["signals"]


def test_loading_and_saving_a_run_leave_the_root_logger_to_the_user():
    """A notebook that reads a run, then configures its own logging: the configuration takes
    effect (orbax's absl log lines called logging.basicConfig() behind its back before)."""
    out = _python("""
        import logging, os, tempfile
        import jax
        from ssd_jax import config as config_lib, inference, models, workdir
        config = config_lib.get_config()
        model = models.from_config(config, 4)
        variables = models.init_variables(model, jax.random.key(0))
        run = tempfile.mkdtemp()
        workdir.save_run_info(run, config, 4, ("a", "b", "c"))
        with workdir.checkpoint_manager(run, 1) as manager:
            workdir.save(manager, 1, {"params": variables["params"],
                                      "batch_stats": variables["batch_stats"]})
        loaded = inference.load_run(run)
        assert loaded.step == 1
        print("HANDLERS", logging.root.handlers)
        logging.basicConfig(level=logging.INFO, format="MINE %(message)s")
        logging.getLogger("notebook").info("configured")
        """, timeout=600)
    assert "HANDLERS []" in out.stdout, out.stdout
    assert "MINE configured" in out.stderr, out.stderr[-2000:]
