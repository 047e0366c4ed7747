"""What a run leaves on disk: config, metrics.jsonl, status.json, and each rank's exit record.

Only rank 0 writes the run's files. Other ranks get the same object with
``enabled=False``, so the training loop never branches on the rank around its
I/O. The one exception is the exit record (:func:`write_exit_record`): every
rank writes its own, since only a rank knows how it ended.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from albor.atomic_files import write_json_atomic, write_text_atomic

METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
RANKS_DIR = "ranks"


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


def exit_record_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / RANKS_DIR / f"rank-{rank}.exit.json"


def clear_exit_records(run_dir: Path) -> int:
    """Remove the exit records an earlier attempt in ``run_dir`` left (a resumed run writes its own); how many."""
    records = sorted((Path(run_dir) / RANKS_DIR).glob("rank-*.exit.json"))
    for path in records:
        path.unlink()
    return len(records)


def write_exit_record(run_dir: Path, rank: int, exit_code: int) -> None:
    """``ranks/rank-R.exit.json``: how this rank ended, written by the rank itself just before it exits.

    The launcher reports one code for the job (the first failed rank it polls);
    these records say what each rank did, which status.json alone cannot after a
    rank was killed outright.
    """
    write_json_atomic(exit_record_path(run_dir, rank), {"rank": rank, "exit_code": exit_code, "pid": os.getpid(), "host": socket.gethostname()})
