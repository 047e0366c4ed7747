"""User-facing errors and the process exit codes they map to.

Every failure a user can cause or meet ends the process with one line that
names the problem and the fix, and with one of the exit codes below. Aborts
of the training contract have their own codes in :mod:`albor.contract`.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class ExitCode(enum.IntEnum):
    """Process exit codes of every albor command (documented in README and docs/exit-codes.md)."""

    OK = 0
    INTERNAL_ERROR = 1  # an unexpected exception: a bug in albor, please report it
    USAGE = 2  # bad flag, bad config value, contradictory DeepSpeed config
    DATA = 3  # dataset or tokenizer missing, malformed or too small
    TARGET_NOT_MET = 4  # the run ended cleanly but final val_loss > target_val_loss (gate 003)
    CHECKPOINT_FAILED = 5  # an epoch checkpoint could not be written; the run stopped
    UNSUPPORTED_ENVIRONMENT = 6  # the installed torch/DeepSpeed lack a name albor relies on
    DIVERGENCE = 10  # gate 005: val_loss more than doubled between epochs
    DIVERGENCE_AT_EPOCH_ZERO = 11  # gate 005: epoch-0 val_loss above the regime cap
    NUMERICAL_INSTABILITY = 12  # gate 007: NaN/Inf loss, grad norm, lr, val loss, or a skipped step
    THROUGHPUT_OUT_OF_RANGE = 13  # gate 008: tokens/s, GPU util or wall time out of range
    RANK_FAILURE = 14  # an exception on some rank, or a lost peer
    PREEMPTED = 15  # a stop signal reached a rank: every rank saved a checkpoint at the same step; resumable
    PREEMPTION_SAVE_FAILED = 16  # stopped by a signal, but the preemption checkpoint failed or ran out of time
    # Never a rank's own exit code: what `albor status` (or the next --resume) records for a job whose
    # status.json still said "running" when none of its ranks was alive (killed outright: SIGKILL, OOM killer).
    RANKS_LOST = 17


class AlborError(Exception):
    """An error the user can fix; carries its exit code."""

    exit_code: ExitCode = ExitCode.INTERNAL_ERROR


class ConfigError(AlborError):
    """Invalid run configuration or command line."""

    exit_code = ExitCode.USAGE


class UnsupportedEnvironmentError(AlborError):
    """The installed torch or DeepSpeed moved a private name albor relies on."""

    exit_code = ExitCode.UNSUPPORTED_ENVIRONMENT


class DataError(AlborError):
    """Dataset or tokenizer that cannot be used as given."""

    exit_code = ExitCode.DATA


class Interrupted(KeyboardInterrupt):
    """A signal that ends a command the way Ctrl-C does (:func:`signals_interrupt`): its clean-up runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt(*signums: int) -> Iterator[None]:
    """While the block runs, each of ``signums`` raises :class:`Interrupted` in the main thread, as SIGINT does.

    So a SIGTERM (a Slurm time limit, ``timeout``, ``docker stop``) unwinds
    the command through its ``finally`` blocks instead of ending the process
    where it stands. The handlers before are restored after. Off the main
    thread (where Python cannot set handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.signal(signum, _raise_interrupted) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


class UsageErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a ConfigError (exit 2), as every albor command reports one."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see --help)")


def run_command(prog: str, body: Callable[[], int], *, interrupted: str = "") -> int:
    """Run one albor command's ``body`` and return its exit code.

    What the user can fix ends as one line on stderr, ``{prog}: error: ...``:
    an :class:`AlborError` with its own code, or a disk that fails under a
    write (full, read-only, gone) with :attr:`ExitCode.DATA`. argparse's
    ``--help`` returns 0. Ctrl-C (or a signal :func:`signals_interrupt` turned
    into one) ends as one line too, ``{prog}: interrupted by SIGINT`` and
    ``interrupted`` (what it left behind), with the shell's code for the
    signal: 128 + N, 130 for SIGINT, 143 for SIGTERM.
    """
    try:
        return body()
    except SystemExit as e:
        return int(e.code or 0)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"{prog}: interrupted by {signal.Signals(signum).name}{'; ' + interrupted if interrupted else ''}",
              file=sys.stderr)
        return 128 + int(signum)
    except AlborError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return int(e.exit_code)
    except OSError as e:
        where = e.filename if e.filename is not None else "its output"
        print(f"{prog}: error: {where}: {e.strerror or e}; check the path, its permissions and free disk space",
              file=sys.stderr)
        return int(ExitCode.DATA)
