"""Stop signals: the handler only records; the loop stops every rank after the flagged step (exit 15)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from albor.errors import ExitCode
from albor.loop import PretrainLoop, StepResult
from albor.run_files import RunFiles
from albor.stop_signal import StopSignals
from tests.fakes import FakeOptimizer, RecordingCheckpoint, loop_config


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_first_signal_only_sets_the_flag(sig, restore_handlers):
    stop = StopSignals()
    stop.install()
    assert not stop.requested
    os.kill(os.getpid(), sig)  # delivered to the main thread before the next bytecode
    assert stop.requested and stop.received == sig  # and the process is still here


def test_second_signal_records_then_exits_with_128_plus_n(tmp_path):
    # os._exit cannot be observed in-process: a child takes two signals.
    marker = tmp_path / "forced"
    code = textwrap.dedent(f"""
        import os, signal, time
        from albor.stop_signal import StopSignals
        stop = StopSignals(on_force=lambda code: open({str(marker)!r}, "w").write(str(code)))
        stop.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise SystemExit(99)  # never reached
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM == 143, proc.stderr
    assert marker.read_text() == "143"


def test_signals_after_the_outcome_is_settled_do_not_kill(restore_handlers):
    # Every rank stopping with 15 makes the launcher SIGTERM the rest: not a second, forcing signal.
    forced = []
    stop = StopSignals(on_force=forced.append)
    stop.install()
    os.kill(os.getpid(), signal.SIGUSR1)
    stop.settle()
    os.kill(os.getpid(), signal.SIGTERM)
    assert forced == [] and stop.received == signal.SIGUSR1


class StopAt(FakeOptimizer):
    """A fake step function: a stop signal reaches ``ranks`` during ``step``."""

    def __init__(self, step: int, ranks: tuple[int, ...]) -> None:
        super().__init__()
        self.stop_step, self.ranks = step, ranks

    def __call__(self, step: int, lr: float) -> StepResult:
        self.applied.append((step, lr))
        ranks = self.ranks if step == self.stop_step else ()
        return StepResult(2.0, 0.5, 8, stop_requested_ranks=ranks)


@pytest.mark.parametrize("stop_step", [3, 7])  # in epoch 0, and in epoch 1 after a checkpoint
def test_loop_stops_after_the_flagged_step_with_exit_15(tmp_path, stop_step):
    config = loop_config(tmp_path)  # 5 steps an epoch
    step_fn = StopAt(stop_step, (1,))
    files = RunFiles(config.output_dir, enabled=True)
    checkpoint = RecordingCheckpoint()
    result = PretrainLoop(config, step_fn, lambda epoch: 3.0 - 0.1 * epoch, checkpoint, vocab_size=64, files=files).run()
    files.close()
    assert result.exit_code == ExitCode.STOPPED_BY_SIGNAL == 15
    assert [s for s, _ in step_fn.applied] == list(range(stop_step + 1))  # nothing runs after the flagged step
    rows = [json.loads(x) for x in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(stop_step + 1))  # the flagged step was good: it is logged
    assert [e for e, _ in checkpoint.calls] == list(range(stop_step // 5))  # no checkpoint after the signal
    status = json.loads((config.output_dir / "status.json").read_text())
    assert status["status"] == "stopped" and status["exit_code"] == 15
    assert status["reason"] == "stopped_by_signal"
    assert status["abort"]["step"] == stop_step and status["abort"]["ranks"] == [1]
    kept = "epoch-000" if stop_step >= 5 else "none yet"
    assert f"last complete checkpoint: {kept}" in status["abort"]["message"]
