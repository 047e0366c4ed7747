"""A rank learns that its launcher is gone: StopSignals.request and watch_launcher.

On one node the ``deepspeed`` runner dies of a SIGTERM without passing it on,
and launch.py can be killed outright; either way the ranks must stop as if
they had been signalled. The process-tree tests build small fake trees of
plain Python processes (a "runner", a "launch" whose argv names DeepSpeed's
launcher, a "rank"), each in its own process group that the test kills at the
end, so nothing outlives a test.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from albor import stop_signal
from albor.stop_signal import (
    LAUNCH_MODULE, StopSignals, _watch_runner, is_launch_command, is_runner_command, watch_launcher,
)

REPO = Path(__file__).resolve().parents[1]
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
WATCH_THREAD = "albor-runner-watch"
#: A rank must notice within this; it polls the runner every 0.05 s here.
NOTICE_WITHIN_S = 3.0

# The fake rank: what train.py does (install, then watch), then report and wait for a stop request.
RANK = textwrap.dedent("""
    import ctypes, json, logging, os, sys, threading, time
    from pathlib import Path
    from albor.stop_signal import StopSignals, watch_launcher
    out = Path(sys.argv[1])
    wait_s = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0  # never outlive the test by long
    logging.basicConfig(filename=out / "rank.log", level=logging.WARNING, format="%(message)s")

    def write(name, **payload):  # atomically: the test polls for the file
        (out / (name + ".tmp")).write_text(json.dumps(payload))
        os.replace(out / (name + ".tmp"), out / name)

    def pdeathsig():
        if not sys.platform.startswith("linux"):
            return None
        sig = ctypes.c_int(-1)
        ctypes.CDLL(None).prctl(2, ctypes.byref(sig))  # PR_GET_PDEATHSIG
        return sig.value

    stop = StopSignals()
    stop.install()
    watch_launcher(stop, poll_s=0.05)
    write("ready.json", pid=os.getpid(), ppid=os.getppid(), pdeathsig=pdeathsig(),
          threads=[t.name for t in threading.enumerate()], requested=stop.requested)
    t0 = time.monotonic()
    while not stop.requested and time.monotonic() - t0 < wait_s:
        time.sleep(0.01)
    write("stopped.json", requested=stop.requested, received=int(stop.received or 0), ppid=os.getppid())
""")

# Starts the next process down the fake tree with the given argv and waits for it.
SPAWN = textwrap.dedent("""
    import json, os, subprocess, sys
    child = subprocess.Popen(json.loads(sys.argv[1]), env={**os.environ, **json.loads(sys.argv[2])})
    child.wait()
""")

# A parent that starts the rank, waits until it is watching, then dies of SIGKILL: no handler runs.
DYING_PARENT = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    from pathlib import Path
    out = Path(sys.argv[2])
    subprocess.Popen([sys.executable, sys.argv[1], str(out)], env={**os.environ, "LOCAL_RANK": "0"})
    t0 = time.monotonic()
    while not (out / "ready.json").exists() and time.monotonic() - t0 < 30:
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def child_env() -> dict[str, str]:
    """The test's environment without a surrounding launcher's variables, able to import albor."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def wait_for(path: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.01)
    return json.loads(path.read_text())


@pytest.fixture
def process_group() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start a command in a process group of its own; every process of every group started is killed at the end."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, start_new_session=True, env=child_env(), **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its children stay in the group after it dies
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


# --- StopSignals.request ------------------------------------------------------------------------


