"""The loop driver with test doubles for the step, validation, checkpoint and clock (tests/fakes.py)."""

import json
import math

import pytest

from albor.contract import AbortReason
from albor.errors import ExitCode
from albor.loop import PretrainLoop, RunStatus, StepResult
from albor.run_files import RunFiles
from fakes import LinearDecay, NanAtStep, RecordingCheckpoint, ScriptedVal, SteppingClock, applied_steps_sha, loop_config

CONTRACT_FIELDS = {"step", "train_loss", "grad_norm", "lr", "tokens_per_sec", "gpu_util_pct", "wall_ms"}
META_FIELDS = {"epoch", "train_loss", "val_loss", "train_ppl", "val_ppl", "optimizer_state_sha", "wall_seconds", "tokens_seen", "grad_norm_max"}


def make_loop(tmp_path, step_fn=None, val=(3.4, 3.0, 2.6, 2.2, 2.0), ckpt=None, rank=0, clock=None, **cfg):
    config = loop_config(tmp_path, **cfg)
    files = RunFiles(config.output_dir, enabled=rank == 0)
    extra = {} if clock is None else {"clock": clock}
    loop = PretrainLoop(
        config, step_fn or LinearDecay(), ScriptedVal(val), ckpt or RecordingCheckpoint(), vocab_size=50257, files=files,
        **extra,
    )
    return loop, config


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_happy_path_decreasing_loss(tmp_path):
    step_fn = LinearDecay(tokens=8)
    loop, cfg = make_loop(tmp_path, step_fn=step_fn, clock=SteppingClock(0.25))
    result = loop.run()
    assert result.status is RunStatus.OK and result.exit_code == ExitCode.OK
    # Target 2.2 reached at epoch 3 with min_epochs 1: no compute is spent past it.
    assert result.final_val_loss == pytest.approx(2.2) and result.target_met and result.epochs_completed == 4
    rows = read_jsonl(cfg.output_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(20))
    for r in rows:  # gate 001
        assert CONTRACT_FIELDS <= set(r)
        # The clock moves 0.25 s a read and the loop reads it once a step: each step
        # took 250 ms for its 8 tokens, i.e. 32 tokens/s (a per-step figure, not cumulative).
        assert (r["wall_ms"], r["tokens_per_sec"]) == (250.0, 32.0)
        assert r["train_loss"] == pytest.approx(3.5 - 0.1 * r["step"]) and r["grad_norm"] == 0.8
    assert len(loop.val_losses) == 4 and loop.next_step == 20
    for epoch in range(4):  # gate 002
        meta = json.loads((cfg.output_dir / "ckpt" / f"epoch-{epoch:03d}.metadata.json").read_text())
        assert META_FIELDS <= set(meta) and meta["epoch"] == epoch
        assert meta["tokens_seen"] == 8 * 5 * (epoch + 1)
        # Five steps of 0.25 s plus the validation read: 6 reads after the epoch's first.
        assert meta["wall_seconds"] == 1.5
        # Mean of the epoch's losses 3.5 - 0.1·step over its five steps (the middle one's).
        assert meta["train_loss"] == pytest.approx(3.5 - 0.1 * (5 * epoch + 2))
    status = json.loads((cfg.output_dir / "status.json").read_text())
    assert status["status"] == "ok" and status["exit_code"] == 0 and status["target_met"] is True


def test_aborts_on_doubling_val_loss(tmp_path):
    ckpt = RecordingCheckpoint()
    loop, cfg = make_loop(tmp_path, val=(3.5, 7.1, 2.0), ckpt=ckpt)
    result = loop.run()
    assert result.status is RunStatus.ABORTED and result.abort.reason is AbortReason.DIVERGENCE
    assert result.abort.epoch == 1 and result.exit_code == ExitCode.DIVERGENCE
    assert [e for e, _ in ckpt.calls] == [0]  # no checkpoint for the diverged epoch
    assert not (cfg.output_dir / "ckpt" / "epoch-001.metadata.json").exists()
    status = json.loads((cfg.output_dir / "status.json").read_text())
    assert status["reason"] == "divergence" and status["exit_code"] == 10 and status["abort"]["epoch"] == 1


def test_aborts_on_nan_at_step_3_before_logging_it(tmp_path):
    ckpt = RecordingCheckpoint()
    loop, cfg = make_loop(tmp_path, step_fn=NanAtStep(3), val=(3.0,), ckpt=ckpt)
    result = loop.run()
    a = result.abort
    assert (a.reason, a.step, a.field, a.ranks) == (AbortReason.NUMERICAL_INSTABILITY, 3, "train_loss", (1,))
    assert result.exit_code == ExitCode.NUMERICAL_INSTABILITY
    assert [r["step"] for r in read_jsonl(cfg.output_dir / "metrics.jsonl")] == [0, 1, 2]
    assert ckpt.calls == []  # an aborted epoch writes no checkpoint
    status = json.loads((cfg.output_dir / "status.json").read_text())
    assert status["abort"]["step"] == 3 and status["abort"]["ranks"] == [1] and status["abort"]["value"] == "nan"


