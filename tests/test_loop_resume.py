"""The loop's side of preemption and resume: a checkpoint at the flagged step, and exact continuation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from albor.errors import ExitCode
from albor.loop import PretrainLoop, StepResult
from albor.run_files import RunFiles
from tests.fakes import FakeOptimizer, RecordingCheckpoint, SteppingClock, loop_config

VAL = (3.0, 2.9, 2.95, 2.97, 2.99)  # improves, then patience runs out after epoch 3 (patience 2)


class Scripted(FakeOptimizer):
    """Losses and norms that differ at every step; a stop signal reaches ``ranks`` during ``stop_step``."""

    def __init__(self, stop_step: int | None = None, ranks: tuple[int, ...] = (1,)) -> None:
        super().__init__()
        self.stop_step, self.ranks = stop_step, ranks

    def __call__(self, step: int, lr: float) -> StepResult:
        self.applied.append((step, lr))
        stop = self.ranks if step == self.stop_step else ()
        return StepResult(4.0 - 0.05 * step + 0.01 * (step % 3), 1.0 + 0.1 * (step % 4), 8, stop_requested_ranks=stop)

    def continue_from(self, applied: list[tuple[int, float]]) -> Scripted:
        """A fresh step function holding the optimizer state that was checkpointed."""
        self.applied = list(applied)
        return self


def run_loop(tmp: Path, name: str, step_fn, *, state=None, checkpoint=None, metrics_from: Path | None = None):
    config = loop_config(tmp, output_dir=tmp / name, min_epochs_before_early_stop=3, target_val_loss=1.0)
    if metrics_from is not None:  # what the interrupted run had written
        config.output_dir.mkdir()
        (config.output_dir / "metrics.jsonl").write_text((metrics_from / "metrics.jsonl").read_text())
    files = RunFiles(config.output_dir, enabled=True)
    loop = PretrainLoop(config, step_fn, lambda epoch: VAL[epoch], checkpoint or RecordingCheckpoint(),
                        vocab_size=64, files=files, clock=SteppingClock())
    if state is not None:
        loop.load_state_dict(state)
    result = loop.run()
    files.close()
    return result, config.output_dir


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metadata(run_dir: Path, tag: str) -> dict:
    return json.loads((run_dir / "ckpt" / f"{tag}.metadata.json").read_text())


@pytest.mark.parametrize("stop_step", [3, 7, 9])  # mid epoch 0, mid epoch 1, the last step of epoch 1
def test_preemption_saves_at_the_flagged_step_then_exits_15(tmp_path, stop_step):
    checkpoint = RecordingCheckpoint()
    result, run_dir = run_loop(tmp_path, "run", Scripted(stop_step), checkpoint=checkpoint)
    assert result.exit_code == ExitCode.PREEMPTED == 15
    assert [r["step"] for r in rows(run_dir)] == list(range(stop_step + 1))  # the flagged step is good: logged
    tag = f"step-{stop_step + 1:07d}"
    assert [e for e, _ in checkpoint.calls] == [*range(stop_step // 5), stop_step // 5]  # epochs, then the point
    meta = metadata(run_dir, tag)
    assert (meta["kind"], meta["tag"], meta["step"], meta["epoch"]) == ("preemption", tag, stop_step + 1, stop_step // 5)
    assert meta["resume"]["next_step"] == stop_step + 1
    assert len(meta["resume"]["epoch_losses"]) == stop_step % 5 + 1
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted" and status["exit_code"] == 15 and status["checkpoint"] == tag
    assert status["abort"]["step"] == stop_step and status["abort"]["ranks"] == [1]
    assert status["steps_completed"] == stop_step + 1


def test_a_failed_preemption_save_exits_16(tmp_path):
    result, run_dir = run_loop(tmp_path, "run", Scripted(7), checkpoint=RecordingCheckpoint(fail_on={1}))
    assert result.exit_code == ExitCode.PREEMPTION_SAVE_FAILED == 16
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted" and status["checkpoint"] is None
    assert "resume from the last complete checkpoint" in status["abort"]["message"]


@pytest.mark.parametrize("stop_step", [3, 9, 12])
def test_resumed_loop_continues_exactly(tmp_path, stop_step):
    """Preempted, then resumed from the preemption checkpoint: every record equals the uninterrupted run's."""
    whole, whole_dir = run_loop(tmp_path, "whole", Scripted())
    first, first_dir = run_loop(tmp_path, "first", Scripted(stop_step))
    assert first.exit_code == 15
    meta = metadata(first_dir, f"step-{stop_step + 1:07d}")
    step_fn = Scripted().continue_from([(r["step"], r["lr"]) for r in rows(first_dir)])
    second, second_dir = run_loop(tmp_path, "resumed", step_fn, state=meta["resume"], metrics_from=first_dir)
    assert (second.exit_code, second.status, second.epochs_completed) == (whole.exit_code, whole.status, 4)
    assert second.steps_completed == whole.steps_completed == 20
    assert rows(second_dir) == rows(whole_dir)  # each step once, same numbers (the fake clock included)
    for epoch in range(4):
        done_before = epoch < stop_step // 5  # validated and checkpointed before the signal
        got = metadata(first_dir if done_before else second_dir, f"epoch-{epoch:03d}")
        want = metadata(whole_dir, f"epoch-{epoch:03d}")
        for key in ("train_loss", "val_loss", "grad_norm_max", "tokens_seen", "optimizer_state_sha", "wall_seconds",
                    "resume"):
            assert got[key] == want[key], (epoch, key)


def test_resume_at_an_epoch_boundary_makes_the_interrupted_runs_decision(tmp_path):
    # Patience ran out after epoch 3: a run resumed from that epoch's checkpoint ends there too, without a step.
    whole, whole_dir = run_loop(tmp_path, "whole", Scripted())
    assert whole.status.value == "early_stop" and whole.epochs_completed == 4
    step_fn = Scripted()
    again, _ = run_loop(tmp_path, "again", step_fn, state=metadata(whole_dir, "epoch-003")["resume"])
    assert (again.status, again.exit_code, again.steps_completed) == (whole.status, whole.exit_code, 20)
    assert step_fn.applied == []
