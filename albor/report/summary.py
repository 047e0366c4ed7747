"""The numbers of a run report, computed from a :class:`RunData` (pure functions, no I/O).

The figure and the printed summary both come from here, so what the picture
shows and what the text says cannot disagree.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

from albor.contract import DIVERGENCE_RATIO_LIMIT, Regime
from albor.report.run_reader import RunData
from albor.run_files import finite_number

#: Statuses of a run that ended by its own verdict (gates 003/004); every other ended status is a stop.
FINISHED = ("ok", "early_stop")


@dataclasses.dataclass(frozen=True)
class Summary:
    status: str  # status.json's status; "unknown" when the run wrote none
    reason: str | None
    exit_code: int | None
    message: str | None  # the abort's own words
    steps_recorded: int
    last_step: int
    total_steps: int | None
    epochs_checkpointed: int
    best_val_loss: float | None
    best_epoch: int | None
    final_val_loss: float | None  # only for a run that finished; None while running or after a stop
    target_val_loss: float | None
    target_met: bool | None
    tokens_seen: int
    median_step_ms: float
    median_tokens_per_sec: float
    median_mfu: float | None  # None: no step knew its device's peak FLOP/s
    optimizer_sha: str | None  # the last checkpointed epoch's
    sha_epoch: int | None
    gpu_measured: bool  # some rank reported a non-zero utilisation at some step
    skipped_lines: int


def summarize(run: RunData) -> Summary:
    """Everything the printed summary states, from the run's files."""
    rows, status, config = run.rows, run.status, run.config
    val = [(m["epoch"], m["val_loss"]) for m in run.epochs if finite_number(m.get("val_loss"))]
    best = min(val, key=lambda ev: ev[1]) if val else None
    name = str(status.get("status") or "unknown")
    final = status.get("final_val_loss") if name in FINISHED and finite_number(status.get("final_val_loss")) else None
    target = status.get("target_val_loss", config.get("target_val_loss"))
    target = float(target) if finite_number(target) else None
    abort = status.get("abort") if isinstance(status.get("abort"), dict) else {}
    last_meta = run.epochs[-1] if run.epochs else {}
    mfu = [r["mfu"] for r in rows if finite_number(r.get("mfu"))]
    return Summary(
        status=name,
        reason=status.get("reason"),
        exit_code=status.get("exit_code"),
        message=abort.get("message"),
        steps_recorded=len(rows),
        last_step=rows[-1]["step"],
        total_steps=config.get("total_steps"),
        epochs_checkpointed=len(run.epochs),
        best_val_loss=best[1] if best else None,
        best_epoch=best[0] if best else None,
        final_val_loss=final,
        target_val_loss=target,
        target_met=None if final is None or target is None else final <= target,
        tokens_seen=tokens_seen(rows),
        median_step_ms=statistics.median(r["wall_ms"] for r in rows),
        median_tokens_per_sec=statistics.median(r["tokens_per_sec"] for r in rows),
        median_mfu=statistics.median(mfu) if mfu else None,
        optimizer_sha=last_meta.get("optimizer_state_sha"),
        sha_epoch=last_meta.get("epoch"),
        gpu_measured=any(v > 0 for v in gpu_readings(rows)),
        skipped_lines=run.skipped_lines,
    )


def tokens_seen(rows: Sequence[dict[str, Any]]) -> int:
    """Tokens trained on up to the last recorded step (a resumed run counts from its start, not its resume)."""
    last = rows[-1].get("tokens_seen")
    if isinstance(last, int):
        return last
    # Rows without the running count: the contract's identity tokens = tokens/s x wall.
    return round(sum(r["tokens_per_sec"] * r["wall_ms"] / 1000.0 for r in rows))


def per_rank(row: dict[str, Any], key: str, mean_key: str) -> list[float] | None:
    """A row's per-rank values of ``key``, else its mean value ``mean_key`` as one rank, else None."""
    values = row.get(key)
    if isinstance(values, list) and all(finite_number(v) for v in values) and values:
        return [float(v) for v in values]
    return [float(row[mean_key])] if finite_number(row.get(mean_key)) else None


