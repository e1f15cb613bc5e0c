"""Host process tuning for a CPU-bound run: explicit functions the commands (`ssd_jax.cli.run`)
call first, and a notebook may call too. Importing this module changes nothing; each function
says what it changes in the process.
"""

from __future__ import annotations

import os
from typing import Any

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _glibc(name: str, argtypes: list[Any]) -> Any:
    """The C library's function `name` (returning int), or None where it has none (macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    XLA:CPU allocates every step's temporaries afresh; by default glibc maps each large one
    (above the mmap threshold) and unmaps it when freed, or trims the heap, so the next step
    touches new pages: 69 million page faults and 206 s of system time in a 14-minute default run
    on a 2-core AMD EPYC (a step's temporaries are one buffer of tens of MB). With the mmap
    threshold at 1 GB and trimming off, 1000 steps of the default's loop (4000 images, two
    interleaved A/B pairs) took 1:57 and 2:07 instead of 2:15 and 2:19 (92-99 and 83-88 img/s
    instead of 76-82 and 74-86), with the same losses, 0.4M page faults instead of 10.2M and
    peak RSS +0.1-0.16 GB. The commands call this first; a notebook can too.
    Returns False where there is no glibc mallopt (macOS, musl): nothing changes there.
    """
    import ctypes

    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 2**30)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Give the heap's free memory back to the OS now (glibc malloc_trim), although
    `keep_freed_memory` turned automatic trimming off. Training calls it after compiling its
    steps (XLA's compile leaves ~0.5 GB of freed heap) and before it loads the data. Returns
    False where there is no glibc malloc_trim."""
    import ctypes

    trim = _glibc("malloc_trim", [ctypes.c_size_t])
    if trim is None:
        return False
    trim(0)
    return True


#: XLA:CPU runs convolutions with YNNPACK by default; Eigen's convolutions use both cores of a
#: small CPU far better (see `prefer_eigen_convolutions`).
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def prefer_eigen_convolutions() -> bool:
    """Have XLA:CPU run convolutions with Eigen instead of YNNPACK (appends to XLA_FLAGS).

    YNNPACK splits each convolution between the cores but left them idle half the time: the
    default's train step (compact model, batch 8) ran at 90-101 img/s with 143% CPU on a 2-core
    AMD EPYC, and at 124-138 img/s with 190% CPU with Eigen's convolutions (interleaved A/B,
    300 steps each). Effective only before JAX starts its CPU backend; a flag the user already set
    for `xla_cpu_experimental_ynn_fusion_type` wins. Returns whether the flag is in XLA_FLAGS.
    """
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in current:
        return _YNN_FLAG in current.split()
    os.environ["XLA_FLAGS"] = f"{current} {_YNN_FLAG}".strip()
    return True
