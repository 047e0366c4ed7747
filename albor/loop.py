"""The model-agnostic pretraining loop: the contract's gates, in order.

The loop owns the schedule, the clock, the gates and the files. The model,
the optimizer and the ranks live behind three small collaborators: a step
function, a validation function and a checkpoint writer. In a multi-rank run
those collaborators all-reduce their numbers first, so every rank feeds this
loop identical values and reaches the same verdict at the same step.
"""

from __future__ import annotations

import contextlib
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
    CheckpointPoint,
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
class DataFault:
    """Some rank found the run's data is not what index.json says (albor.distributed.data_verdict); every rank holds it."""

    message: str  # names the shard where known, and the rank(s) that found it
    ranks: tuple[int, ...]


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
    data_fault: DataFault | None = None  # a bad shard, found by the background verification or in a batch
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # telemetry beyond the contract


class StepFn(Protocol):
    """One optimizer step at learning rate ``lr``, and the sha256 of the optimizer state it leaves."""

    def __call__(self, step: int, lr: float) -> StepResult: ...

    def optimizer_state_sha(self) -> str: ...


class ValFn(Protocol):
    """Held-out loss after ``epoch``, the same on every rank."""

    def __call__(self, epoch: int) -> float: ...


class CheckpointWriter(Protocol):
    """Writes a checkpoint at ``point``, then ``metadata`` to ``point.metadata_path`` last.

    Raises :class:`CheckpointError` on failure (on every rank together), leaving no
    file of this point behind and earlier checkpoints intact.
    """

    def save(self, point: CheckpointPoint, metadata: Mapping[str, Any]) -> None: ...


class CheckpointError(Exception):
    """A checkpoint could not be written (every rank must raise it together)."""


class RunStatus(str, enum.Enum):
    OK = "ok"  # all epochs ran, or the target was reached
    EARLY_STOP = "early_stop"  # patience ran out (gate 004)
    ABORTED = "aborted"  # a gate fired or a checkpoint failed
    PREEMPTED = "preempted"  # a stop signal reached a rank; every rank stopped at the same step boundary


