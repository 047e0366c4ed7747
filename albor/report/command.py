"""``albor report RUN_DIR``: draw ``RUN_DIR/report.png`` and print the run's summary.

Exit codes: 0 the report was written; 2 the path is not a run directory, the
run has no complete step yet, or the figure cannot be written there; 6
matplotlib is not installed; 1 a bug in albor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from albor.errors import ConfigError, ExitCode, UnsupportedEnvironmentError, UsageErrorParser, run_command

PROG = "albor report"
FIGURE_NAME = "report.png"


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(
        prog=PROG,
        description="Draw a run's report.png (losses, gate 005's limits, lr, grad norm, throughput, GPU "
        "utilisation) and print its summary. Works on a finished, a stopped and a still-running run.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 not a run directory / no complete step yet / "
        "the figure cannot be written, 6 matplotlib missing.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's directory (albor pretrain's --output-dir)")
    p.add_argument("-o", "--output", type=Path, metavar="PNG", help=f"where to write the figure (default RUN_DIR/{FIGURE_NAME})")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the process exit code."""

    def body() -> int:
        args = build_parser().parse_args(argv)
        sys.stdout.write(report(args.run_dir, args.output))
        return int(ExitCode.OK)

    return run_command(PROG, body)


def report(run_dir: Path, output: Path | None = None) -> str:
    """Write the figure (atomically) and return the summary text; raise AlborError on bad input."""
    from albor.atomic_files import write_bytes_atomic
    from albor.report.run_reader import read_run
    from albor.report.summary import format_summary, summarize

    run = read_run(run_dir)
    summary = summarize(run)
    try:
        from albor.report.figure import render_png
    except ImportError as e:
        raise UnsupportedEnvironmentError(
            f"drawing the figure needs matplotlib ({e}): pip install matplotlib, or reinstall albor"
        ) from None
    png = render_png(run, summary)
    target = output if output is not None else run.run_dir / FIGURE_NAME
    try:
        write_bytes_atomic(target, png)
    except OSError as e:
        raise ConfigError(f"cannot write {target}: {e.strerror}: pass --output PATH somewhere writable") from None
    return format_summary(summary, run_dir=str(run.run_dir), figure=str(target))
