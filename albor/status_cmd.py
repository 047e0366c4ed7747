"""``albor status RUN_DIR``: print a run's status; finalise it as ``lost`` when it says running but no rank is alive.

No torch: it answers in well under a second. The decision is
:mod:`albor.reconcile`'s; this module only reads the arguments and prints.

Exit codes: 0 the status was printed (whatever it says; the run's own code is
in it); 2 RUN_DIR is not a run directory, or status.json cannot be rewritten
there; 3 status.json is not readable JSON; 1 a bug in albor.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from albor.errors import ConfigError, DataError, ExitCode, UsageErrorParser, run_command
from albor.reconcile import Verdict, finalise, reconcile
from albor.run_files import STATUS_FILE, read_rank_records

PROG = "albor status"


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(
        prog=PROG,
        description="Print a run's status. When status.json says running but no rank of the job is alive "
        "(killed outright: SIGKILL, the OOM killer, NCCL's watchdog), finalise it as lost (exit code 17) with "
        "what each rank's records say. Ranks on another host are checked only through their exit records.",
        epilog="Exit codes: 0 printed, 1 internal error, 2 not a run directory (or status.json cannot be "
        "rewritten), 3 status.json unreadable.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's directory (albor pretrain's --output-dir)")
    p.add_argument("--json", action="store_true", help="print status.json (after any finalising) instead of a summary")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the process exit code."""

    def body() -> int:
        args = build_parser().parse_args(argv)
        status, verdict, finalised = check(args.run_dir)
        sys.stdout.write(json.dumps(status, indent=2) + "\n" if args.json
                         else format_status(args.run_dir, status, verdict, finalised=finalised))
        return int(ExitCode.OK)

    return run_command(PROG, body)


def check(run_dir: Path) -> tuple[dict[str, Any], Verdict, bool]:
    """(status.json as it now stands, the verdict, whether this call finalised it); AlborError on a bad RUN_DIR."""
    if not (run_dir / STATUS_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {STATUS_FILE}): pass albor pretrain's --output-dir")
    try:
        verdict = reconcile(run_dir)
    except ValueError as e:
        raise DataError(f"{run_dir / STATUS_FILE} is not readable JSON ({e})") from None
    try:
        written = finalise(run_dir, verdict, by=PROG)
    except OSError as e:
        raise ConfigError(f"the run is over but {run_dir / STATUS_FILE} cannot be rewritten ({e}): "
                          "run albor status as a user who can write the run directory") from None
    return (written if written is not None else dict(verdict.status or {})), verdict, written is not None


def format_status(run_dir: Path, status: Mapping[str, Any], verdict: Verdict, *, finalised: bool) -> str:
    """The summary a person reads: the status, why, and each rank's line."""
    name = status.get("status", "unknown")
    lines = [f"run:      {run_dir}"]
    if name == "running":
        lines.append(f"status:   running (world size {status.get('world_size', '?')}): {verdict.why}")
    else:
        head = f"status:   {name} (exit {status.get('exit_code')}, {status.get('reason')})"
        lines.append(head + (f": finalised now by {PROG}" if finalised else ""))
        abort = status.get("abort")
        if isinstance(abort, Mapping) and abort.get("message"):
            lines.append(f"message:  {abort['message']}")
    for view in verdict.ranks:
        lines.append(f"rank {view.rank}:   {view.words}")
    if not verdict.ranks:  # an ended run: what a finalised status says of each rank, else the exit records
        ranks = status.get("ranks") if isinstance(status.get("ranks"), list) else [
            {"rank": rank, **record} for rank, record in sorted(read_rank_records(run_dir, "exit").items())]
        for entry in ranks:
            said = f"exited {entry['exit_code']}" if "exit_code" in entry else entry.get("ended", "no exit record")
            lines.append(f"rank {entry.get('rank')}:   {said}")
    if status.get("resume_command") and name not in ("running", "ok", "early_stop"):
        lines.append(f"resume:   {status['resume_command']}")
    return "\n".join(lines) + "\n"