class PreemptionRequested(Exception):
    """A stop signal reached ``ranks`` during the step that just completed; every rank raises it together."""

    def __init__(self, step: int, epoch: int, ranks: tuple[int, ...]) -> None:
        super().__init__(f"stop requested on rank(s) {', '.join(map(str, ranks))} during step {step}")
        self.step, self.epoch, self.ranks = step, epoch, ranks


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
    checkpoint: str | None = None  # the preemption checkpoint's tag, when one was written

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
            **({"checkpoint": self.checkpoint} if self.status is RunStatus.PREEMPTED else {}),
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
        status_extra: Mapping[str, Any] | None = None,
        preemption_guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        data_verified: Callable[[], DataFault | None] = lambda: None,
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
        self.status_extra = dict(status_extra or {})  # e.g. the resume command; merged into status.json
        self.preemption_guard = preemption_guard  # bounds the preemption save (the grace period)
        # Blocks until the run's data has been verified in full, then every rank's verdict (a collective,
        # called at the same point on every rank): no checkpoint is written before it passed.
        self.data_verified = data_verified
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # summed over every device of the job; None on CPUs
        self.step_metrics: list[StepMetrics] = []  # this process's steps (a resumed run: since the resume)
        # What a resumed run needs to continue exactly (state_dict / load_state_dict):
        self.next_step = 0  # optimizer steps completed
        self.tokens_seen = 0
        self.val_losses: list[float] = []  # one per epoch that passed gate 005 and was checkpointed
        self._best = math.inf
        self._epochs_without_improvement = 0
        self._epoch_losses: list[float] = []  # the current epoch's train losses so far
        self._epoch_grad_norm_max = 0.0
        self._epoch_seconds_before = 0.0  # wall time the current epoch has taken (before a resume, or so far)
        self._epoch_t0 = 0.0  # the clock reading the current epoch counts from

    # ── resumable state ─────────────────────────────────────────────────
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the model, optimizer, data cursor and RNGs that a continuation needs (JSON-able)."""
        return {
            "next_step": self.next_step,
            "tokens_seen": self.tokens_seen,
            "val_losses": list(self.val_losses),
            "best": json_number(self._best if math.isfinite(self._best) else None),
            "epochs_without_improvement": self._epochs_without_improvement,
            "epoch_losses": list(self._epoch_losses),
            "epoch_grad_norm_max": self._epoch_grad_norm_max,
            "epoch_wall_seconds": self._epoch_seconds_before,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` of the interrupted run."""
        self.next_step = int(state["next_step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.val_losses = [float(v) for v in state["val_losses"]]
        self._best = math.inf if state["best"] is None else float(state["best"])
        self._epochs_without_improvement = int(state["epochs_without_improvement"])
        self._epoch_losses = [float(v) for v in state["epoch_losses"]]
        self._epoch_grad_norm_max = float(state["epoch_grad_norm_max"])
        self._epoch_seconds_before = float(state["epoch_wall_seconds"])

    def lr_at(self, step: int) -> float:
        c = self.config
        return lr_at(step, lr_max=c.lr_max, lr_min=c.lr_min, warmup_steps=c.warmup_steps, total_steps=c.total_steps)

    # ── one step ────────────────────────────────────────────────────────
    def train_step(self, step: int, epoch: int, started: float) -> tuple[StepMetrics, float]:
        """Run, gate and record one step; returns its metrics and the clock reading."""
        lr = self.lr_at(step)
        result = self.step_fn(step, lr)
        now = self.clock()  # the one clock read per step; it also starts the next step
        if result.data_fault is not None:  # first: bad data explains whatever else went wrong in the step
            raise self._data_abort(result.data_fault, step=step, epoch=epoch)
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
        self.next_step = step + 1
        self._epoch_losses.append(metrics.train_loss)
        self._epoch_grad_norm_max = max(self._epoch_grad_norm_max, metrics.grad_norm)
        self._epoch_seconds_before = now - self._epoch_t0  # kept current for a preemption checkpoint
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
        if result.stop_requested_ranks:  # the step itself was good and is recorded; a checkpoint follows
            raise PreemptionRequested(step, epoch, result.stop_requested_ranks)
        return metrics, now

    # ── one epoch ───────────────────────────────────────────────────────
    def run_epoch(self, epoch: int) -> EpochMetadata:
        """Train (from where a resumed run left off), validate, gate 005, then checkpoint with the metadata last."""
        c = self.config
        first = max(epoch * c.steps_per_epoch, self.next_step)
        last = min((epoch + 1) * c.steps_per_epoch, c.total_steps)
        started = self.clock()
        t_epoch = self._epoch_t0 = started - self._epoch_seconds_before
        for step in range(first, last):
            _, started = self.train_step(step, epoch, started)

        # Before validation and the checkpoint: a checkpoint never trusts data that failed or was never verified.
        fault = self.data_verified()
        if fault is not None:
            raise self._data_abort(fault, step=last - 1, epoch=epoch, when=f"the end of epoch {epoch}")
        val_loss = self.val_fn(epoch)
        if not math.isfinite(val_loss):  # gate 007 before gate 005, at every epoch including 0: a NaN is an instability, not a divergence
            raise ContractAbort(
                AbortReason.NUMERICAL_INSTABILITY,
                f"NUMERICAL_INSTABILITY at epoch {epoch}: val_loss = {val_loss} is not a finite number",
                epoch=epoch, step=last - 1, field="val_loss", value=val_loss,
            )
        check_non_divergence(epoch, [*self.val_losses, val_loss], c.regime, self.vocab_size)  # gate 005

        sha = self.step_fn.optimizer_state_sha()
        train_loss = sum(self._epoch_losses) / len(self._epoch_losses)
        meta = EpochMetadata(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val_loss,
            train_ppl=perplexity(train_loss),
            val_ppl=perplexity(val_loss),
            optimizer_state_sha=sha,
            wall_seconds=self.clock() - t_epoch,
            tokens_seen=self.tokens_seen,
            grad_norm_max=self._epoch_grad_norm_max,
        )
        # The state the checkpoint carries is the state after this epoch: the next one starts from scratch,
        # and gate 004's bookkeeping already counts this epoch.
        before = self.state_dict()
        self.val_losses.append(val_loss)
        self._record_improvement(val_loss)
        self._epoch_losses, self._epoch_grad_norm_max, self._epoch_seconds_before = [], 0.0, 0.0
        point = CheckpointPoint.for_epoch(c.output_dir, epoch, step=last)
        metadata = {
            **{k: json_number(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(meta).items()},
            **self._checkpoint_fields(point, sha),
        }
        try:
            self.checkpoint.save(point, metadata)  # the metadata goes last: the completion marker
        except CheckpointError as e:
            self.load_state_dict(before)  # the epoch did not pass: no trace of it in the state
            raise ContractAbort(
                AbortReason.CHECKPOINT_FAILED,
                f"CHECKPOINT_FAILED at epoch {epoch}: {e}; earlier checkpoints are intact, the run stopped",
                epoch=epoch,
                step=last - 1,
            ) from None
        return meta

    @staticmethod
    def _data_abort(fault: DataFault, *, step: int, epoch: int, when: str | None = None) -> ContractAbort:
        return ContractAbort(
            AbortReason.DATA, f"DATA at {when or f'step {step}'}: {fault.message}", step=step, epoch=epoch, ranks=fault.ranks,
        )

    def _checkpoint_fields(self, point: CheckpointPoint, sha: str) -> dict[str, Any]:
        """What every checkpoint's metadata holds beyond the contract's nine fields."""
        return {
            "kind": point.kind, "tag": point.tag, "step": point.step,
            **({} if point.kind == "epoch" else {"epoch": point.epoch, "optimizer_state_sha": sha}),
            **self.metadata_extra,
            "resume": self.state_dict(),
        }

    def _record_improvement(self, val_loss: float) -> None:
        """Gate 004's bookkeeping for a finished epoch."""
        if val_loss < self._best:
            self._best = val_loss
            self._epochs_without_improvement = 0
        else:
            self._epochs_without_improvement += 1

    def _verdict_after(self, epoch: int) -> RunStatus | None:
        """Whether the run ends after ``epoch`` (gates 004 and 003), from the recorded state alone."""
        c = self.config
        if epoch + 1 < c.min_epochs_before_early_stop:
            return None
        if self._epochs_without_improvement >= c.patience_epochs:
            return RunStatus.EARLY_STOP  # patience ran out: N epochs in a row without improvement
        if self.val_losses[-1] <= c.target_val_loss:
            return RunStatus.OK  # gate 003 met: no compute spent past the target
        return None

    def _preempt(self, request: PreemptionRequested) -> tuple[ContractAbort, str | None]:
        """Every rank saves a checkpoint at this step boundary together; then the run ends, resumable."""
        point = CheckpointPoint.for_preemption(self.config.output_dir, self.next_step, request.epoch)
        ranks = ", ".join(map(str, request.ranks))
        try:
            with self.preemption_guard():
                fault = self.data_verified()  # inside the grace: a verification that outlives it ends the run unsaved
                if fault is not None:
                    return self._data_abort(fault, step=request.step, epoch=request.epoch,
                                            when=f"the preemption after step {request.step}"), None
                sha = self.step_fn.optimizer_state_sha()
                self.checkpoint.save(point, self._checkpoint_fields(point, sha))
        except CheckpointError as e:
            return ContractAbort(
                AbortReason.PREEMPTION_SAVE_FAILED,
                f"PREEMPTION_SAVE_FAILED after step {request.step}: a stop signal reached rank(s) {ranks}, "
                f"but the preemption checkpoint failed ({e}); resume from the last complete checkpoint",
                step=request.step, epoch=request.epoch, ranks=request.ranks,
            ), None
        return ContractAbort(
            AbortReason.PREEMPTED,
            f"PREEMPTED after step {request.step}: a stop signal reached rank(s) {ranks}; "
            f"every rank saved checkpoint {point.tag}",
            step=request.step, epoch=request.epoch, ranks=request.ranks,
        ), point.tag

    # ── the run ─────────────────────────────────────────────────────────
    def run(self) -> RunResult:
        """Run every epoch (a resumed run: from where it left off); return how it ended (never raises a ContractAbort)."""
        c = self.config
        status = RunStatus.OK
        abort: ContractAbort | None = None
        checkpoint: str | None = None
        # An epoch with steps recorded is unfinished (a run preempted after its last step has yet to validate it).
        first_epoch = (self.next_step - 1 if self._epoch_losses else self.next_step) // c.steps_per_epoch
        try:
            # A run resumed at an epoch boundary first makes the decision the interrupted run made there.
            at_boundary = self.val_losses and not self._epoch_losses
            verdict = self._verdict_after(first_epoch - 1) if at_boundary else None
            for epoch in range(first_epoch, c.num_epochs if verdict is None else first_epoch):
                meta = self.run_epoch(epoch)
                log.info(
                    "epoch %d: train_loss %.4f val_loss %.4f val_ppl %.2f tokens %d",
                    epoch, meta.train_loss, meta.val_loss, meta.val_ppl, meta.tokens_seen,
                )
                verdict = self._verdict_after(epoch)
                if verdict is not None:
                    break
            status = verdict or RunStatus.OK
        except ContractAbort as e:
            status, abort = RunStatus.ABORTED, e
        except PreemptionRequested as request:
            abort, checkpoint = self._preempt(request)
            status = RunStatus.ABORTED if abort.reason is AbortReason.DATA else RunStatus.PREEMPTED
        passed = self.val_losses  # epochs that passed gate 005 and were checkpointed
        result = RunResult(
            status=status,
            epochs_completed=len(passed),
            steps_completed=self.next_step,
            final_val_loss=passed[-1] if passed and abort is None else None,
            best_val_loss=min(passed, default=None),
            target_val_loss=c.target_val_loss,
            abort=abort,
            checkpoint=checkpoint,
        )
        try:
            self.files.write_json(STATUS_FILE, {**result.to_dict(), **self.status_extra})
        except OSError as e:  # the exit code still tells the truth
            log.error("cannot write %s: %s", STATUS_FILE, e)
        return result
