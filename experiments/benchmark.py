"""Throughput of ssd_jax against torchvision's SSD, side by side in one run.

    python -m experiments.benchmark                      # every suite that fits this host
    python -m experiments.benchmark --suite core --suite detect --no-peer

Suites (experiments/benchmarks/*.py): core (matching + multibox loss), model (forward and train
step), detect (post-processing), inference (network + detect, end to end), data (input pipeline;
needs TensorFlow). The table prints
images/sec for ours, the peer, and their ratio. Never imported by tests for timing.
"""

from __future__ import annotations

import argparse
import importlib
import platform

import jax

from experiments.benchmarks.common import Row, format_table

SUITES = ("core", "model", "detect", "inference", "data")


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--suite", action="append", choices=SUITES,
                        help="suite to run (repeatable); default: all")
    parser.add_argument("--no-peer", action="store_true", help="skip the torchvision peer runs")
    parser.add_argument("--quick", action="store_true", help="small sizes, short timings (smoke run)")
    modules = {name: importlib.import_module(f"experiments.benchmarks.{name}") for name in SUITES
               if _importable(name)}
    for mod in modules.values():
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(parser)
    args = parser.parse_args(argv)
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
    return rows


def _importable(name: str) -> bool:
    try:
        importlib.import_module(f"experiments.benchmarks.{name}")
        return True
    except ImportError as e:  # e.g. no TensorFlow on a bare accelerator host
        print(f"(suite {name} unavailable: {e})")
        return False


if __name__ == "__main__":
    main()
