"""Reading a run directory for a report: metrics.jsonl, the epoch metadata, status.json, config.yaml.

A report is read while a run may still be writing, so the reader forgives
what a live or killed run leaves: a torn last line of metrics.jsonl, a
status.json that still says ``running``, no epoch checkpoint yet. What it does
not forgive is a path that is not a run at all: that is a :class:`ConfigError`
(exit 2) naming the path and the fix. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import yaml

from albor.errors import ConfigError
from albor.run_files import CONFIG_FILE, METRICS_FILE, STATUS_FILE, finite_number

EPOCH_METADATA_GLOB = "ckpt/epoch-*.metadata.json"  # preemption checkpoints (step-*) carry no val_loss
#: The per-step fields a report draws; a row without one of them (finite numbers) counts as unreadable.
#: gpu_util_pct is not among them: a row may hold null there (no GPU), and the figure says so.
DRAWN_FIELDS = ("train_loss", "grad_norm", "lr", "tokens_per_sec", "wall_ms")


@dataclasses.dataclass(frozen=True)
class RunData:
    """What a run directory holds, as plain values; absent files are empty, never an error."""

    run_dir: Path
    rows: list[dict[str, Any]]  # metrics.jsonl, one per step, in step order
    skipped_lines: int  # lines of metrics.jsonl that are not a JSON object (a live run's torn last line)
    epochs: list[dict[str, Any]]  # ckpt/epoch-NNN.metadata.json, in epoch order
    status: dict[str, Any]  # status.json; {} before a run wrote one
    config: dict[str, Any]  # config.yaml as written by the run; {} when absent or unreadable
    vocab_size: int | None  # from the newest .apr, for gate 005's from-scratch epoch-0 cap


def read_run(run_dir: Path) -> RunData:
    """Read ``run_dir``; raise ConfigError when it is not a run directory or holds no step yet."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"{run_dir} does not exist: pass a run directory (the --output-dir of albor pretrain)")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file: pass a run directory (the --output-dir of albor pretrain)")
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        if not (run_dir / STATUS_FILE).is_file():
            raise ConfigError(
                f"{run_dir} is not a run directory (no {METRICS_FILE}, no {STATUS_FILE}): "
                "pass the --output-dir of an albor pretrain run"
            )
        raise ConfigError(f"{run_dir} has no {METRICS_FILE} yet: the run has not finished a step; try again after its first step")
    try:
        text = metrics.read_text(errors="replace")
    except OSError as e:
        raise ConfigError(f"cannot read {metrics}: {e.strerror}: check its permissions") from None
    rows, skipped = parse_metrics(text)
    if not rows:
        raise ConfigError(f"{metrics} holds no complete step yet: try again after the run's first step")
    epochs = [m for m in (_read_json(p) for p in sorted(run_dir.glob(EPOCH_METADATA_GLOB))) if "epoch" in m]
    return RunData(
        run_dir=run_dir,
        rows=rows,
        skipped_lines=skipped,
        epochs=sorted(epochs, key=lambda m: m["epoch"]),
        status=_read_json(run_dir / STATUS_FILE),
        config=_read_yaml(run_dir / CONFIG_FILE),
        vocab_size=_vocab_size(sorted(run_dir.glob("ckpt/epoch-*.apr"))),
    )


def parse_metrics(text: str) -> tuple[list[dict[str, Any]], int]:
    """(rows by step, number of unreadable lines) from metrics.jsonl's text.

    A live run may be caught mid-write, so a line that does not parse is
    counted and skipped rather than fatal. A step recorded twice keeps its last
    row: the record a resumed run wrote wins over the one it replaced.
    """
    by_step: dict[int, dict[str, Any]] = {}
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if not (isinstance(row, dict) and isinstance(row.get("step"), int) and all(finite_number(row.get(k)) for k in DRAWN_FIELDS)):
            skipped += 1
            continue
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)], skipped


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or replaced between listing and reading
        return {}
    return value if isinstance(value, dict) else {}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


# The .apr header fields that locate its JSON metadata (docs/checkpoints.md): metadata_offset u64 at
# byte 12, metadata_size u32 at byte 20. albor.apr reads the whole file through torch; a report
# needs one number and must start without torch.
_APR_META = struct.Struct("<QI")
_APR_META_AT = 12


def _vocab_size(aprs: list[Path]) -> int | None:
    """vocab_size from the JSON metadata of the newest readable .apr, or None."""
    for path in reversed(aprs):
        try:
            with open(path, "rb") as f:
                head = f.read(64)
                if head[:4] != b"APR\x00":
                    continue
                offset, size = _APR_META.unpack_from(head, _APR_META_AT)
                f.seek(offset)
                meta = json.loads(f.read(size))
            return int(meta["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            continue
    return None