def gpu_readings(rows: Sequence[dict[str, Any]]) -> list[float]:
    """Every rank's GPU utilisation at every step, as recorded (null or absent readings left out)."""
    return [v for r in rows for v in (per_rank(r, "gpu_util_per_rank", "gpu_util_pct") or [])]


def gate005_limits(val_losses: Sequence[float], regime: Regime | None, vocab_size: int | None,
                   *, next_epoch: bool) -> list[tuple[int, float]]:
    """(epoch, highest val_loss gate 005 lets that epoch pass with), for the epochs that have a limit.

    Epoch 0's limit is the regime's cap (from scratch it needs the vocabulary
    size); epoch N ≥ 1's is 2.0 × epoch N-1's val_loss. With ``next_epoch`` the
    limit of the epoch after the last one is included: what a live run must
    stay under next, or what a diverged run went over.
    """
    limits: list[tuple[int, float]] = []
    if regime is Regime.FINETUNE or (regime is Regime.FROM_SCRATCH and vocab_size):
        limits.append((0, regime.epoch_zero_cap(vocab_size or 0)))
    last = len(val_losses) + (1 if next_epoch else 0)
    limits += [(n, DIVERGENCE_RATIO_LIMIT * val_losses[n - 1]) for n in range(1, last)]
    return limits


def regime_of(run: RunData) -> Regime | None:
    try:
        return Regime(run.config.get("regime"))
    except ValueError:
        return None


def format_summary(s: Summary, *, run_dir: str | None = None, figure: str | None = None) -> str:
    """The printed summary: one ``name: value`` line each, in a fixed order (scripts may parse it)."""
    steps = f"{s.steps_recorded} recorded, last step {s.last_step}"
    if s.total_steps:
        steps += f" of {s.total_steps}"
    final = (
        f"{s.final_val_loss:.4f}" if s.final_val_loss is not None
        else "none yet (the run is still running)" if s.status == "running"
        else f"none (the run ended {s.status})"
    )
    target = "unknown" if s.target_val_loss is None else f"{s.target_val_loss:g}" + (
        "" if s.target_met is None else " (met)" if s.target_met else " (missed)"
    )
    lines = [
        *([("run", run_dir)] if run_dir else []),
        ("status", s.status + ("" if s.exit_code is None else f" (exit {s.exit_code})")),
        ("reason", s.reason or "-"),
        *([("message", s.message)] if s.message else []),
        ("steps", steps),
        ("epochs checkpointed", str(s.epochs_checkpointed)),
        ("best val loss", "none yet (no epoch checkpointed)" if s.best_val_loss is None
         else f"{s.best_val_loss:.4f} (epoch {s.best_epoch})"),
        ("final val loss", final),
        ("target val loss", target),
        ("tokens seen", f"{s.tokens_seen:,}"),
        ("median step time", f"{s.median_step_ms:.1f} ms"),
        ("median tokens/s", f"{s.median_tokens_per_sec:,.0f}"),
        ("mfu", f"{s.median_mfu:.1%} (median)" if s.median_mfu is not None
         else "not known (no peak FLOP/s for this device: a CPU, or a GPU missing from albor.telemetry's table)"),
        ("gpu utilisation", "recorded" if s.gpu_measured else "no GPU (every reading is 0 or missing: a CPU run, or no NVML)"),
        ("optimizer sha", f"{s.optimizer_sha} (epoch {s.sha_epoch})" if s.optimizer_sha else "none yet (no epoch checkpointed)"),
        *([("unreadable lines", f"{s.skipped_lines} in metrics.jsonl skipped (e.g. a live run's torn last line)")]
          if s.skipped_lines else []),
        *([("figure", figure)] if figure else []),
    ]
    width = max(len(k) for k, _ in lines) + 1
    return "".join(f"{k + ':':<{width}} {v}\n" for k, v in lines)
