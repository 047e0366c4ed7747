"""The fault drill: inject a NaN loss, an exception or a SIGKILL on one rank at one step.

Off unless ``ALBOR_FAULT`` is set, for operators rehearsing an incident and for
the multi-rank tests (Megatron-LM ships the same kind of error injection).
The value is ``KIND:RANK:STEP`` with KIND one of ``nan`` (the rank's loss
becomes NaN before backward), ``raise`` (the rank raises before its forward
pass) or ``kill`` (the rank SIGKILLs itself before its forward pass), e.g.
``ALBOR_FAULT=nan:1:3``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Mapping

from albor.errors import ConfigError

ENV_VAR = "ALBOR_FAULT"
KINDS = ("nan", "raise", "kill")


class InjectedFault(RuntimeError):
    """The exception the ``raise`` drill throws."""


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    kind: str
    rank: int
    step: int

    def fires(self, rank: int, step: int) -> bool:
        return rank == self.rank and step == self.step

    def before_forward(self, rank: int, step: int) -> None:
        """Raise or die here when the drill says so."""
        if not self.fires(rank, step):
            return
        if self.kind == "raise":
            raise InjectedFault(f"fault drill: exception injected on rank {rank} at step {step}")
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)

    def poisons_loss(self, rank: int, step: int) -> bool:
        return self.kind == "nan" and self.fires(rank, step)


def fault_plan_from_env(environ: Mapping[str, str] = os.environ) -> FaultPlan | None:
    """Parse ``ALBOR_FAULT``; None when unset or empty."""
    raw = environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    parts = raw.split(":")
    try:
        kind, rank, step = parts[0], int(parts[1]), int(parts[2])
        if len(parts) != 3 or kind not in KINDS or rank < 0 or step < 0:
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError(
            f"{ENV_VAR}={raw!r} is not KIND:RANK:STEP with KIND one of {', '.join(KINDS)} "
            f"(e.g. nan:1:3); unset it for a normal run"
        ) from None
    return FaultPlan(kind, rank, step)