def test_skipped_step_aborts(tmp_path):
    class Skips(LinearDecay):
        def __call__(self, step, lr):
            r = super().__call__(step, lr)
            return StepResult(r.train_loss, r.grad_norm, r.tokens, step_applied=step != 2, flagged_ranks=(0,))

    result = make_loop(tmp_path, step_fn=Skips())[0].run()
    assert result.abort.reason is AbortReason.NUMERICAL_INSTABILITY and result.abort.field == "step_applied"
    assert result.abort.step == 2


def test_rank_error_aborts_with_rank_failure(tmp_path):
    class Raises(LinearDecay):
        def __call__(self, step, lr):
            if step == 4:
                return StepResult(math.nan, math.nan, 0, rank_error="RuntimeError: boom", flagged_ranks=(1,))
            return super().__call__(step, lr)

    result = make_loop(tmp_path, step_fn=Raises())[0].run()
    assert result.exit_code == ExitCode.RANK_FAILURE and result.abort.ranks == (1,) and "boom" in result.abort.message


def test_throughput_gate_008(tmp_path):
    class BadUtil(LinearDecay):
        def __call__(self, step, lr):
            r = super().__call__(step, lr)
            return StepResult(r.train_loss, r.grad_norm, r.tokens, gpu_util_pct=101.0)

    result = make_loop(tmp_path, step_fn=BadUtil())[0].run()
    assert result.exit_code == ExitCode.THROUGHPUT_OUT_OF_RANGE and result.abort.step == 0


def closed_form_lr(step, lr_max=1e-4, lr_min=1e-6, warmup=2, total=25):
    """docs/contract.md's schedule, written out for loop_config's numbers (not albor.schedule)."""
    if step < warmup:
        return lr_max * step / warmup
    return lr_min + (lr_max - lr_min) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_loop_feeds_the_schedule(tmp_path):
    step_fn = LinearDecay()
    loop, cfg = make_loop(tmp_path, step_fn=step_fn, target_val_loss=1.0)
    loop.run()
    assert [s for s, _ in step_fn.applied] == list(range(25))
    assert step_fn.lrs == pytest.approx([closed_form_lr(s) for s in range(25)], rel=1e-12, abs=0)
    # Hand values: warmup 0, 5e-5; the peak at step 2; the cosine's midpoint falls between
    # steps 13 and 14 (progress 11.5/23); the last step is one cosine step above lr_min.
    assert step_fn.lrs[:3] == [0.0, 5e-5, pytest.approx(1e-4)]
    assert step_fn.lrs[13] > (1e-4 + 1e-6) / 2 > step_fn.lrs[14]
    assert step_fn.lrs[24] == pytest.approx(1e-6 + 9.9e-5 * 0.5 * (1 - math.cos(math.pi / 23)))
    # ... and metrics.jsonl logs the lr each step used.
    assert [r["lr"] for r in read_jsonl(cfg.output_dir / "metrics.jsonl")] == step_fn.lrs


def test_checkpoint_called_once_per_passing_epoch(tmp_path):
    ckpt = RecordingCheckpoint()
    loop, _ = make_loop(tmp_path, ckpt=ckpt, target_val_loss=1.0)
    loop.run()
    assert [e for e, _ in ckpt.calls] == [0, 1, 2, 3, 4]
    for epoch, path in ckpt.calls:
        assert path.name == f"epoch-{epoch:03d}.apr"
        assert path.with_name(f"epoch-{epoch:03d}.metadata.json").exists()


def test_optimizer_sha_is_the_step_fns_after_the_epochs_last_step(tmp_path):
    step_fn = LinearDecay()
    loop, cfg = make_loop(tmp_path, step_fn=step_fn, target_val_loss=1.0)
    loop.run()
    assert len(step_fn.applied) == 25
    for epoch in range(5):
        # The state after exactly this epoch's steps: not one step early, not one late.
        expected = applied_steps_sha(step_fn.applied[: 5 * (epoch + 1)])
        meta = json.loads((cfg.output_dir / "ckpt" / f"epoch-{epoch:03d}.metadata.json").read_text())
        assert meta["optimizer_state_sha"] == expected
        assert "optimizer_state_sha_source" not in meta  # every step function has a real optimizer state


def test_checkpoint_failure_stops_run_and_keeps_earlier_epochs(tmp_path):
    ckpt = RecordingCheckpoint(fail_on={2})
    loop, cfg = make_loop(tmp_path, ckpt=ckpt)
    result = loop.run()
    assert result.exit_code == ExitCode.CHECKPOINT_FAILED and result.abort.epoch == 2
    ckpt_dir = cfg.output_dir / "ckpt"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "epoch-000.apr", "epoch-000.metadata.json", "epoch-001.apr", "epoch-001.metadata.json",
    ]
    status = json.loads((cfg.output_dir / "status.json").read_text())
    assert status["reason"] == "checkpoint_failed" and status["epochs_completed"] == 2
    assert "disk full" in status["abort"]["message"]


