"""Throughput of ssd_jax against torchvision's SSD, side by side in one run.

    python -m experiments.benchmark                      # every suite that fits this host
    python -m experiments.benchmark --suite=core --suite=detect --nopeer
    python -m experiments.benchmark --suite=inference --inference_batches=1,32 --inference_dtypes=bf16
    python -m experiments.benchmark --targets            # the H200 target rows, met or not

Suites (experiments/benchmarks/*.py): core (matching + multibox loss), model (forward and train
step), detect (post-processing), inference (network + detect, end to end), data (input pipeline;
needs TensorFlow), export (latency of the exported artifacts against predict's function). The
table prints images/sec for ours, the peer, and their ratio. `--help` lists
every suite's flags (--core_batch, --model_batch, --detect_tile, --inference_batches, ...). Never
imported by tests for timing.

From Python: `main(["--suite=core", "--quick", "--nopeer"])` parses those flags (into its own
FlagValues, leaving absl's global FLAGS alone) and returns the rows.
"""

from __future__ import annotations

import importlib
import platform
import types
from collections.abc import Sequence
from typing import Any

import jax
from absl import flags

from experiments.benchmarks.common import Row, format_table
from ssd_jax import cli
from ssd_jax.errors import UserError

FLAGS = flags.FLAGS

SUITES = ("core", "model", "detect", "inference", "data", "export")

#: The project's throughput targets (img/s), set against torchvision and a plain JAX SSD300 on ONE
#: NVIDIA H200; `--targets` runs just these rows (2 train-step and 2 inference programs) and
#: says whether each is met. Compare only on that card.
TARGETS = (
    ("model/train_step ssd300_vgg16 b=64 bf16", 2400.0),
    ("model/train_step ssd300_vgg16 b=32 fp32", 950.0),
    ("inference e2e SSD300 91 cls bf16 batch 64", 6500.0),
    ("inference e2e SSD300 91 cls bf16 batch 32", 4500.0),
)


def suite_modules() -> dict[str, types.ModuleType]:
    """{name: module} of the suites importable on this host (a note is printed for the others)."""
    modules = {}
    for name in SUITES:
        try:
            modules[name] = importlib.import_module(f"experiments.benchmarks.{name}")
        except ImportError as e:  # e.g. no TensorFlow on a bare accelerator host
            print(f"(suite {name} unavailable: {e})")
    return modules


def define_flags(fv: flags.FlagValues, modules: dict[str, types.ModuleType]) -> None:
    """The benchmark's flags, then each suite module's (its `define_flags(fv)`), on `fv`."""
    if "suite" in fv:  # already defined (run() called twice in one process)
        return
    flags.DEFINE_multi_enum("suite", None, SUITES,
                            "Suite to run (repeatable: --suite=core --suite=detect); default: "
                            "every suite importable on this host.", flag_values=fv)
    flags.DEFINE_boolean("peer", True, "Time the torchvision peer too (--nopeer: ours only).",
                         flag_values=fv)
    flags.DEFINE_boolean("quick", False, "Small sizes, short timings (a smoke run).", flag_values=fv)
    flags.DEFINE_boolean("targets", False,
                         "Only the rows of the H200 targets (SSD300 train step bf16 b64 and fp32 "
                         "b32, inference bf16 b64 and b32), then target vs measured.",
                         flag_values=fv)
    before = set(fv)
    for mod in modules.values():
        if hasattr(mod, "define_flags"):
            mod.define_flags(fv)
    for name in sorted(set(fv) - before):  # listed by --help, not only --helpfull
        flags.declare_key_flag(name, flag_values=fv)


def options(fv: flags.FlagValues) -> types.SimpleNamespace:
    """The parsed flags of `fv` as the `args` namespace that each suite's `run(args)` reads; with
    --targets, the suites and (batch, dtype) cases of the target rows filled in."""
    args = types.SimpleNamespace(**fv.flag_values_dict())
    if args.targets:
        if args.quick or args.suite:
            raise UserError("--targets runs its own rows: drop --quick and --suite")
        args.suite = ["model", "inference"]
        args.model_names = ["ssd300_vgg16"]
        args.inference_models = ["ssd300_vgg16"]
        args.model_cases = [(64, "bf16"), (32, "fp32")]
        args.inference_cases = [(32, "bf16"), (64, "bf16")]
    return args


def run_suites(args: Any, modules: dict[str, types.ModuleType]) -> list[Row]:
    """Run the suites `args.suite` (default: every one in `modules`), print their tables (and the
    targets with --targets), return every row."""
    chosen = list(args.suite or modules)
    missing = [name for name in chosen if name not in modules]
    if missing:
        raise UserError(f"--suite={missing[0]}: the suite cannot be imported on this host "
                        f"(see the note above)")
    dev = jax.devices()[0]
    print(f"devices: {jax.device_count()} x {dev.device_kind} ({dev.platform}); "
          f"jax {jax.__version__}; host {platform.machine()}")
    rows: list[Row] = []
    for name in chosen:
        suite_rows = modules[name].run(args)
        print(format_table(suite_rows), flush=True)
        rows += suite_rows
    if len(chosen) > 1:
        print("\nall suites:\n" + format_table(rows))
    if args.targets:
        print("\n" + format_targets(rows, dev.device_kind))
    return rows


def main(argv: Sequence[str]) -> list[Row]:
    """Run the benchmark from Python: `argv` are command-line flags (no program name), e.g.
    ``["--suite=core", "--quick", "--nopeer"]``. They are parsed into a FlagValues of their own;
    a bad flag raises UserError. Returns the rows."""
    modules = suite_modules()
    fv = flags.FlagValues()
    define_flags(fv, modules)
    cli.parse_flags(fv, "benchmark", argv)
    return run_suites(options(fv), modules)


def format_targets(rows: list[Row], device_kind: str) -> str:
    """Measured against TARGETS: one line each, 'met' or 'NOT met' (targets are H200 figures)."""
    ours = {r.name: r.ours for r in rows}
    lines = [f"targets (set on one NVIDIA H200; this device: {device_kind})"]
    for name, target in TARGETS:
        got = ours.get(name)
        verdict = "not run" if got is None else ("met" if got >= target else "NOT met")
        shown = "-" if got is None else f"{got:.0f}"
        lines.append(f"  {name:<50} {shown:>8} / {target:>6.0f} img/s  {verdict}")
    return "\n".join(lines)


def run(argv: Sequence[str] | None = None) -> None:
    """The `ssd-benchmark` console script (`argv`: the full command line, default sys.argv)."""
    modules = suite_modules()
    define_flags(FLAGS, modules)

    def absl_main(args: list[str]) -> None:
        if len(args) > 1:
            raise UserError(f"unexpected arguments: {' '.join(args[1:])}")
        run_suites(options(FLAGS), modules)

    cli.run(absl_main, argv=argv)


if __name__ == "__main__":
    run()
