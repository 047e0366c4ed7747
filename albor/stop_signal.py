"""SIGTERM and SIGUSR1 ask a run to stop; the handler only records the request.

Schedulers signal before they kill (Kubernetes and Slurm send SIGTERM; Slurm
can send SIGUSR1 ahead of a time limit with ``--signal``). A handler that did
real work could run in the middle of a collective, or on one rank only. So the
first signal just sets a flag; the step's fused all-reduce carries it to every
rank, and every rank stops at the same step boundary (Megatron-LM's pattern;
see docs/distributed-step.md). A second signal means "now": the rank records
how it ended and exits at once with 128 + the signal number.

A rank whose peer has died also receives SIGTERM, from the launcher cleaning
up: the flag changes nothing there, because the rank's next collective fails
first and it ends with the rank-failure code, as its peers do.

A signal sent only to the top ``deepspeed`` process reaches no rank: on one
node that runner installs no handler, dies, and leaves its ranks training.
:func:`watch_launcher` makes a rank notice when its launcher is gone and sets
the same flag.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: A second signal this soon after the first is the same stop delivered twice: a process-group SIGTERM
#: (Slurm, systemd, kill -- -PGID) reaches a rank directly and again through deepspeed's launch.py.
DUPLICATE_WINDOW_S = 2.0


class StopSignals:
    """Records the first SIGTERM/SIGUSR1; on a second one calls ``on_force(code)`` and exits."""

    def __init__(self, on_force: Callable[[int], None] | None = None) -> None:
        self.received: signal.Signals | None = None
        self.on_force = on_force
        self._settled = False
        self._signalled = False  # a real signal arrived (a watcher's request is not one)
        self._first_signal_at = 0.0  # time.monotonic() of the first real signal

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> None:
        """Take over the stop signals (main thread only, as Python requires)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def request(self, signum: int) -> None:
        """Ask for a stop exactly as a first signal would; callable from any thread.

        For a watcher that learns of a stop some other way (the launcher is
        gone). It never counts as a signal: it never forces an exit, and the
        first real signal after it is still only a first signal. A plain
        attribute write, read by the main thread in the step.
        """
        if self.received is None:
            self.received = signal.Signals(signum)

    def settle(self) -> None:
        """The run's outcome is decided: later signals change nothing.

        When every rank stops with the same code, the launcher SIGTERMs the ranks
        that have not exited yet; to a rank that was itself signalled, that would
        be a second signal, and it must not turn an orderly stop into a kill.
        """
        self._settled = True

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if not self._signalled or self._settled or now - self._first_signal_at < DUPLICATE_WINDOW_S:
            if not self._signalled:
                self._first_signal_at = now
            self._signalled = True
            self.received = self.received or signal.Signals(signum)
            return
        code = 128 + signum  # the shell's convention for "ended by signal N"
        try:
            if self.on_force is not None:
                self.on_force(code)
        finally:
            os._exit(code)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCH_MODULE = "deepspeed.launcher.launch"  # DeepSpeed's per-node launcher, the ranks' parent
RUNNER_MODULE = "deepspeed.launcher.runner"  # the `deepspeed` command, the launcher's parent
RUNNER_SCRIPTS = ("deepspeed", "ds")  # DeepSpeed's console scripts for the runner


