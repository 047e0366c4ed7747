"""What a run leaves on disk: config, metrics.jsonl, status.json, and each rank's start and exit records.

Only rank 0 writes the run's files. Other ranks get the same object with
``enabled=False``, so the training loop never branches on the rank around its
I/O. The exceptions are the rank records: every rank writes its own start
record (:func:`write_start_record`: which process it is, so ``albor status``
can tell whether it still runs) and exit record (:func:`write_exit_record`:
since only a rank knows how it ended).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from albor.atomic_files import write_json_atomic, write_text_atomic

CONFIG_FILE = "config.yaml"  # the resolved configuration, as YAML
METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
RANKS_DIR = "ranks"
#: How long rank 0 waits for a lost peer's exit record to appear (a shared file system may show it late).
PEER_RECORD_WAIT_S = 2.0


class RunFiles:
    """The run directory's files, written by rank 0 only; every name is relative to the run directory."""

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._metrics = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Line-buffered: each step's line reaches the OS as soon as it is written.
            self._metrics = open(self.run_dir / METRICS_FILE, "a", buffering=1)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One JSON object a line, flushed per step (gate 001)."""
        if self._metrics is not None:
            self._metrics.write(json.dumps(record, allow_nan=False) + "\n")

    def write_json(self, name: str, payload: Any) -> None:
        """Atomic JSON write of ``name`` in the run directory."""
        if self.enabled:
            write_json_atomic(self.run_dir / name, payload)

    def write_text(self, name: str, text: str) -> None:
        """Atomic text write of ``name`` in the run directory."""
        if self.enabled:
            write_text_atomic(self.run_dir / name, text)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def finite_number(value: Any) -> bool:
    """A JSON number in a run file that is finite (JSON's booleans are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def exit_record_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / RANKS_DIR / f"rank-{rank}.exit.json"


def start_record_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / RANKS_DIR / f"rank-{rank}.start.json"


def clear_rank_records(run_dir: Path) -> int:
    """Remove the rank records (exit and start) an earlier attempt in ``run_dir`` left; how many.

    A resumed run's ranks (perhaps fewer) write their own; a stale start record
    would make ``albor status`` probe a process of the earlier attempt.
    """
    ranks = Path(run_dir) / RANKS_DIR
    records = sorted([*ranks.glob("rank-*.exit.json"), *ranks.glob("rank-*.start.json")])
    for path in records:
        path.unlink()
    return len(records)


def write_exit_record(run_dir: Path, rank: int, exit_code: int, *, error: Mapping[str, Any] | None = None) -> None:
    """``ranks/rank-R.exit.json``: how this rank ended, written by the rank itself just before it exits.

    The launcher reports one code for the job (the first failed rank it polls);
    these records say what each rank did, which status.json alone cannot after a
    rank was killed outright. ``error`` (``rank_failure.error_record``) is the
    exception that ended the rank: rank 0 reads it to name a lost peer's error.
    """
    record: dict[str, Any] = {"rank": rank, "exit_code": exit_code, "pid": os.getpid(), "host": socket.gethostname()}
    if error is not None:
        record["error"] = dict(error)
    write_json_atomic(exit_record_path(run_dir, rank), record)


def write_start_record(run_dir: Path, rank: int, world_size: int) -> None:
    """``ranks/rank-R.start.json``: which process this rank is, written by the rank once the run's files exist.

    pid and host alone could name a later, unrelated process once the pid is
    reused; the process's create time (psutil) pins it down.
    """
    import psutil

    write_json_atomic(start_record_path(run_dir, rank), {
        "rank": rank, "world_size": world_size, "pid": os.getpid(), "host": socket.gethostname(),
        "create_time": psutil.Process().create_time(),
    })


def read_rank_records(run_dir: Path, kind: str) -> dict[int, dict[str, Any]]:
    """{rank: record} of every readable ``ranks/rank-R.{kind}.json`` (kind "exit" or "start").

    A record that cannot be read, or names another rank than its file, is skipped:
    it says nothing this rank can trust.
    """
    records: dict[int, dict[str, Any]] = {}
    for path in (Path(run_dir) / RANKS_DIR).glob(f"rank-*.{kind}.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("rank"), int) \
                and path.name == f"rank-{record['rank']}.{kind}.json":
            records[record["rank"]] = record
    return records


def wait_for_peer_records(
    run_dir: Path, own_rank: int, *, until: Callable[[dict[int, dict[str, Any]]], bool],
    timeout_s: float = PEER_RECORD_WAIT_S, poll_s: float = 0.05,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
) -> dict[int, dict[str, Any]]:
    """The other ranks' exit records, as soon as ``until(records)`` holds, or whatever is there after ``timeout_s``.

    Bounded: a peer killed outright never writes one, and the caller is a rank
    on its way out.
    """
    deadline = clock() + timeout_s
    while True:
        peers = {r: rec for r, rec in read_rank_records(run_dir, "exit").items() if r != own_rank}
        if until(peers) or clock() >= deadline:
            return peers
        sleep(poll_s)