@pytest.fixture
def stop_and_forced(monkeypatch) -> Iterator[tuple[StopSignals, list[int]]]:
    """Installed StopSignals whose forced exit is recorded instead of ending the test process."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    forced: list[int] = []
    monkeypatch.setattr(os, "_exit", forced.append)
    monkeypatch.setattr(stop_signal, "DUPLICATE_WINDOW_S", 0.0)  # back-to-back signals here are meant as two
    stop = StopSignals(on_force=lambda code: None)
    stop.install()
    yield stop, forced
    for s, h in saved.items():
        signal.signal(s, h)


def test_request_sets_the_flag_as_a_first_signal_would(stop_and_forced):
    stop, forced = stop_and_forced
    assert not stop.requested
    stop.request(signal.SIGTERM)
    assert stop.requested and stop.received == signal.SIGTERM
    assert isinstance(stop.received, signal.Signals)
    stop.request(signal.SIGUSR1)  # the first reason stays, and a watcher never forces
    assert stop.received == signal.SIGTERM and forced == []


def test_request_from_another_thread_is_seen_by_the_main_thread(stop_and_forced):
    stop, _ = stop_and_forced
    t = threading.Thread(target=stop.request, args=(signal.SIGTERM,))
    t.start()
    t.join()
    assert stop.requested


def test_a_request_after_a_signal_never_forces(stop_and_forced):
    stop, forced = stop_and_forced
    os.kill(os.getpid(), signal.SIGUSR1)
    stop.request(signal.SIGTERM)
    stop.request(signal.SIGTERM)
    assert forced == [] and stop.received == signal.SIGUSR1


def test_a_signal_after_a_request_is_a_first_signal_and_the_next_one_forces(stop_and_forced):
    # The runner died (a request); then launch.py's clean-up SIGTERM is this rank's first real signal.
    stop, forced = stop_and_forced
    stop.request(signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    assert forced == [] and stop.received == signal.SIGTERM
    os.kill(os.getpid(), signal.SIGUSR1)  # the second real signal: "now"
    assert forced == [128 + signal.SIGUSR1]


def test_settle_still_disarms_real_signals_after_a_request(stop_and_forced):
    stop, forced = stop_and_forced
    stop.request(signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    stop.settle()
    os.kill(os.getpid(), signal.SIGTERM)
    stop.request(signal.SIGUSR1)
    assert forced == [] and stop.received == signal.SIGTERM


# --- which processes are DeepSpeed's ------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmdline", "launch", "runner"),
    [
        (["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "--master_port=29500",
          "-m", "albor.pretrain"], True, False),
        (["/v/bin/python", "/v/bin/deepspeed", "--num_gpus", "2", "--module", "albor.pretrain"], False, True),
        (["/v/bin/ds", "--num_gpus", "2", "train.py"], False, True),
        (["python", "-m", "deepspeed.launcher.runner", "train.py"], False, True),
        (["/v/bin/python", "/v/bin/torchrun", "--nproc_per_node", "2", "-m", "albor.pretrain"], False, False),
        # pdsh's remote shell on another node: it only mentions the launcher
        (["bash", "-c", "cd /w; /v/bin/python -u -m deepspeed.launcher.launch --world_info=e30= x.py"], False, False),
        (["-bash"], False, False),
    ],
)
def test_deepspeed_commands_are_recognised(cmdline, launch, runner):
    assert is_launch_command(cmdline) is launch
    assert is_runner_command(cmdline) is runner


# --- the runner watcher, in-process --------------------------------------------------------------


def test_a_process_with_the_runners_pid_but_another_start_time_is_not_the_runner():
    stop = StopSignals()
    me = psutil.Process()
    watcher = threading.Thread(target=_watch_runner, args=(stop, me.pid, me.create_time() - 1.0, 0.01), daemon=True)
    watcher.start()
    watcher.join(timeout=2)
    assert stop.requested and stop.received == signal.SIGTERM and not watcher.is_alive()


def test_a_live_runner_requests_nothing_and_the_watcher_ends_with_the_run():
    stop = StopSignals()
    me = psutil.Process()
    watcher = threading.Thread(target=_watch_runner, args=(stop, me.pid, me.create_time(), 0.01), daemon=True)
    watcher.start()
    time.sleep(0.3)
    assert not stop.requested and watcher.is_alive()
    stop.request(signal.SIGUSR1)  # stopping for another reason: nothing left to watch
    watcher.join(timeout=2)
    assert not watcher.is_alive()


def test_a_watcher_that_cannot_start_is_one_warning_each_and_the_run_goes_on(monkeypatch):
    def no_prctl(stop):
        raise OSError(1, "Operation not permitted")

    def no_psutil(parent):
        raise psutil.AccessDenied(parent)

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(stop_signal, "_die_with_parent", no_prctl)
    monkeypatch.setattr(stop_signal, "_deepspeed_runner", no_psutil)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # its own handler: another test's setup_logging stops propagation at "albor"
    logger = logging.getLogger(stop_signal.__name__)
    logger.addHandler(handler)
    stop = StopSignals()
    try:
        watch_launcher(stop)  # returns
    finally:
        logger.removeHandler(handler)
    assert not stop.requested
    warnings = [r.getMessage() for r in records]
    assert len(warnings) == 2, warnings
    assert "cannot ask for SIGTERM when the launcher dies" in warnings[0] and "not permitted" in warnings[0]
    assert "cannot watch the deepspeed runner" in warnings[1] and "AccessDenied" in warnings[1]


# --- real process trees ---------------------------------------------------------------------------


@LINUX
@pytest.mark.parametrize("local_rank", [None, "0"])
def test_only_a_launched_rank_asks_for_its_parents_death(tmp_path, local_rank):
    # A plain `python -m albor.pretrain` must survive its shell exiting (nohup); a launched rank must not.
    (tmp_path / "rank.py").write_text(RANK)
    env = child_env() | ({"LOCAL_RANK": local_rank} if local_rank else {})
    rank = [sys.executable, str(tmp_path / "rank.py"), str(tmp_path), "0"]  # report, then exit at once
    proc = subprocess.run(rank, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ready = json.loads((tmp_path / "ready.json").read_text())
    assert ready["pdeathsig"] == (signal.SIGTERM if local_rank else 0)
    assert WATCH_THREAD not in ready["threads"]  # the parent is pytest, not DeepSpeed's launch.py


@LINUX
def test_a_parent_gone_before_the_prctl_took_is_a_stop_request(tmp_path):
    # The parent dies between reading its pid and PR_SET_PDEATHSIG: no signal will ever come.
    code = textwrap.dedent("""
        import os
        from albor.stop_signal import StopSignals, watch_launcher
        ppids = iter([424242])
        os.getppid = lambda: next(ppids, 1)  # then adopted by init
        stop = StopSignals()
        watch_launcher(stop)
        print(int(stop.received or 0))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env() | {"LOCAL_RANK": "0"}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(int(signal.SIGTERM))], proc.stderr


