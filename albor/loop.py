"""The model-agnostic pretraining loop: the contract's gates, in order.

The loop owns the schedule, the clock, the gates and the files. The model,
the optimizer and the ranks live behind three small collaborators: a step
function, a validation function and a checkpoint writer. In a multi-rank run
those collaborators all-reduce their numbers first, so every rank feeds this
loop identical values and reaches the same verdict at the same step.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from albor.config import PretrainConfig
from albor.contract import (
    AbortReason,
    ContractAbort,
    EpochArtifact,
    EpochMetadata,
    StepMetrics,
    check_non_divergence,
    check_numerical_stability,
    json_number,
    perplexity,
)
from albor.errors import ExitCode
from albor.run_files import STATUS_FILE, RunFiles
from albor.schedule import lr_at

log = logging.getLogger("albor")


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports, already combined across ranks."""

    train_loss: float  # mean over every token of the global batch
    grad_norm: float  # global L2 norm before clipping
    tokens: int  # tokens in the global batch
    gpu_util_pct: float = 0.0
    step_applied: bool = True  # False when the optimizer skipped the step
    rank_error: str | None = None  # an exception some rank caught during the step
    flagged_ranks: tuple[int, ...] = ()  # ranks that saw the fault first
    stop_requested_ranks: tuple[int, ...] = ()  # ranks a stop signal reached: every rank stops after this step
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # telemetry beyond the contract


class StepFn(Protocol):
    """One optimizer step at learning rate ``lr``, and the sha256 of the optimizer state it leaves."""

    def __call__(self, step: int, lr: float) -> StepResult: ...

    def optimizer_state_sha(self) -> str: ...


class ValFn(Protocol):
    """Held-out loss after ``epoch``, the same on every rank."""

    def __call__(self, epoch: int) -> float: ...


class CheckpointWriter(Protocol):
    """Writes the epoch's checkpoint, then ``metadata`` to ``artifact.metadata_path`` last.

    Raises :class:`CheckpointError` on failure (on every rank together), leaving no
    file of this epoch behind and earlier epochs intact.
    """

    def save(self, epoch: int, artifact: EpochArtifact, metadata: Mapping[str, Any]) -> None: ...


class CheckpointError(Exception):
    """A checkpoint could not be written (every rank must raise it together)."""


class RunStatus(str, enum.Enum):
    OK = "ok"  # all epochs ran, or the target was reached
    EARLY_STOP = "early_stop"  # patience ran out (gate 004)
    ABORTED = "aborted"  # a gate fired or a checkpoint failed
    STOPPED = "stopped"  # a stop signal reached a rank; every rank stopped at the same step boundary


@dataclasses.dataclass
class RunResult:
    """How the run ended; becomes ``status.json`` and the exit code."""

    status: RunStatus
    epochs_completed: int
    steps_completed: int
    final_val_loss: float | None
    best_val_loss: float | None
    target_val_loss: float
    abort: ContractAbort | None = None

    @property
    def target_met(self) -> bool:
        return self.final_val_loss is not None and self.final_val_loss <= self.target_val_loss

    @property
    def exit_code(self) -> ExitCode:
        if self.abort is not None:
            return self.abort.exit_code
        return ExitCode.OK if self.target_met else ExitCode.TARGET_NOT_MET  # gate 003

    def to_dict(self) -> dict[str, Any]:
        num = json_number
        return {
            "status": self.status.value,
            "exit_code": int(self.exit_code),
            "reason": self.abort.reason.label if self.abort else None,
            "abort": self.abort.to_dict() if self.abort else None,
            "epochs_completed": self.epochs_completed,
            "steps_completed": self.steps_completed,
            "final_val_loss": num(self.final_val_loss),
            "best_val_loss": num(self.best_val_loss),
            "target_val_loss": self.target_val_loss,
            "target_met": self.target_met,
        }


