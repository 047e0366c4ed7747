"""What a run leaves on disk: metrics.jsonl, per-epoch metadata, status.json.

Only rank 0 writes. Other ranks get the same object with ``enabled=False``,
so the training loop never branches on the rank around its I/O.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from albor.atomic_files import write_json_atomic, write_text_atomic


class RunFiles:
    """The run directory's files, written by rank 0 only."""

    def __init__(self, run_dir: Path, *, enabled: bool) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._metrics = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Line-buffered: each step's line reaches the OS as soon as it is written.
            self._metrics = open(self.metrics_path, "a", buffering=1)

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
