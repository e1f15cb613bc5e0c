"""The mistakes a user can make, as exception types the commands show in one to three lines.

A `UserError` names the parameter, config field or file at fault and what to do about it. The
library speaks of its own parameters (``workdir=/runs/x: no such folder``, with `parameter` set);
the commands (`ssd_jax.cli.run`) say the same of their flag (``--workdir=/runs/x: ...``) and print
it without a traceback (``--debug`` or ``SSD_JAX_DEBUG=1`` shows it). Anything else that escapes
is a bug and keeps its traceback. The subclasses are also ValueErrors, so library callers that
catch ValueError keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message says what is wrong and what to do.

    `parameter`: the library function's parameter at fault when the message starts with it
    (``"workdir=..."``); a command whose flag has that name shows ``--workdir=...``."""

    def __init__(self, *args: object, parameter: str | None = None):
        super().__init__(*args)
        self.parameter = parameter


class ConfigError(UserError, ValueError):
    """A config field has a value that cannot run (names the field: ``config.x.y``)."""


class DataError(UserError, ValueError):
    """The dataset cannot train or evaluate a model (no usable box, suspicious annotations)."""


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint's variables do not fit the model its config describes (names the leaf)."""


class WorkdirMismatchError(UserError, ValueError):
    """A workdir holds a run whose config differs from the one asked for (lists the fields)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a feature needs is not installed (names it and how to install it)."""


class LostProcessError(UserError, RuntimeError):
    """A process of a multi-process run stopped (killed, crashed, its host lost); the message names
    it and the checkpoint the run resumes from. The commands exit at once on it (`os._exit`): the
    distributed runtime's orderly shutdown would wait for the lost process."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training; the message names the step reached and the last
    checkpoint (single-process runs save the step reached first). `signal_name`: the signal."""

    def __init__(self, message: str = "", signal_name: str = "SIGINT"):
        super().__init__(message)
        self.signal_name = signal_name


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of `e`'s message (its type's name when empty), at most `limit` characters:
    the part of a library error that goes into a one-line message."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
