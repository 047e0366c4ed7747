"""Is a "running" run still running? Reconciling status.json with the ranks' processes.

A rank killed outright (SIGKILL, the kernel's OOM killer, NCCL's watchdog abort)
runs no Python on its way out: it writes no exit record, and if it was rank 0,
status.json keeps saying "running" about a job that is over. Each rank
therefore leaves a start record (``run_files.write_start_record``: pid, host,
process create time). :func:`reconcile` compares those with the processes alive
on this host and, when no rank of the job is alive, :func:`finalise` rewrites
status.json as ``lost`` (``ExitCode.RANKS_LOST``) with what each rank's
records say. ``albor status`` runs it, and so does the next ``--resume`` start,
before it clears the old records. See docs/exit-codes.md (code 17).

The decision (:func:`judge`, :func:`lost_status`) is pure; only :func:`probe`
looks at processes and only :func:`reconcile` / :func:`finalise` touch files.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from albor.atomic_files import write_json_atomic
from albor.errors import ExitCode
from albor.rank_failure import describe
from albor.run_files import METRICS_FILE, STATUS_FILE, read_rank_records

ALIVE, EXITED, KILLED, UNKNOWN = "alive", "exited", "killed", "unknown"
LOST = "lost"  # status.json's status for a job found over without a final word
#: Create times within this are the same process (psutil derives them from boot time and clock ticks).
_SAME_START_S = 0.01
#: Enough of metrics.jsonl's end to hold its last line.
_TAIL_BYTES = 1 << 16


@dataclasses.dataclass(frozen=True)
class RankView:
    """One rank of the job, as its records and this host's process table show it."""

    rank: int
    state: str  # ALIVE, EXITED (it wrote an exit record), KILLED (gone without one), UNKNOWN
    words: str  # what a person reads
    exit_record: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What :func:`reconcile` found; ``lost`` means status.json must be finalised."""

    status: Mapping[str, Any] | None  # status.json as read (None: there is none)
    lost: bool
    ranks: tuple[RankView, ...]
    why: str  # one line: why the run is (or is not) taken to be over

    @property
    def state(self) -> str:
        return str(self.status.get("status")) if self.status else "missing"


def probe(start: Mapping[str, Any], *, host: str) -> tuple[str, str]:
    """(ALIVE | KILLED | UNKNOWN, words) for the process a start record names, seen from ``host``."""
    import psutil

    pid, where = start.get("pid"), start.get("host")
    if where != host:
        return UNKNOWN, f"runs on host {where}: cannot be checked from {host}"
    try:
        proc = psutil.Process(pid)
        same = abs(proc.create_time() - float(start.get("create_time", -1))) < _SAME_START_S
        if same and proc.status() != psutil.STATUS_ZOMBIE:  # a zombie has died; only its parent has not reaped it
            return ALIVE, f"alive (pid {pid})"
    except psutil.NoSuchProcess:
        pass
    except (psutil.AccessDenied, TypeError, ValueError) as e:
        return UNKNOWN, f"pid {pid} cannot be checked ({type(e).__name__})"
    return KILLED, f"pid {pid} on {where} is gone"


def judge(
    status: Mapping[str, Any] | None,
    starts: Mapping[int, Mapping[str, Any]],
    exits: Mapping[int, Mapping[str, Any]],
    liveness: Mapping[int, tuple[str, str]],
) -> Verdict:
    """Whether a run whose status.json says "running" is over: no rank alive, and every rank accounted for.

    ``liveness`` is :func:`probe` of each start record. A rank is accounted for by
    its exit record, or by a start record whose process is gone from this host.
    A rank on another host (or with no start record) is accounted for only by an
    exit record, so a job with such a rank stays "running" until it has one.
    """
    if not status or status.get("status") != "running":
        return Verdict(status, False, (), "status.json does not say running: nothing to reconcile")
    world = status.get("world_size")
    if not isinstance(world, int) or world < 1:
        world = max((int(s.get("world_size", 0)) for s in starts.values()), default=0)
    views = []
    for rank in range(world):
        start = starts.get(rank)
        if start is not None and start.get("world_size") not in (None, world):
            start = None  # an earlier attempt's, at another world size
        state, words = liveness.get(rank, (UNKNOWN, "")) if start is not None else (UNKNOWN, "no start record")
        record = exits.get(rank)
        if state != ALIVE and record is not None:
            views.append(RankView(rank, EXITED, _exited_words(record), record))
        elif state == KILLED:
            views.append(RankView(rank, KILLED, f"killed outright: no exit record, and {words}"))
        else:
            views.append(RankView(rank, state, words or state))
    views_t = tuple(views)
    if not views_t:
        return Verdict(status, False, views_t, "no rank left a start record: it cannot be told whether the job runs")
    if alive := [v.rank for v in views_t if v.state == ALIVE]:
        return Verdict(status, False, views_t, f"rank(s) {_ranks(alive)} still alive")
    if unknown := [v.rank for v in views_t if v.state == UNKNOWN]:
        return Verdict(status, False, views_t, f"rank(s) {_ranks(unknown)} cannot be checked from here and left no "
                                               "exit record: run albor status on their host, or wait for their records")
    return Verdict(status, True, views_t, "no rank of the job is alive, but status.json said running")


def _exited_words(record: Mapping[str, Any]) -> str:
    error = record.get("error")
    return f"exited {record.get('exit_code')}" + (f": {describe(error)}" if isinstance(error, Mapping) else "")


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def lost_status(
    verdict: Verdict, *, by: str, at: str, host: str, steps_completed: int | None, epochs_completed: int
) -> dict[str, Any]:
    """status.json for a job found over while it said "running": status ``lost``, exit code 17.

    The running status's own keys (world size, resume command, resumed_from) stay;
    ``ranks`` says what each rank's records say; ``abort.ranks`` names the ranks
    killed outright (no exit record).
    """
    assert verdict.lost and verdict.status is not None
    killed = [v.rank for v in verdict.ranks if v.state == KILLED]
    said = "; ".join(f"rank {v.rank} {v.words}" for v in verdict.ranks)
    message = f"{verdict.why} ({by} found it): {said}"
    if killed:
        message += (". A rank killed outright (SIGKILL, the kernel's OOM killer, NCCL's watchdog) writes no "
                    "record: read the job's log and the kernel log (dmesg) of its host")
    per_rank = []
    for v in verdict.ranks:
        entry: dict[str, Any] = {"rank": v.rank, "ended": "exit record" if v.state == EXITED else "killed outright"}
        if v.exit_record is not None:
            entry.update({k: v.exit_record[k] for k in ("exit_code", "error", "pid", "host") if k in v.exit_record})
        per_rank.append(entry)
    return {
        **verdict.status,
        "status": LOST,
        "exit_code": int(ExitCode.RANKS_LOST),
        "reason": "ranks_lost",
        "abort": {"reason": "ranks_lost", "message": message, "step": steps_completed, "epoch": None,
                  "field": None, "value": None, "ranks": killed},
        "epochs_completed": epochs_completed,
        "steps_completed": steps_completed,
        "final_val_loss": None,
        "ranks": per_rank,
        "reconciled": {"by": by, "at": at, "host": host},
    }


def reconcile(run_dir: Path, *, host: str | None = None,
              probe_fn: Callable[..., tuple[str, str]] = probe) -> Verdict:
    """Read the run's records and judge it (nothing is written).

    The processes are probed before the exit records and status.json are read:
    a rank found gone has written all it ever will, so the files read after
    cannot be older than what the probe saw.
    """
    run_dir = Path(run_dir)
    host = host or socket.gethostname()
    starts = read_rank_records(run_dir, "start")
    liveness = {rank: probe_fn(start, host=host) for rank, start in starts.items()}
    exits = read_rank_records(run_dir, "exit")
    return judge(_read_status(run_dir), starts, exits, liveness)


def finalise(run_dir: Path, verdict: Verdict, *, by: str, host: str | None = None) -> dict[str, Any] | None:
    """Write the lost status (atomically) if status.json is still the one judged; what was written, or None."""
    run_dir = Path(run_dir)
    if not verdict.lost or _read_status(run_dir) != verdict.status:
        return None  # nothing to do, or a new attempt started meanwhile: its status stands
    at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = lost_status(verdict, by=by, at=at, host=host or socket.gethostname(),
                      steps_completed=last_logged_step(run_dir / METRICS_FILE),
                      epochs_completed=len(list((run_dir / "ckpt").glob("epoch-*.metadata.json"))))
    write_json_atomic(run_dir / STATUS_FILE, out)
    return out


def reconcile_before_resume(run_dir: Path, log: logging.Logger) -> Verdict | None:
    """The resume start's check of the attempt before it (rank 0, before the old records are cleared); never raises.

    A job that was killed outright gets its final status ``lost`` here, logged, and
    then the new attempt's "running". A live one is only warned about.
    """
    try:
        verdict = reconcile(run_dir)
        if verdict.lost and finalise(run_dir, verdict, by="albor pretrain --resume") is not None:
            log.warning("resume: the previous attempt ended without a final status: %s", "; ".join(
                f"rank {v.rank} {v.words}" for v in verdict.ranks))
        elif verdict.state == "running":
            log.warning("resume: status.json still says running (%s); resuming over it", verdict.why)
        return verdict
    except (OSError, ValueError) as e:  # a check that cannot run must not stop the resume
        log.warning("resume: could not check the previous attempt's ranks (%s)", e)
        return None


def last_logged_step(metrics: Path) -> int | None:
    """Steps logged in metrics.jsonl: the last complete line's step + 1 (None without one)."""
    try:
        with open(metrics, "rb") as f:
            start = max(0, f.seek(0, 2) - _TAIL_BYTES)
            f.seek(start)
            lines = f.read().split(b"\n")
    except OSError:
        return None
    for line in reversed(lines[1:] if start else lines):  # after a seek, the first line may be cut
        try:
            return int(json.loads(line)["step"]) + 1
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _read_status(run_dir: Path) -> dict[str, Any] | None:
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text())
    except FileNotFoundError:
        return None
    return status if isinstance(status, dict) else None