def watch_launcher(stop: StopSignals, *, poll_s: float = 0.5) -> None:
    """Turn the end of this rank's launcher into a stop request, as a SIGTERM would; never raises.

    Only for a rank started by a launcher (``LOCAL_RANK`` set: DeepSpeed's
    launch.py and torchrun both set it). A plain ``python -m albor.pretrain``
    must go on when the shell that started it exits (``nohup``).

    * The parent (launch.py, or torchrun's agent) dying, however it dies, sends
      this process SIGTERM (Linux ``PR_SET_PDEATHSIG``; nothing elsewhere).
    * Under DeepSpeed's launch.py, a daemon thread polls the ``deepspeed``
      runner above it every ``poll_s`` seconds and calls
      ``stop.request(SIGTERM)`` once the runner is gone: a runner killed by a
      signal takes nobody with it. Under torchrun the agent forwards signals
      itself, and no thread starts.

    Whatever cannot be set up is one warning line; the run goes on without it.
    """
    if "LOCAL_RANK" not in os.environ:
        return
    try:
        parent = _die_with_parent(stop)
    except Exception as e:
        log.warning("cannot ask for SIGTERM when the launcher dies (%s: %s)", type(e).__name__, e)
        parent = os.getppid()
    if stop.requested:  # the parent is already gone
        return
    try:
        runner = _deepspeed_runner(parent)
        if runner is not None:
            thread = threading.Thread(
                target=_watch_runner, args=(stop, *runner, poll_s), name="albor-runner-watch", daemon=True
            )
            thread.start()
    except Exception as e:
        log.warning(
            "cannot watch the deepspeed runner (%s: %s): a signal sent only to it will not stop this rank",
            type(e).__name__, e,
        )


def _die_with_parent(stop: StopSignals) -> int:
    """Have the kernel SIGTERM this process when its parent dies; returns the parent's pid.

    The kernel watches the thread that started this process: launch.py and
    torchrun's agent start their ranks from their main thread, so that is the
    parent's death.
    """
    parent = os.getppid()
    if not sys.platform.startswith("linux"):
        return parent
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if os.getppid() != parent:  # it died before the prctl took: no signal will come
        stop.request(signal.SIGTERM)
    return parent


def is_launch_command(cmdline: Sequence[str]) -> bool:
    """DeepSpeed's per-node launcher: ``python -u -m deepspeed.launcher.launch ...``."""
    return LAUNCH_MODULE in cmdline


def is_runner_command(cmdline: Sequence[str]) -> bool:
    """The ``deepspeed`` (or ``ds``) command, or ``python -m deepspeed.launcher.runner``.

    On several nodes launch.py's parent is instead the remote shell of pdsh,
    and the runner there forwards signals itself.
    """
    return RUNNER_MODULE in cmdline or any(os.path.basename(arg) in RUNNER_SCRIPTS for arg in cmdline)


def _deepspeed_runner(parent: int) -> tuple[int, float] | None:
    """(pid, create time) of the runner above this rank's launch.py; None when there is none to watch."""
    import psutil  # a dependency of DeepSpeed; only a launched rank needs it

    launcher = psutil.Process(parent)
    if not is_launch_command(launcher.cmdline()):
        return None  # torchrun's agent, or another launcher: PR_SET_PDEATHSIG covers its death
    runner = launcher.parent()
    if runner is None or not is_runner_command(runner.cmdline()):
        # also what a runner killed before this rank started leaves: launch.py adopted by init
        what = "none" if runner is None else f"pid {runner.pid}: {' '.join(runner.cmdline())[:120]}"
        log.warning(
            "not watching the deepspeed runner: DeepSpeed's launch.py (pid %d) has no runner for a parent (%s); "
            "a signal sent only to the runner will not stop this rank", parent, what,
        )
        return None
    return runner.pid, runner.create_time()


def _watch_runner(stop: StopSignals, pid: int, created: float, poll_s: float) -> None:
    """Poll the runner until it is gone (or the run is stopping anyway), then request a stop."""
    import psutil

    try:
        while not stop.requested:
            time.sleep(poll_s)
            try:
                proc = psutil.Process(pid)
                # a new process with a recycled pid, or a zombie its parent has not reaped yet, is the runner gone
                alive = proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                stop.request(signal.SIGTERM)
                log.warning(
                    "the deepspeed runner (pid %d) is gone: stopping after the current step, as for SIGTERM", pid
                )
                return
    except Exception as e:  # a thread's exception would only print a traceback; say what it means instead
        log.warning(
            "stopped watching the deepspeed runner (%s: %s): a signal sent only to it will not stop this rank",
            type(e).__name__, e,
        )
