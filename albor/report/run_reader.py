"""Reading a run directory for a report: metrics.jsonl, the epoch checkpoints, status.json, config.yaml.

A report is read while a run may still be writing, so the reader forgives
what a live or killed run leaves: a torn last line of metrics.jsonl, a
status.json that still says ``running``, no epoch checkpoint yet. An
unreadable line before the last is damage, not a live write: it is skipped
and reported by its line number. What the reader does not forgive is a path
that is not a run at all: that is a :class:`ConfigError` (exit 2) naming the
path and the fix. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from albor.errors import ConfigError
from albor.resume_plan import CheckpointOnDisk, scan_checkpoints
from albor.run_files import CONFIG_FILE, METRICS_FILE, STATUS_FILE, finite_number

#: The per-step fields a report reads; a row without one of them (finite numbers) counts as unreadable.
#: gpu_util_pct is not among them: a row may hold null there (no GPU), and the figure says so.
ROW_FIELDS = ("train_loss", "grad_norm", "lr", "tokens_per_sec", "wall_ms", "tokens_seen")


@dataclasses.dataclass(frozen=True)
class Metrics:
    """metrics.jsonl as read: its rows in file order, and the lines that are not rows."""

    rows: list[dict[str, Any]]
    damaged_lines: tuple[int, ...] = ()  # line numbers (from 1) before the last that are not rows: damage
    torn_line: int | None = None  # the last line's number when it is not a row (a live or killed run's half-write)


@dataclasses.dataclass(frozen=True)
class RunData:
    """What a run directory holds, as plain values; absent files are empty, never an error."""

    run_dir: Path
    metrics: Metrics
    epochs: list[CheckpointOnDisk]  # the complete epoch checkpoints, in epoch order
    status: dict[str, Any]  # status.json; {} before a run wrote one
    config: dict[str, Any]  # config.yaml as written by the run; {} when absent or unreadable
    #: The model's vocabulary (gate 005's from-scratch epoch-0 cap), and where it came from or why it is unknown.
    vocab_size: int | None = None
    vocab_source: str = "unknown"

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.metrics.rows


def read_run(run_dir: Path) -> RunData:
    """Read ``run_dir``; raise ConfigError when it is not a run directory or holds no step yet."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"{run_dir} does not exist: pass a run directory (the --output-dir of albor pretrain)")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file: pass a run directory (the --output-dir of albor pretrain)")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        if not (run_dir / STATUS_FILE).is_file():
            raise ConfigError(
                f"{run_dir} is not a run directory (no {METRICS_FILE}, no {STATUS_FILE}): "
                "pass the --output-dir of an albor pretrain run"
            )
        raise ConfigError(f"{run_dir} has no {METRICS_FILE} yet: the run has not finished a step; try again after its first step")
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}: check its permissions") from None
    metrics = parse_metrics(text)
    if not metrics.rows:
        raise ConfigError(f"{path} holds no complete step yet: try again after the run's first step")
    scan = scan_checkpoints(run_dir)
    epochs = sorted((c for c in scan.resumable + scan.complete_not_resumable if c.kind == "epoch"), key=lambda c: c.epoch)
    config = _read_yaml(run_dir / CONFIG_FILE)
    vocab_size, vocab_source = vocab_of(run_dir, epochs, config)
    return RunData(
        run_dir=run_dir,
        metrics=metrics,
        epochs=epochs,
        status=_read_json(run_dir / STATUS_FILE),
        config=config,
        vocab_size=vocab_size,
        vocab_source=vocab_source,
    )


def parse_metrics(text: str) -> Metrics:
    """metrics.jsonl's rows in file order, and which lines are not rows.

    A row is a JSON object with an integer ``step`` and finite :data:`ROW_FIELDS`.
    Only the last line may be half-written (a live run caught mid-write, or a
    killed one); any other line that is not a row is damage.
    """
    rows: list[dict[str, Any]] = []
    unreadable: list[int] = []
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for n, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            unreadable.append(n)
            continue
        if isinstance(row, dict) and type(row.get("step")) is int and all(finite_number(row.get(k)) for k in ROW_FIELDS):
            rows.append(row)
        else:
            unreadable.append(n)
    torn = unreadable.pop() if unreadable and unreadable[-1] == numbered[-1][0] else None
    return Metrics(rows, tuple(unreadable), torn)


def vocab_of(run_dir: Path, epochs: list[CheckpointOnDisk], config: dict[str, Any]) -> tuple[int | None, str]:
    """(the model's vocab_size, where it came from) or (None, why it is unknown).

    The epoch metadata records it. For a run written before it did, or one
    with no epoch yet: the dataset index its config.yaml names (or the run's
    own tokenized cache), when that index is the one the run trained on: the
    fingerprint its epochs recorded, or with no epoch yet, the index as it is now.
    """
    for c in reversed(epochs):
        if type(c.metadata.get("vocab_size")) is int:
            return c.metadata["vocab_size"], f"epoch {c.epoch}'s metadata"
    recorded = {c.metadata.get("dataset_fingerprint") for c in epochs} - {None}
    if epochs and not recorded:
        return None, "its epochs' metadata records neither the vocabulary size nor the dataset's fingerprint"
    # One JSON file read by itself (no shard, no torch); albor.data's own readers check the whole dataset.
    from albor.data.resolve import CACHE_DIR
    from albor.data.shards import INDEX_NAME

    dataset = config.get("dataset")
    candidates = [Path(dataset), Path(dataset) / INDEX_NAME] if isinstance(dataset, str) else []
    for path in [*candidates, run_dir / CACHE_DIR / INDEX_NAME]:
        index = _read_json(path) if path.suffix == ".json" else {}
        vocab = index.get("vocab_size")
        if type(vocab) is int and (not recorded or index.get("fingerprint") in recorded):
            return vocab, f"the dataset index {path}"
    return None, ("no epoch's metadata records the vocabulary size, and no readable dataset index of the run "
                  "(config.yaml's dataset, or the run's data-cache) has the fingerprint it trained on")


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
