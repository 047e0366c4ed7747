"""The numbers of a run report, computed once from a :class:`RunData` (pure functions, no I/O).

:func:`summarize` derives every number and verdict the report states or
draws; the figure and the printed summary only present a :class:`Summary`
(and the run's rows as recorded), so what the picture shows and what the text
says cannot disagree.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from albor.contract import DIVERGENCE_RATIO_LIMIT, Regime
from albor.loop import RunStatus
from albor.report.run_reader import RunData
from albor.resume_plan import best_epoch
from albor.run_files import METRICS_FILE, finite_number

#: Statuses of a run that ended by its own verdict (gates 003/004); every other ended status is a stop.
FINISHED = tuple(s.value for s in (RunStatus.OK, RunStatus.EARLY_STOP))
#: How many damaged line numbers the summary names before it says "and N more".
NAMED_LINES = 5


@dataclasses.dataclass(frozen=True)
class Abort:
    """status.json's ``abort``, the parts the report draws."""

    reason: str | None
    message: str | None
    step: int | None  # the step it stopped at (never recorded when a gate fired)
    epoch: int | None
    val_loss: float | None  # the val_loss that aborted the run, when one did


@dataclasses.dataclass(frozen=True)
class Summary:
    status: str  # status.json's status; "unknown" when the run wrote none
    reason: str | None
    exit_code: int | None
    abort: Abort | None
    steps_recorded: int
    last_step: int
    total_steps: int | None
    step_axis_end: int  # where every per-step panel's x axis ends: total_steps' last step, or further if recorded
    epochs_checkpointed: int
    val_losses: list[tuple[int, float]]  # (epoch, val_loss) of every checkpointed epoch with a finite one
    best_val_loss: float | None
    best_epoch: int | None
    final_val_loss: float | None  # only for a run that finished; None while running or after a stop
    target_val_loss: float | None
    target_met: bool | None
    regime: Regime | None
    vocab_size: int | None
    gate005_limits: list[tuple[int, float]]  # (epoch, highest val_loss gate 005 lets it pass with)
    epoch_zero_limit_unknown: str | None  # why epoch 0's limit is not drawn (from scratch, vocabulary unknown)
    grad_clip: float | None
    tokens_seen: int
    median_step_ms: float
    median_tokens_per_sec: float
    median_mfu: float | None  # None: no step knew its device's peak FLOP/s
    optimizer_sha: str | None  # the last checkpointed epoch's
    sha_epoch: int | None
    gpu_measured: bool  # some rank reported a non-zero utilisation at some step
    damaged_lines: tuple[int, ...]  # metrics.jsonl lines before the last that are not rows
    torn_line: int | None  # metrics.jsonl's last line, when it is not a row


def summarize(run: RunData) -> Summary:
    """Everything the report states or draws, from the run's files."""
    rows, status, config = run.rows, run.status, run.config
    val = [(c.epoch, float(c.metadata["val_loss"])) for c in run.epochs if finite_number(c.metadata.get("val_loss"))]
    best = best_epoch(run.epochs)
    name = str(status.get("status") or "unknown")
    final = status.get("final_val_loss") if name in FINISHED and finite_number(status.get("final_val_loss")) else None
    target = status.get("target_val_loss", config.get("target_val_loss"))
    target = float(target) if finite_number(target) else None
    last_meta = run.epochs[-1].metadata if run.epochs else {}
    regime = regime_of(last_meta, config)
    limits = gate005_limits(val, regime, run.vocab_size, next_epoch=name not in FINISHED)
    total = config.get("total_steps") if type(config.get("total_steps")) is int else None
    mfu = [r["mfu"] for r in rows if finite_number(r.get("mfu"))]
    return Summary(
        status=name,
        reason=status.get("reason"),
        exit_code=status.get("exit_code"),
        abort=abort_of(status),
        steps_recorded=len(rows),
        last_step=rows[-1]["step"],
        total_steps=total,
        step_axis_end=max(rows[-1]["step"], (total or 0) - 1, 1),
        epochs_checkpointed=len(run.epochs),
        val_losses=val,
        best_val_loss=best.metadata["val_loss"] if best else None,
        best_epoch=best.epoch if best else None,
        final_val_loss=final,
        target_val_loss=target,
        target_met=None if final is None or target is None else final <= target,
        regime=regime,
        vocab_size=run.vocab_size,
        gate005_limits=limits,
        epoch_zero_limit_unknown=(
            f"the vocabulary size is unknown: {run.vocab_source}"
            if regime is Regime.FROM_SCRATCH and run.vocab_size is None else None
        ),
        grad_clip=float(config["grad_clip"]) if finite_number(config.get("grad_clip")) else None,
        tokens_seen=rows[-1]["tokens_seen"],
        median_step_ms=statistics.median(r["wall_ms"] for r in rows),
        median_tokens_per_sec=statistics.median(r["tokens_per_sec"] for r in rows),
        median_mfu=statistics.median(mfu) if mfu else None,
        optimizer_sha=last_meta.get("optimizer_state_sha"),
        sha_epoch=run.epochs[-1].epoch if run.epochs else None,
        gpu_measured=any(v > 0 for v in gpu_readings(rows)),
        damaged_lines=run.metrics.damaged_lines,
        torn_line=run.metrics.torn_line,
    )


