"""What a run leaves on disk: metrics.jsonl, per-epoch metadata, status.json.

Only rank 0 writes. Other ranks get the same object with ``enabled=False``,
so the training loop never branches on the rank around its I/O.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename.

    A crash leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; run files are for the whole team
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    """Atomic JSON write (see :func:`write_text_atomic`); NaN/Inf are refused, not written."""
    write_text_atomic(path, json.dumps(payload, indent=2, allow_nan=False) + "\n")


class RunFiles:
    """The run directory's files, written by rank 0 only."""

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._metrics = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Line-buffered: each step's line reaches the OS as soon as it is written.
            self._metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def status_path(self) -> Path:
        return self.run_dir / "status.json"

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One JSON object a line, flushed per step (gate 001)."""
        if self._metrics is not None:
            self._metrics.write(json.dumps(record, allow_nan=False) + "\n")

    def write_json(self, path: Path, payload: Any) -> None:
        """Atomic JSON write under the run directory (metadata, status, config)."""
        if self.enabled:
            write_json_atomic(path, payload)

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            write_text_atomic(self.run_dir / name, text)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
