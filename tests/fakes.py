"""Test doubles for loop tests: step, validation and checkpoint collaborators, and a clock.

The real command never uses them (gate 010, docs/contract.md). Every fake step
function has an optimizer state and a real ``optimizer_state_sha()`` of it, as
every step function the loop drives must.
"""

from __future__ import annotations

import hashlib
import math
import struct
from pathlib import Path

from albor.atomic_files import write_json_atomic
from albor.config import PretrainConfig
from albor.contract import CheckpointPoint
from albor.loop import CheckpointError, StepResult


def loop_config(tmp: Path, **kw) -> PretrainConfig:
    """A small finetune-regime test config: 25 steps, 5 per epoch, lr 1e-4 → 1e-6 after 2 warmup steps."""
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    (tmp / "data" / "index.json").write_text("{}")  # config validation only looks for it
    base = dict(
        dataset=tmp / "data", output_dir=tmp / "run", lr_max=1e-4, lr_min=1e-6, warmup_steps=2,
        total_steps=25, batch_size=2, seq_length=4, steps_per_epoch=5, seed=42, target_val_loss=2.2,
        patience_epochs=2, min_epochs_before_early_stop=1, model="tiny",
    )
    return PretrainConfig(**{**base, **kw})


def applied_steps_sha(applied: list[tuple[int, float]]) -> str:
    """sha256 of a fake optimizer's state: every (step, lr) it applied, in order."""
    h = hashlib.sha256(b"albor-tests:fake-optimizer:")
    for step, lr in applied:
        h.update(struct.pack("<qd", step, lr))
    return h.hexdigest()


class FakeOptimizer:
    """The state of a fake step function: the (step, lr) pairs it was driven with.

    ``optimizer_state_sha()`` hashes that state, so it changes with every step
    and tells a test exactly when the loop asked for it.
    """

    def __init__(self) -> None:
        self.applied: list[tuple[int, float]] = []

    @property
    def lrs(self) -> list[float]:
        return [lr for _, lr in self.applied]

    def optimizer_state_sha(self) -> str:
        return applied_steps_sha(self.applied)


class LinearDecay(FakeOptimizer):
    """train_loss falls linearly with the step."""

    def __init__(self, start=3.5, decay=0.1, grad_norm=0.8, tokens=8):
        super().__init__()
        self.start, self.decay, self.grad_norm, self.tokens = start, decay, grad_norm, tokens

    def __call__(self, step: int, lr: float) -> StepResult:
        self.applied.append((step, lr))
        return StepResult(max(self.start - self.decay * step, 1e-4), self.grad_norm, self.tokens, gpu_util_pct=50.0)


class NanAtStep(FakeOptimizer):
    """Loss 1.0 on every step but ``nan_step``, where rank 1 sees NaN first."""

    def __init__(self, nan_step: int):
        super().__init__()
        self.nan_step = nan_step

    def __call__(self, step: int, lr: float) -> StepResult:
        self.applied.append((step, lr))
        return StepResult(math.nan if step == self.nan_step else 1.0, 1.0, 8, flagged_ranks=(1,) if step == self.nan_step else ())


class SteppingClock:
    """A clock that advances ``dt`` seconds on every read (exact in binary for dt = 0.25)."""

    def __init__(self, dt: float = 0.25) -> None:
        self.dt, self.now = dt, 0.0

    def __call__(self) -> float:
        self.now += self.dt
        return self.now


class ScriptedVal:
    def __init__(self, sequence):
        self.sequence = list(sequence)

    def __call__(self, epoch: int) -> float:
        return self.sequence[epoch] if epoch < len(self.sequence) else math.nan


class RecordingCheckpoint:
    """Writes a small file per epoch and records the calls; can fail on chosen epochs."""

    def __init__(self, fail_on=()):
        self.calls: list[tuple[int, Path]] = []
        self.fail_on = set(fail_on)

    def save(self, point: CheckpointPoint, metadata) -> None:
        if point.epoch in self.fail_on:
            raise CheckpointError(f"disk full writing {point.tag}")
        if point.apr_path is not None:
            point.apr_path.parent.mkdir(parents=True, exist_ok=True)
            point.apr_path.write_bytes(b"ckpt")
        write_json_atomic(point.metadata_path, metadata)
        self.calls.append((point.epoch, point.apr_path))
