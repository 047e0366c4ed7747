"""Stop signals: the first only sets a flag, a second ends the rank at once, a settled run ignores more."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from albor.stop_signal import StopSignals


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
        time.sleep(2.2)  # past the duplicate window: a real second signal
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


def test_a_duplicate_within_the_window_is_the_same_stop(restore_handlers, monkeypatch):
    # A process-group SIGTERM reaches a deepspeed rank directly and, milliseconds later, through launch.py.
    forced = []
    monkeypatch.setattr(os, "_exit", lambda code: forced.append(("exit", code)))  # a failure must not end pytest
    stop = StopSignals(on_force=forced.append)
    stop.install()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    assert forced == [] and stop.received == signal.SIGTERM
