"""The pretraining contract (C-TRAIN-PRETRAIN v1.5) as pure Python.

Records, abort reasons and gates. Nothing here knows about torch, ranks or
files: every rank calls these functions on the same all-reduced numbers, so
every rank reaches the same verdict. docs/contract.md lists every gate and
the code that enforces it; docs/distributed-step.md explains how the ranks
come to hold the same numbers.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from pathlib import Path

from albor.errors import ExitCode

#: Gate 005: val_loss[N] may be at most this times val_loss[N-1] (exactly 2.0 passes).
DIVERGENCE_RATIO_LIMIT = 2.0
#: Gate 005, finetune regime: epoch-zero val_loss cap (a fixed number in the contract, not derived).
FINETUNE_EPOCH_ZERO_CAP = 10.0


class Regime(str, enum.Enum):
    """Training regime; selects the epoch-zero val_loss cap of gate 005."""

    FINETUNE = "finetune"
    FROM_SCRATCH = "from-scratch"

    def epoch_zero_cap(self, vocab_size: int) -> float:
        """Finetune: 10.0. From scratch: 2·ln(vocab), twice the uniform-guess loss."""
        if self is Regime.FINETUNE:
            return FINETUNE_EPOCH_ZERO_CAP
        # vocab < 2 would make ln non-positive; config validation rejects it,
        # the clamp only keeps this pure function total.
        return DIVERGENCE_RATIO_LIMIT * math.log(max(vocab_size, 2))


class AbortReason(enum.Enum):
    """Why a run stopped before its end; each has its own process exit code."""

    DIVERGENCE = ExitCode.DIVERGENCE
    DIVERGENCE_AT_EPOCH_ZERO = ExitCode.DIVERGENCE_AT_EPOCH_ZERO
    NUMERICAL_INSTABILITY = ExitCode.NUMERICAL_INSTABILITY
    THROUGHPUT_OUT_OF_RANGE = ExitCode.THROUGHPUT_OUT_OF_RANGE
    RANK_FAILURE = ExitCode.RANK_FAILURE
    CHECKPOINT_FAILED = ExitCode.CHECKPOINT_FAILED
    PREEMPTED = ExitCode.PREEMPTED  # not a fault: the run was asked to stop, and can resume
    PREEMPTION_SAVE_FAILED = ExitCode.PREEMPTION_SAVE_FAILED
    DATA = ExitCode.DATA  # mid-run: a shard is not what index.json says (docs/data-verification.md)

    @property
    def exit_code(self) -> ExitCode:
        return self.value

    @property
    def label(self) -> str:
        return self.name.lower()


class ContractAbort(Exception):
    """A gate fired: the run must stop, on every rank, with ``exit_code``."""

    def __init__(
        self,
        reason: AbortReason,
        message: str,
        *,
        step: int | None = None,
        epoch: int | None = None,
        field: str | None = None,
        value: float | None = None,
        ranks: Sequence[int] = (),
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.step = step
        self.epoch = epoch
        self.field = field
        self.value = value
        self.ranks = tuple(ranks)

    @property
    def exit_code(self) -> ExitCode:
        return self.reason.exit_code

    def with_ranks(self, ranks: Sequence[int]) -> ContractAbort:
        """The same abort, naming the rank(s) that saw the fault first."""
        self.ranks = tuple(ranks)
        return self

    def to_dict(self) -> dict[str, object]:
        return {
            "reason": self.reason.label,
            "message": self.message,
            "step": self.step,
            "epoch": self.epoch,
            "field": self.field,
            "value": json_number(self.value),
            "ranks": list(self.ranks),
        }


def json_number(value: float | None) -> float | str | None:
    """A float for JSON: NaN/Inf become their repr (JSON has neither), instead of invalid JSON."""
    if value is None or math.isfinite(value):
        return value
    return repr(value)


def _instability(step: int | None, field: str, value: float, epoch: int | None = None) -> ContractAbort:
    where = f"step {step}" if step is not None else f"epoch {epoch}"
    return ContractAbort(
        AbortReason.NUMERICAL_INSTABILITY,
        f"NUMERICAL_INSTABILITY at {where}: {field} = {value} is not a finite number",
        step=step,
        epoch=epoch,
        field=field,
        value=value,
    )


def check_numerical_stability(step: int, train_loss: float, grad_norm: float) -> None:
    """Gate 007 on the values in hand right after a step: raise on NaN/Inf.

    A negative grad norm is impossible for a real norm (DeepSpeed uses -1 as
    its NaN/Inf mask), so it is treated as non-finite too.
    """
    if not math.isfinite(train_loss):
        raise _instability(step, "train_loss", train_loss)
    if not math.isfinite(grad_norm) or grad_norm < 0:
        raise _instability(step, "grad_norm", grad_norm)


def check_non_divergence(epoch: int, val_losses: Sequence[float], regime: Regime, vocab_size: int) -> None:
    """Gate 005 (ship-blocking, not configurable): raise when the run diverged.

    Epoch 0: val_loss must be finite and at most the regime's cap.
    Epoch N ≥ 1: val_loss[N] ≤ 2.0 × val_loss[N-1]; a ratio of exactly 2.0 passes.
    """
    if epoch >= len(val_losses):
        raise ValueError(f"no val_loss recorded for epoch {epoch}")  # caller bug, not a divergence
    current = val_losses[epoch]
    if epoch == 0:
        cap = regime.epoch_zero_cap(vocab_size)
        if not math.isfinite(current) or current > cap:
            raise ContractAbort(
                AbortReason.DIVERGENCE_AT_EPOCH_ZERO,
                f"DIVERGENCE at epoch 0: val_loss {current} is non-finite or above the "
                f"{regime.value} cap {cap:.4f}",
                epoch=0,
                field="val_loss",
                value=current,
            )
        return
    if not math.isfinite(current):
        raise _instability(None, "val_loss", current, epoch=epoch)
    previous = val_losses[epoch - 1]
    if current > DIVERGENCE_RATIO_LIMIT * previous:
        ratio = current / max(previous, 1e-9)
        raise ContractAbort(
            AbortReason.DIVERGENCE,
            f"DIVERGENCE at epoch {epoch}: val_loss {current:.4f} > 2.0 × {previous:.4f} (ratio {ratio:.2f})",
            epoch=epoch,
            field="val_loss",
            value=current,
        )


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """The seven per-step fields the contract requires (gate 001)."""

    step: int
    train_loss: float
    grad_norm: float
    lr: float
    tokens_per_sec: float
    gpu_util_pct: float
    wall_ms: float

    def validate(self) -> None:
        """Gates 007 and 008: raise before a poisoned value can be logged."""
        check_numerical_stability(self.step, self.train_loss, self.grad_norm)
        if not math.isfinite(self.lr):
            raise _instability(self.step, "lr", self.lr)
        for field, value, upper in (
            ("tokens_per_sec", self.tokens_per_sec, math.inf),
            ("gpu_util_pct", self.gpu_util_pct, 100.0),
            ("wall_ms", self.wall_ms, math.inf),
        ):
            if not (math.isfinite(value) and 0.0 <= value <= upper):
                raise ContractAbort(
                    AbortReason.THROUGHPUT_OUT_OF_RANGE,
                    f"THROUGHPUT_OUT_OF_RANGE at step {self.step}: {field} = {value} outside its permitted range",
                    step=self.step,
                    field=field,
                    value=value,
                )


@dataclasses.dataclass(frozen=True)
class EpochMetadata:
    """The nine per-epoch metadata fields the contract requires (gate 002)."""

    epoch: int
    train_loss: float
    val_loss: float
    train_ppl: float
    val_ppl: float
    optimizer_state_sha: str
    wall_seconds: float
    tokens_seen: int
    grad_norm_max: float


def perplexity(loss: float) -> float:
    """exp(loss), saturating at inf instead of raising OverflowError."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@dataclasses.dataclass(frozen=True)
class CheckpointPoint:
    """Where one checkpoint's files live: an epoch's (contract path template, with the .apr) or a preemption's.

    ``step`` counts the optimizer steps completed when it is taken: the step a
    resumed run starts at. docs/checkpoints.md describes the layout.
    """

    tag: str
    kind: str  # "epoch" | "preemption"
    step: int
    epoch: int  # the epoch of the last completed step (an epoch checkpoint: that epoch)
    apr_path: Path | None  # preemption checkpoints carry no model file
    metadata_path: Path  # written last: the completion marker

    @classmethod
    def for_epoch(cls, run_dir: Path, epoch: int, step: int) -> CheckpointPoint:
        ckpt, tag = Path(run_dir) / "ckpt", f"epoch-{epoch:03d}"
        return cls(tag, "epoch", step, epoch, ckpt / f"{tag}.apr", ckpt / f"{tag}.metadata.json")

    @classmethod
    def for_preemption(cls, run_dir: Path, step: int, epoch: int) -> CheckpointPoint:
        ckpt, tag = Path(run_dir) / "ckpt", f"step-{step:07d}"
        return cls(tag, "preemption", step, epoch, None, ckpt / f"{tag}.metadata.json")
