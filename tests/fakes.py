"""Synthetic collaborators for loop tests (gate 010: never on the real command path)."""

from __future__ import annotations

import math
from pathlib import Path

from albor.config import PretrainConfig
from albor.contract import EpochArtifact
from albor.loop import CheckpointError, StepResult
from albor.run_files import write_json_atomic


def loop_config(tmp: Path, **kw) -> PretrainConfig:
    """The seed's test config: 25 steps, 5 per epoch, finetune regime."""
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    (tmp / "data" / "index.json").write_text("{}")  # config validation only looks for it
    base = dict(
        dataset=tmp / "data", output_dir=tmp / "run", lr_max=1e-4, lr_min=1e-6, warmup_steps=2,
        total_steps=25, batch_size=2, seq_length=4, steps_per_epoch=5, seed=42, target_val_loss=2.2,
        patience_epochs=2, min_epochs_before_early_stop=1, model="tiny",
    )
    return PretrainConfig(**{**base, **kw})


class LinearDecay:
    """train_loss falls linearly with the step."""

    def __init__(self, start=3.5, decay=0.1, grad_norm=0.8, tokens=8):
        self.start, self.decay, self.grad_norm, self.tokens = start, decay, grad_norm, tokens
        self.lrs: list[float] = []

    def __call__(self, step: int, lr: float) -> StepResult:
        self.lrs.append(lr)
        return StepResult(max(self.start - self.decay * step, 1e-4), self.grad_norm, self.tokens, gpu_util_pct=50.0)


class NanAtStep:
    def __init__(self, nan_step: int):
        self.nan_step = nan_step

    def __call__(self, step: int, lr: float) -> StepResult:
        return StepResult(math.nan if step == self.nan_step else 1.0, 1.0, 8, flagged_ranks=(1,) if step == self.nan_step else ())


class WithSha(LinearDecay):
    def optimizer_state_sha(self) -> str:
        return "a" * 64


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

    def save(self, epoch: int, artifact: EpochArtifact, metadata) -> None:
        if epoch in self.fail_on:
            raise CheckpointError(f"disk full writing {artifact.checkpoint_path.name}")
        artifact.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        artifact.checkpoint_path.write_bytes(b"ckpt")
        write_json_atomic(artifact.metadata_path, metadata)
        self.calls.append((epoch, artifact.checkpoint_path))