class PretrainLoop:
    """Runs epochs of ``steps_per_epoch`` steps, validating and checkpointing each."""

    def __init__(
        self,
        config: PretrainConfig,
        step_fn: StepFn,
        val_fn: ValFn,
        checkpoint: CheckpointWriter,
        *,
        vocab_size: int,
        files: RunFiles,
        clock: Callable[[], float] = time.perf_counter,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        metadata_extra: Mapping[str, Any] | None = None,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> None:
        self.config = config
        self.step_fn = step_fn
        self.val_fn = val_fn
        self.checkpoint = checkpoint
        self.vocab_size = vocab_size
        self.files = files
        self.clock = clock
        self.on_step = on_step
        self.metadata_extra = dict(metadata_extra or {})
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # summed over every device of the job; None on CPUs
        self.step_metrics: list[StepMetrics] = []
        self.epoch_metadata: list[EpochMetadata] = []
        self.val_losses: list[float] = []
        self.tokens_seen = 0
        self._best = math.inf
        self._epochs_without_improvement = 0

    def lr_at(self, step: int) -> float:
        c = self.config
        return lr_at(step, lr_max=c.lr_max, lr_min=c.lr_min, warmup_steps=c.warmup_steps, total_steps=c.total_steps)

    # ── one step ────────────────────────────────────────────────────────
    def train_step(self, step: int, epoch: int, started: float) -> tuple[StepMetrics, float]:
        """Run, gate and record one step; returns its metrics and the clock reading."""
        lr = self.lr_at(step)
        result = self.step_fn(step, lr)
        now = self.clock()  # the one clock read per step; it also starts the next step
        if result.rank_error is not None:
            raise ContractAbort(
                AbortReason.RANK_FAILURE,
                f"RANK_FAILURE at step {step}: {result.rank_error}",
                step=step,
                ranks=result.flagged_ranks,
            )
        try:
            # Gate 007 before anything is recorded: a poisoned step never reaches metrics.jsonl.
            check_numerical_stability(step, result.train_loss, result.grad_norm)
        except ContractAbort as abort:
            raise abort.with_ranks(result.flagged_ranks) from None
        if not result.step_applied:
            raise ContractAbort(
                AbortReason.NUMERICAL_INSTABILITY,
                f"NUMERICAL_INSTABILITY at step {step}: the optimizer skipped the step (overflow on some rank)",
                step=step,
                field="step_applied",
                ranks=result.flagged_ranks,
            )
        wall_s = now - started  # a clock that stalls or runs backwards is caught by gate 008
        metrics = StepMetrics(
            step=step,
            train_loss=result.train_loss,
            grad_norm=result.grad_norm,
            lr=lr,
            tokens_per_sec=result.tokens / wall_s if wall_s > 0 else math.inf,
            gpu_util_pct=result.gpu_util_pct,
            wall_ms=wall_s * 1000.0,
        )
        metrics.validate()  # gates 007 (lr) and 008
        self.tokens_seen += result.tokens
        self.step_metrics.append(metrics)
        mfu = None
        if self.flops_per_token is not None and self.peak_flops:
            mfu = self.flops_per_token * metrics.tokens_per_sec / self.peak_flops
        record = {
            **dataclasses.asdict(metrics), "epoch": epoch, "tokens_seen": self.tokens_seen, "mfu": mfu, **result.extra,
        }
        try:
            self.files.append_metrics(record)
        except OSError as e:
            # Only rank 0 writes, so only rank 0 can fail here: it stops, and its peers
            # see a lost rank at their next collective; both end with RANK_FAILURE.
            raise ContractAbort(
                AbortReason.RANK_FAILURE, f"RANK_FAILURE at step {step}: cannot append to metrics.jsonl: {e}", step=step
            ) from None
        if self.on_step is not None:
            self.on_step(record)
        if result.stop_requested_ranks:  # the step itself was good and is recorded; nothing runs after it
            kept = f"epoch-{self.epoch_metadata[-1].epoch:03d}" if self.epoch_metadata else "none yet"
            raise ContractAbort(
                AbortReason.STOPPED_BY_SIGNAL,
                f"STOPPED_BY_SIGNAL after step {step}: SIGTERM/SIGUSR1 reached rank(s) "
                f"{', '.join(map(str, result.stop_requested_ranks))}; last complete checkpoint: {kept}",
                step=step, epoch=epoch, ranks=result.stop_requested_ranks,
            )
        return metrics, now

    # ── one epoch ───────────────────────────────────────────────────────
    def run_epoch(self, epoch: int) -> EpochMetadata:
        """Train, validate, gate 005, then checkpoint and metadata (in that order)."""
        c = self.config
        first = epoch * c.steps_per_epoch
        last = min(first + c.steps_per_epoch, c.total_steps)
        t_epoch = self.clock()
        started = t_epoch
        losses: list[float] = []
        grad_norm_max = 0.0
        for step in range(first, last):
            m, started = self.train_step(step, epoch, started)
            losses.append(m.train_loss)
            grad_norm_max = max(grad_norm_max, m.grad_norm)

        val_loss = self.val_fn(epoch)
        if not math.isfinite(val_loss):  # gate 007 before gate 005, at every epoch including 0: a NaN is an instability, not a divergence
            raise ContractAbort(
                AbortReason.NUMERICAL_INSTABILITY,
                f"NUMERICAL_INSTABILITY at epoch {epoch}: val_loss = {val_loss} is not a finite number",
                epoch=epoch, step=last - 1, field="val_loss", value=val_loss,
            )
        self.val_losses.append(val_loss)
        check_non_divergence(epoch, self.val_losses, c.regime, self.vocab_size)  # gate 005

        sha = self.step_fn.optimizer_state_sha()
        train_loss = sum(losses) / len(losses)
        meta = EpochMetadata(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val_loss,
            train_ppl=perplexity(train_loss),
            val_ppl=perplexity(val_loss),
            optimizer_state_sha=sha,
            wall_seconds=self.clock() - t_epoch,
            tokens_seen=self.tokens_seen,
            grad_norm_max=grad_norm_max,
        )
        artifact = EpochArtifact.for_epoch(c.output_dir, epoch)
        metadata = {
            **{k: json_number(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(meta).items()},
            **self.metadata_extra,
        }
        try:
            self.checkpoint.save(epoch, artifact, metadata)  # the metadata goes last: the completion marker
        except CheckpointError as e:
            raise ContractAbort(
                AbortReason.CHECKPOINT_FAILED,
                f"CHECKPOINT_FAILED at epoch {epoch}: {e}; earlier checkpoints are intact, the run stopped",
                epoch=epoch,
                step=last - 1,
            ) from None
        self.epoch_metadata.append(meta)
        return meta

    def _should_stop_early(self, epoch: int) -> bool:
        """Gate 004: stop after ``patience_epochs`` epochs in a row without improvement."""
        val = self.val_losses[-1]
        if val < self._best:
            self._best = val
            self._epochs_without_improvement = 0
            return False
        self._epochs_without_improvement += 1
        if epoch + 1 < self.config.min_epochs_before_early_stop:
            return False
        return self._epochs_without_improvement >= self.config.patience_epochs

    # ── the run ─────────────────────────────────────────────────────────
    def run(self) -> RunResult:
        """Run every epoch; return how the run ended (never raises a ContractAbort)."""
        c = self.config
        status = RunStatus.OK
        abort: ContractAbort | None = None
        try:
            for epoch in range(c.num_epochs):
                meta = self.run_epoch(epoch)
                log.info(
                    "epoch %d: train_loss %.4f val_loss %.4f val_ppl %.2f tokens %d",
                    epoch, meta.train_loss, meta.val_loss, meta.val_ppl, meta.tokens_seen,
                )
                if self._should_stop_early(epoch):
                    status = RunStatus.EARLY_STOP
                    break
                if meta.val_loss <= c.target_val_loss and epoch + 1 >= c.min_epochs_before_early_stop:
                    break  # gate 003 met: no compute spent past the target
        except ContractAbort as e:
            status = RunStatus.STOPPED if e.reason is AbortReason.STOPPED_BY_SIGNAL else RunStatus.ABORTED
            abort = e
        passed = [m.val_loss for m in self.epoch_metadata]  # epochs that passed gate 005
        result = RunResult(
            status=status,
            epochs_completed=len(passed),
            steps_completed=len(self.step_metrics),
            final_val_loss=passed[-1] if passed and abort is None else None,
            best_val_loss=min(passed, default=None),
            target_val_loss=c.target_val_loss,
            abort=abort,
        )
        try:
            self.files.write_json(STATUS_FILE, result.to_dict())
        except OSError as e:  # the exit code still tells the truth
            log.error("cannot write %s: %s", self.files.status_path, e)
        return result