def abort_of(status: Mapping[str, Any]) -> Abort | None:
    abort = status.get("abort")
    if not isinstance(abort, dict):
        return None
    at_val = abort.get("field") == "val_loss" and type(abort.get("epoch")) is int and finite_number(abort.get("value"))
    return Abort(
        reason=abort.get("reason"),
        message=abort.get("message"),
        step=abort["step"] if type(abort.get("step")) is int else None,
        epoch=abort["epoch"] if type(abort.get("epoch")) is int else None,
        val_loss=float(abort["value"]) if at_val else None,
    )


def per_rank(row: Mapping[str, Any], key: str, mean_key: str) -> list[float] | None:
    """A row's per-rank values of ``key``, else its mean value ``mean_key`` as one rank, else None."""
    values = row.get(key)
    if isinstance(values, list) and all(finite_number(v) for v in values) and values:
        return [float(v) for v in values]
    return [float(row[mean_key])] if finite_number(row.get(mean_key)) else None


def gpu_readings(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """Every rank's GPU utilisation at every step, as recorded (null or absent readings left out)."""
    return [v for r in rows for v in (per_rank(r, "gpu_util_per_rank", "gpu_util_pct") or [])]


def gate005_limits(val_losses: Sequence[tuple[int, float]], regime: Regime | None, vocab_size: int | None,
                   *, next_epoch: bool) -> list[tuple[int, float]]:
    """(epoch, highest val_loss gate 005 lets that epoch pass with), for the epochs that have a limit.

    ``val_losses`` are (epoch, val_loss) as the epochs recorded them. Epoch 0's
    limit is the regime's cap (from scratch it needs the vocabulary size);
    epoch N ≥ 1's is 2.0 × epoch N-1's val_loss, for each recorded epoch N-1.
    Without ``next_epoch``, only for the epochs that were recorded: with it, the
    limit of the epoch after the last one too: what a live run must stay under
    next, or what a diverged run went over.
    """
    limits: list[tuple[int, float]] = []
    if regime is Regime.FINETUNE or (regime is Regime.FROM_SCRATCH and vocab_size):
        limits.append((0, regime.epoch_zero_cap(vocab_size or 0)))
    recorded = {epoch for epoch, _ in val_losses}
    last = max(recorded, default=-1)
    limits += [(n + 1, DIVERGENCE_RATIO_LIMIT * loss) for n, loss in sorted(val_losses)
               if n + 1 in recorded or (next_epoch and n == last)]
    return limits


def regime_of(metadata: Mapping[str, Any], config: Mapping[str, Any]) -> Regime | None:
    """The run's regime: as its newest epoch's metadata records it, else as its config.yaml says."""
    for value in (metadata.get("regime"), config.get("regime")):
        try:
            return Regime(value)
        except ValueError:
            continue
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
        *([("message", s.abort.message)] if s.abort and s.abort.message else []),
        ("steps", steps),
        ("epochs checkpointed", str(s.epochs_checkpointed)),
        ("best val loss", "none yet (no epoch checkpointed)" if s.best_val_loss is None
         else f"{s.best_val_loss:.4f} (epoch {s.best_epoch})"),
        ("final val loss", final),
        ("target val loss", target),
        *([("epoch 0 limit", f"not drawn ({s.epoch_zero_limit_unknown})")] if s.epoch_zero_limit_unknown else []),
        ("tokens seen", f"{s.tokens_seen:,}"),
        ("median step time", f"{s.median_step_ms:.1f} ms"),
        ("median tokens/s", f"{s.median_tokens_per_sec:,.0f}"),
        ("mfu", f"{s.median_mfu:.1%} (median)" if s.median_mfu is not None
         else "not known (no peak FLOP/s for this device: a CPU, or a GPU missing from albor.telemetry's table)"),
        ("gpu utilisation", "recorded" if s.gpu_measured else "no GPU (every reading is 0 or missing: a CPU run, or no NVML)"),
        ("optimizer sha", f"{s.optimizer_sha} (epoch {s.sha_epoch})" if s.optimizer_sha else "none yet (no epoch checkpointed)"),
        *([("unreadable lines", unreadable_lines(s.damaged_lines, s.torn_line))] if s.damaged_lines or s.torn_line else []),
        *([("figure", figure)] if figure else []),
    ]
    width = max(len(k) for k, _ in lines) + 1
    return "".join(f"{k + ':':<{width}} {v}\n" for k, v in lines)


def unreadable_lines(damaged: Sequence[int], torn: int | None) -> str:
    """Which lines of metrics.jsonl were skipped, and what each kind means."""
    parts = []
    if damaged:
        named = ", ".join(map(str, damaged[:NAMED_LINES])) + (
            f" and {len(damaged) - NAMED_LINES} more" if len(damaged) > NAMED_LINES else "")
        parts.append(f"line{'s' if len(damaged) > 1 else ''} {named} {'are' if len(damaged) > 1 else 'is'} "
                     f"not a metrics row: {METRICS_FILE} is damaged there")
    if torn is not None:
        parts.append(f"the last line ({torn}) is cut short: a live or killed run's half-written line")
    return f"{len(damaged) + (torn is not None)} in {METRICS_FILE} skipped: " + "; ".join(parts)
