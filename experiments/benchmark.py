"""Throughput of ssd_jax against torchvision's SSD, side by side in one run.

    python -m experiments.benchmark                      # every suite that fits this host
    python -m experiments.benchmark --suite core --suite detect --no-peer
    python -m experiments.benchmark --targets           # the H200 target rows, met or not

Suites (experiments/benchmarks/*.py): core (matching + multibox loss), model (forward and train
step), detect (post-processing), inference (network + detect, end to end), data (input pipeline;
needs TensorFlow). The table prints images/sec for ours, the peer, and their ratio. Never
imported by tests for timing.
"""

from __future__ import annotations

import argparse
import importlib
import platform

import jax

from experiments.benchmarks.common import Row, format_table

SUITES = ("core", "model", "detect", "inference", "data")

#: The project's throughput targets (img/s), set against torchvision and a plain JAX SSD300 on ONE
#: NVIDIA H200; `--targets` runs just these rows (2 train-step and 2 inference programs) and
#: says whether each is met. Compare only on that card.
TARGETS = (
    ("model/train_step ssd300_vgg16 b=64 bf16", 2400.0),
    ("model/train_step ssd300_vgg16 b=32 fp32", 950.0),
    ("inference e2e SSD300 91 cls bf16 batch 64", 6500.0),
    ("inference e2e SSD300 91 cls bf16 batch 32", 4500.0),
)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--suite", action="append", choices=SUITES,
                        help="suite to run (repeatable); default: all")
    parser.add_argument("--no-peer", action="store_true", help="skip the torchvision peer runs")
    parser.add_argument("--quick", action="store_true", help="small sizes, short timings (smoke run)")
    parser.add_argument("--targets", action="store_true",
                        help="only the rows of the H200 targets (SSD300 train step bf16 b64 and "
                             "fp32 b32, inference bf16 b64 and b32), then target vs measured")
    modules = {name: importlib.import_module(f"experiments.benchmarks.{name}") for name in SUITES
               if _importable(name)}
    for mod in modules.values():
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.targets:
        if args.quick or args.suite:
            parser.error("--targets runs its own rows: drop --quick and --suite")
        args.suite = ["model", "inference"]
        args.model_names = "ssd300_vgg16"
        args.model_cases = [(64, "bf16"), (32, "fp32")]
        args.inference_cases = [(32, "bf16"), (64, "bf16")]
    chosen = args.suite or [s for s in SUITES if s in modules]
    dev = jax.devices()[0]
    print(f"devices: {jax.device_count()} x {dev.device_kind} ({dev.platform}); "
          f"jax {jax.__version__}; host {platform.machine()}")
    rows: list[Row] = []
    for name in chosen:
        if name not in modules:
            raise SystemExit(f"benchmark suite {name!r} cannot be imported on this host")
        suite_rows = modules[name].run(args)
        print(format_table(suite_rows), flush=True)
        rows += suite_rows
    if len(chosen) > 1:
        print("\nall suites:\n" + format_table(rows))
    if args.targets:
        print("\n" + format_targets(rows, dev.device_kind))
    return rows


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


def _importable(name: str) -> bool:
    try:
        importlib.import_module(f"experiments.benchmarks.{name}")
        return True
    except ImportError as e:  # e.g. no TensorFlow on a bare accelerator host
        print(f"(suite {name} unavailable: {e})")
        return False


if __name__ == "__main__":
    main()
