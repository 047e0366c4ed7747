"""How every rank learns, at the same step, that a rank found the run's data bad.

One rank per node (local rank 0: each node may hold its own copy of the
dataset) verifies the dataset in full in the background
(albor.data.verify.BackgroundVerification). Two ways its verdict reaches the
other ranks, both collective, so every rank ends at the same point with exit 3:

* every step, in the step's fused all-reduce: a rank whose verification found
  a bad shard (or whose batch held an id the model cannot embed) sets the
  ``DATA_BAD`` flag and writes the shard's position in index.json (+1, 0 when
  unknown) into its ``DATA_SHARD`` slot (albor.distributed.step);
* before the first checkpoint (the end of the first epoch, or a preemption
  save), :meth:`DataVerdict.settle`: the verifying ranks wait for their
  verification to finish and every rank votes, so no checkpoint is ever
  written on data that was not verified (docs/data-verification.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence

from albor.data.shards import REGENERATE
from albor.data.verify import BackgroundVerification, ShardProblem
from albor.loop import DataFault

log = logging.getLogger("albor")


def describe_data_fault(found: Mapping[int, int], shard_names: Sequence[str]) -> DataFault | None:
    """The words every rank uses for ``found`` = {rank: shard position + 1, or 0 when unknown}; None if empty."""
    if not found:
        return None
    ranks = tuple(sorted(found))
    positions = sorted({p - 1 for p in found.values() if 0 < p <= len(shard_names)})
    who = ", ".join(map(str, ranks))
    if positions:
        shards = ", ".join(shard_names[p] for p in positions)
        what = f"shard {shards} failed verification on rank(s) {who} (that rank's log gives the expected and actual sha256)"
    else:
        what = f"rank(s) {who} found the dataset bad (that rank's log says which shard and why)"
    return DataFault(f"{what}; restore the shard from a good copy or {REGENERATE}, and check it with "
                     "`albor verify-data DIR`", ranks)


class DataVerdict:
    """This rank's part in the run's data verification: its own verification (or None) and the vote."""

    def __init__(
        self, verification: BackgroundVerification | None, *, rank: int, shard_names: Sequence[str],
        per_rank: Callable[[float], list[float]],
        slow_phase: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.verification = verification  # None on ranks that do not verify
        self.rank = rank
        self.shard_names = tuple(shard_names)
        self._per_rank = per_rank  # DistEnv.per_rank: every rank's value, known to every rank
        # DistEnv.startup_timeout: the ranks that do not verify wait in the vote for those that do,
        # longer than a step's timeout allows.
        self._slow_phase = slow_phase
        self._settled = False
        self._reported: ShardProblem | None = None

    def local_problem(self) -> ShardProblem | None:
        """What this rank's verification found, once it has finished (never blocks); logged once, here."""
        problem = self.verification.problem if self.verification is not None else None
        if problem is not None and self._reported is None:
            self._reported = problem
            log.error("rank %d: dataset verification failed: %s", self.rank, problem.message)
        return problem

    def note(self, message: str) -> None:
        """A batch on this rank held an id the model cannot embed: its words, if the verification has none yet."""
        if self._reported is None:
            self._reported = ShardProblem(-1, "", message)

    def slot(self, problem: ShardProblem | None) -> int:
        """The DATA_SHARD slot value for ``problem``: its position in index.json + 1, 0 when unknown."""
        return problem.position + 1 if problem is not None and problem.position >= 0 else 0

    def in_own_words(self, fault: DataFault) -> DataFault:
        """On a rank that found the problem itself: its own line (the shard, expected and actual sha256)."""
        mine = self._reported
        if mine is None or self.rank not in fault.ranks:
            return fault
        others = [r for r in fault.ranks if r != self.rank]
        also = f"; rank(s) {', '.join(map(str, others))} found it too" if others else ""
        return DataFault(f"{mine.message} (found by rank {self.rank}'s verification{also})", fault.ranks)

    def settle(self) -> DataFault | None:
        """Wait for this rank's verification, then vote: the same verdict on every rank (a collective).

        Every rank calls it at the same point (the loop: after the first epoch's last step, or
        before a preemption save). Once passed, later calls return None without a collective.
        """
        if self._settled:
            return None
        problem = None
        with self._slow_phase():
            if self.verification is not None:
                if not self.verification.done:
                    log.info("dataset: waiting for the background verification to finish before the first checkpoint")
                self.verification.wait()
                problem = self.local_problem()
            mine = -1 if problem is None else self.slot(problem)  # -1: good; 0: bad, shard unknown; p + 1: bad shard p
            found = {r: int(v) for r, v in enumerate(self._per_rank(float(mine))) if v >= 0}
        fault = describe_data_fault(found, self.shard_names)
        if fault is None:
            self._settled = True
            return None
        return self.in_own_words(fault)
