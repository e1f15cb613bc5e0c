"""Shared timing helpers and the result row of every benchmark suite."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

import jax

from ssd_jax.errors import UserError


@dataclasses.dataclass
class Row:
    """One line of the table: what was timed, ours and the peer's throughput in `unit`."""

    name: str
    ours: float
    peer: float | None = None
    unit: str = "img/s"
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if not self.peer else self.ours / self.peer


def time_jax(fn: Callable[[], object], *, warmup: int = 2, min_time: float = 1.0,
             min_iters: int = 3) -> float:
    """Seconds per call of `fn` (its outputs are blocked on), after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < min_time:
        jax.block_until_ready(fn())
        iters += 1
    return (time.perf_counter() - start) / iters


def time_torch(fn: Callable[[], object], *, warmup: int = 2, min_time: float = 1.0,
               min_iters: int = 3) -> float:
    """Seconds per call of a torch `fn`, synchronizing CUDA when it is in use."""
    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    iters, start = 0, time.perf_counter()
    while iters < min_iters or time.perf_counter() - start < min_time:
        fn()
        iters += 1
    sync()
    return (time.perf_counter() - start) / iters


def interleaved(timers: Sequence[Callable[[], float] | None], rounds: int) -> list[float | None]:
    """Median seconds per call of each timer (a `time_jax`/`time_torch` block) over `rounds`
    rounds that take turns: timer 0, 1, ..., 0, 1, ... A busy spell of the machine then lands in
    one round of each side instead of in all of one side's time, so a ratio of the medians
    compares the sides under the same conditions. None timers give None."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    times: list[list[float]] = [[] for _ in timers]
    for _ in range(rounds):
        for i, timer in enumerate(timers):
            if timer is not None:
                times[i].append(float(timer()))
    return [statistics.median(t) if t else None for t in times]


#: Dense peak TFLOP/s of the cards the targets are set on (vendor datasheet, SXM): bf16 tensor
#: cores, and TF32 (what XLA and cuDNN use for float32 convolutions by default).
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp32": 494.0}, "H100": {"bf16": 989.0, "fp32": 494.0}}


def achieved(flops: float | None, seconds: float, dtype_name: str) -> str:
    """'X TFLOP/s (Y% of <card>'s dense <dtype> peak)' for one call of `flops` in `seconds`
    ('' without a count). Counts come from `models.flops_per_image` (XLA's analysis of the forward
    on the host CPU: the GPU's leaves out cuDNN's convolutions)."""
    if not flops:
        return ""
    tflops = flops / seconds / 1e12
    kind = jax.devices()[0].device_kind
    card = next((c for c in PEAK_TFLOPS if c in kind), None)
    if card is None:
        return f"{tflops:.1f} TFLOP/s"
    peak = PEAK_TFLOPS[card][dtype_name]
    return f"{tflops:.1f} TFLOP/s = {100 * tflops / peak:.0f}% of the {card}'s {dtype_name} peak"


def format_table(rows: list[Row]) -> str:
    """A plain-text table: name, ours, peer, ratio."""
    header = f"{'benchmark':<58} {'ssd_jax':>12} {'torchvision':>12} {'ratio':>7}  unit"
    lines = [header, "-" * len(header)]
    for r in rows:
        peer = f"{r.peer:12.1f}" if r.peer else f"{'-':>12}"
        ratio = f"{r.ratio:7.2f}" if r.ratio else f"{'-':>7}"
        note = f"  ({r.note})" if r.note else ""
        lines.append(f"{r.name:<58} {r.ours:12.1f} {peer} {ratio}  {r.unit}{note}")
    return "\n".join(lines)


def items(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The entries of a list flag (absl's DEFINE_list gives a list; a str is split on commas)."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else value
    return [str(p).strip() for p in parts if str(p).strip()]


def int_items(value: str | list[str] | tuple[str, ...] | None, flag: str) -> list[int]:
    """`items(value)` as positive integers; UserError naming `flag` otherwise."""
    out = []
    for item in items(value):
        try:
            n = int(item)
        except ValueError:
            n = 0
        if n < 1:
            raise UserError(f"--{flag}: {item!r} is not a positive integer")
        out.append(n)
    return out


def dtype_items(value: str | list[str] | tuple[str, ...] | None, flag: str) -> list[str]:
    """`items(value)`, each fp32 or bf16; UserError naming `flag` otherwise."""
    out = items(value)
    for d in out:
        if d not in ("fp32", "bf16"):
            raise UserError(f"--{flag}: {d!r} is not fp32 or bf16")
    return out
