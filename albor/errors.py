"""User-facing errors and the process exit codes they map to.

Every failure a user can cause or meet ends the process with one line that
names the problem and the fix, and with one of the exit codes below. Aborts
of the training contract have their own codes in :mod:`albor.contract`.
"""

from __future__ import annotations

import argparse
import enum
import sys
from collections.abc import Callable


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


class UsageErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a ConfigError (exit 2), as every albor command reports one."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see --help)")


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run one albor command's ``body`` and return its exit code.

    What the user can fix ends as one line on stderr, ``{prog}: error: ...``:
    an :class:`AlborError` with its own code, or a disk that fails under a
    write (full, read-only, gone) with :attr:`ExitCode.DATA`. argparse's
    ``--help`` returns 0.
    """
    try:
        return body()
    except SystemExit as e:
        return int(e.code or 0)
    except AlborError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return int(e.exit_code)
    except OSError as e:
        where = e.filename if e.filename is not None else "its output"
        print(f"{prog}: error: {where}: {e.strerror or e}; check the path, its permissions and free disk space",
              file=sys.stderr)
        return int(ExitCode.DATA)
