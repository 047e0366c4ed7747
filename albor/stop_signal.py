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
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Records the first SIGTERM/SIGUSR1; on a second one calls ``on_force(code)`` and exits."""

    def __init__(self, on_force: Callable[[int], None] | None = None) -> None:
        self.received: signal.Signals | None = None
        self.on_force = on_force
        self._settled = False

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> None:
        """Take over the stop signals (main thread only, as Python requires)."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def settle(self) -> None:
        """The run's outcome is decided: later signals change nothing.

        When every rank stops with the same code, the launcher SIGTERMs the ranks
        that have not exited yet; to a rank that was itself signalled, that would
        be a second signal, and it must not turn an orderly stop into a kill.
        """
        self._settled = True

    def _handle(self, signum: int, frame) -> None:
        if self.received is None or self._settled:
            self.received = self.received or signal.Signals(signum)
            return
        code = 128 + signum  # the shell's convention for "ended by signal N"
        try:
            if self.on_force is not None:
                self.on_force(code)
        finally:
            os._exit(code)
