"""The fault drill: a NaN loss, an exception (forward or backward), a SIGKILL or a validation spike on one rank.

Off unless ``ALBOR_FAULT`` is set, for operators rehearsing an incident and for
the multi-rank tests (Megatron-LM ships the same kind of error injection).
The value is ``KIND:RANK:WHEN``:

- ``nan:R:S``: rank R's loss becomes NaN before backward at step S;
- ``raise:R:S``: rank R raises before its forward pass at step S;
- ``kill:R:S``: rank R SIGKILLs itself before its forward pass at step S;
- ``raise-backward:R:S``: rank R raises inside its backward pass at step S
  (after a normal forward), where the error cannot ride in the step's
  all-reduce: the rank ends and its peers lose it in a collective;
- ``oom-backward:R:S``: the same, raising ``torch.OutOfMemoryError`` with CUDA's
  words, so the out-of-memory advice is rehearsed on a CPU;
- ``val-spike:R:E``: rank R's share of epoch E's validation loss is multiplied
  by :data:`VAL_SPIKE_FACTOR`, so the all-reduced val_loss jumps as it does when a
  run really diverges between two validations (gate 005).

e.g. ``ALBOR_FAULT=nan:1:3``. A rank outside the job is refused: a drill
that can never fire would rehearse nothing.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Mapping

from albor.errors import ConfigError

ENV_VAR = "ALBOR_FAULT"
STEP_KINDS = ("nan", "raise", "kill", "raise-backward", "oom-backward")
EPOCH_KINDS = ("val-spike",)
KINDS = STEP_KINDS + EPOCH_KINDS
#: With 2 ranks this makes the mean val_loss ~5.5x the previous epoch's: well past gate 005's 2.0.
VAL_SPIKE_FACTOR = 10.0


class InjectedFault(RuntimeError):
    """The exception the ``raise`` and ``raise-backward`` drills throw."""


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    kind: str
    rank: int
    when: int  # a step, or an epoch for the epoch kinds

    @property
    def unit(self) -> str:
        return "epoch" if self.kind in EPOCH_KINDS else "step"

    def _fires(self, kind: str, rank: int, when: int) -> bool:
        return self.kind == kind and rank == self.rank and when == self.when

    def before_forward(self, rank: int, step: int) -> None:
        """Raise or die here when the drill says so."""
        if self._fires("raise", rank, step):
            raise InjectedFault(f"fault drill: exception injected on rank {rank} at step {step}")
        if self._fires("kill", rank, step):
            os.kill(os.getpid(), signal.SIGKILL)

    def poisons_loss(self, rank: int, step: int) -> bool:
        return self._fires("nan", rank, step)

    def backward_error(self, rank: int, step: int) -> BaseException | None:
        """The exception this rank's backward raises at ``step`` (None unless drilled)."""
        where = f"injected in backward on rank {rank} at step {step}"
        if self._fires("raise-backward", rank, step):
            return InjectedFault(f"fault drill: exception {where}")
        if self._fires("oom-backward", rank, step):
            import torch

            # CUDA's own words, so the out-of-memory path (albor.rank_failure) is the one a GPU takes.
            return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (fault drill: {where})")
        return None

    def wrap_loss(self, rank: int, step: int, loss):
        """``loss`` itself, or, when a backward drill fires here, ``loss`` through a node whose backward raises.

        The raise happens inside ``engine.backward``, as a real error there would:
        the forward and its share of the step's work are done.
        """
        error = self.backward_error(rank, step)
        return loss if error is None else _raise_in_backward(loss, error)

    def val_loss_factor(self, rank: int, epoch: int) -> float:
        """What this rank's validation loss sum is multiplied by in ``epoch`` (1.0 unless drilled)."""
        return VAL_SPIKE_FACTOR if self._fires("val-spike", rank, epoch) else 1.0


def _raise_in_backward(loss, error: BaseException):
    """``loss`` unchanged in the forward; its backward raises ``error``."""
    import torch

    class _RaiseInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            raise error

    return _RaiseInBackward.apply(loss)


def fault_plan_from_env(environ: Mapping[str, str] = os.environ, *, world_size: int) -> FaultPlan | None:
    """Parse ``ALBOR_FAULT`` for a job of ``world_size`` ranks; None when unset or empty."""
    raw = environ.get(ENV_VAR, "").strip()
    if not raw:
        return None
    parts = raw.split(":")
    try:
        kind, rank, when = parts[0], int(parts[1]), int(parts[2])
        if len(parts) != 3 or kind not in KINDS or rank < 0 or when < 0:
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError(
            f"{ENV_VAR}={raw!r} is not KIND:RANK:STEP (or val-spike:RANK:EPOCH) with KIND one of "
            f"{', '.join(KINDS)} (e.g. nan:1:3); unset it for a normal run"
        ) from None
    if rank >= world_size:
        raise ConfigError(
            f"{ENV_VAR}={raw!r} names rank {rank}, but this job has {world_size} rank(s) (0..{world_size - 1}): "
            "the drill would never fire; name a rank of the job, or unset it"
        )
    return FaultPlan(kind, rank, when)