def test_early_stop_after_patience(tmp_path):
    loop, _ = make_loop(tmp_path, val=(3.0, 3.1, 3.2, 3.3, 3.4), min_epochs_before_early_stop=1)
    result = loop.run()
    assert result.status is RunStatus.EARLY_STOP and result.epochs_completed == 3
    assert result.best_val_loss == 3.0 and result.exit_code == ExitCode.TARGET_NOT_MET


def test_no_early_stop_before_min_epochs(tmp_path):
    loop, _ = make_loop(tmp_path, val=(3.0, 3.1, 3.2, 3.3, 3.4), min_epochs_before_early_stop=4)
    assert loop.run().epochs_completed == 4


def test_target_met_stops_after_min_epochs(tmp_path):
    loop, _ = make_loop(tmp_path, val=(2.1, 2.0, 1.9, 1.8, 1.7), min_epochs_before_early_stop=3)
    result = loop.run()
    assert result.status is RunStatus.OK and result.epochs_completed == 3 and result.final_val_loss == 1.9


def test_target_missed_exit_code(tmp_path):
    result = make_loop(tmp_path, val=(3.4, 3.0, 2.9, 2.8, 2.7))[0].run()
    assert result.status is RunStatus.OK and not result.target_met and result.exit_code == ExitCode.TARGET_NOT_MET


def test_epoch_count_is_ceil(tmp_path):
    loop, _ = make_loop(tmp_path, total_steps=23, target_val_loss=1.0)
    loop.run()
    assert len(loop.val_losses) == 5 and len(loop.step_metrics) == loop.next_step == 23


def test_other_ranks_write_nothing(tmp_path):
    loop, cfg = make_loop(tmp_path, rank=1)
    assert loop.run().status is RunStatus.OK
    assert not (cfg.output_dir / "metrics.jsonl").exists() and not (cfg.output_dir / "status.json").exists()


@pytest.mark.parametrize("val", [(math.nan,), (3.0, math.inf)])
def test_non_finite_val_loss_is_numerical_instability(tmp_path, val):
    ckpt = RecordingCheckpoint()
    result = make_loop(tmp_path, val=val, ckpt=ckpt)[0].run()
    assert result.abort.reason is AbortReason.NUMERICAL_INSTABILITY and result.abort.field == "val_loss"
    assert result.abort.epoch == len(val) - 1 and len(ckpt.calls) == len(val) - 1


def test_epoch_zero_above_cap_aborts_with_its_own_code(tmp_path):
    result = make_loop(tmp_path, val=(31.99,))[0].run()
    assert result.exit_code == ExitCode.DIVERGENCE_AT_EPOCH_ZERO and result.epochs_completed == 0


def test_clock_running_backwards_trips_gate_008(tmp_path):
    ticks = iter([0.0, 1.0, 0.5] + [float(t) for t in range(2, 1000)])
    config = loop_config(tmp_path)
    loop = PretrainLoop(config, LinearDecay(), ScriptedVal((3.0,)), RecordingCheckpoint(), vocab_size=50257,
                        files=RunFiles(config.output_dir, enabled=True), clock=lambda: next(ticks))
    result = loop.run()
    assert result.exit_code == ExitCode.THROUGHPUT_OUT_OF_RANGE and result.abort.step == 1
    assert result.abort.field == "tokens_per_sec"


def test_mfu_is_recorded_when_the_peak_is_known(tmp_path):
    config = loop_config(tmp_path, target_val_loss=1.0)
    ticks = iter(float(t) for t in range(10_000))  # one second a step
    loop = PretrainLoop(config, LinearDecay(tokens=1000), ScriptedVal([3.0] * 5), RecordingCheckpoint(),
                        vocab_size=50257, files=RunFiles(config.output_dir, enabled=True), clock=lambda: next(ticks),
                        flops_per_token=6e6, peak_flops=1e10)
    loop.run()
    rows = read_jsonl(config.output_dir / "metrics.jsonl")
    assert rows[0]["tokens_per_sec"] == 1000.0 and rows[0]["mfu"] == pytest.approx(0.6)
    assert rows[0]["epoch"] == 0 and rows[0]["tokens_seen"] == 1000


def test_mfu_is_null_without_a_peak(tmp_path):
    loop, cfg = make_loop(tmp_path)
    loop.run()
    assert all(r["mfu"] is None for r in read_jsonl(cfg.output_dir / "metrics.jsonl"))


def test_metrics_write_failure_is_a_rank_failure(tmp_path):
    loop, cfg = make_loop(tmp_path)

    def full(record):
        raise OSError(28, "No space left on device")

    loop.files.append_metrics = full
    result = loop.run()
    assert result.exit_code == ExitCode.RANK_FAILURE and "No space left" in result.abort.message
    assert result.abort.step == 0