@LINUX
def test_a_rank_whose_parent_is_killed_gets_sigterm(tmp_path, process_group):
    (tmp_path / "rank.py").write_text(RANK)
    (tmp_path / "parent.py").write_text(DYING_PARENT)
    parent = process_group([sys.executable, str(tmp_path / "parent.py"), str(tmp_path / "rank.py"), str(tmp_path)])
    ready = wait_for(tmp_path / "ready.json", timeout=30)
    assert ready["ppid"] == parent.pid and not ready["requested"]
    assert parent.wait(timeout=30) == -signal.SIGKILL
    killed = time.monotonic()
    stopped = wait_for(tmp_path / "stopped.json", timeout=NOTICE_WITHIN_S)
    assert time.monotonic() - killed < NOTICE_WITHIN_S
    assert stopped["requested"] and stopped["received"] == signal.SIGTERM
    assert stopped["ppid"] != parent.pid


def fake_tree(tmp_path: Path, runner_name: str) -> list[str]:
    """argv of a fake runner named ``runner_name`` -> "launch" (argv names DeepSpeed's launcher) -> rank."""
    (tmp_path / "rank.py").write_text(RANK)
    (tmp_path / "spawn.py").write_text(SPAWN)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / runner_name).write_text(SPAWN)
    rank = [sys.executable, str(tmp_path / "rank.py"), str(tmp_path)]
    launch = [sys.executable, "-u", str(tmp_path / "spawn.py"), json.dumps(rank), json.dumps({"LOCAL_RANK": "0"}),
              LAUNCH_MODULE]
    return [sys.executable, str(tmp_path / "bin" / runner_name), json.dumps(launch), "{}"]


@pytest.mark.parametrize("reaped", [True, False], ids=["runner-reaped", "runner-zombie"])
def test_a_rank_notices_its_runner_killed_by_sigterm(tmp_path, process_group, reaped):
    runner = process_group(fake_tree(tmp_path, "deepspeed"))
    ready = wait_for(tmp_path / "ready.json", timeout=30)
    launch = psutil.Process(ready["ppid"])
    assert is_launch_command(launch.cmdline()) and launch.ppid() == runner.pid
    assert WATCH_THREAD in ready["threads"] and not ready["requested"]

    time.sleep(0.3)  # a live runner: no request
    assert not (tmp_path / "stopped.json").exists()
    runner.send_signal(signal.SIGTERM)  # what Kubernetes sends the top process; it passes nothing on
    signalled = time.monotonic()
    if reaped:
        assert runner.wait(timeout=10) == -signal.SIGTERM
    stopped = wait_for(tmp_path / "stopped.json", timeout=NOTICE_WITHIN_S)
    assert time.monotonic() - signalled < NOTICE_WITHIN_S
    assert stopped["requested"] and stopped["received"] == signal.SIGTERM
    # the rank's parent still lives: the watcher told it, not PR_SET_PDEATHSIG
    assert stopped["ppid"] == launch.pid and launch.is_running() and launch.status() != psutil.STATUS_ZOMBIE
    if not reaped:  # nobody has reaped the runner: a zombie counts as gone
        assert psutil.Process(runner.pid).status() == psutil.STATUS_ZOMBIE


def test_a_launch_without_a_deepspeed_runner_above_it_is_not_watched(tmp_path, process_group):
    # e.g. pdsh's remote shell on another node, or launch.py adopted by init after the runner died
    process_group(fake_tree(tmp_path, "my-script"))
    ready = wait_for(tmp_path / "ready.json", timeout=30)
    assert WATCH_THREAD not in ready["threads"] and not ready["requested"]
    log = (tmp_path / "rank.log").read_text()
    assert "not watching the deepspeed runner" in log and "my-script" in log
