"""sha256 over the real ZeRO-2 optimizer state: master weights and both Adam moments.

Each rank hashes its own partition, without the alignment padding at its end:
for each param group, the fp32 master weights, then ``exp_avg``, then
``exp_avg_sq``, as raw float32 bytes. The 32-byte digests are gathered in rank
order and hashed once more (docs/checkpoints.md). The result depends on the
world size, so it is recorded with it.
"""

from __future__ import annotations

import hashlib

import torch

from albor.distributed.compat import zero_partitions
from albor.distributed.process_group import DistEnv

_CHUNK = 1 << 24  # elements per host copy when the state lives on a GPU


def _update(h, t: torch.Tensor) -> None:
    t = t.detach()
    if t.device.type == "cpu" and t.is_contiguous():
        h.update(memoryview(t.view(torch.uint8).numpy()))  # in place: no copy
        return
    # hashlib reads host memory only: stream a GPU tensor through bounded chunks.
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        h.update(memoryview(flat[start : start + _CHUNK].cpu().view(torch.uint8).numpy()))


def partition_digest(zero_optimizer) -> bytes:
    """Digest of this rank's partition of a DeepSpeedZeroOptimizer (stage 1 or 2).

    Taken only after optimizer steps (at epoch ends): a missing Adam moment
    means the state is not laid out as this hash assumes, so it raises rather
    than hash less than it claims to.
    """
    h = hashlib.sha256()
    for i, part in enumerate(zero_partitions(zero_optimizer)):
        _update(h, part.master)
        for key, moment in (("exp_avg", part.exp_avg), ("exp_avg_sq", part.exp_avg_sq)):
            if moment is None:
                raise RuntimeError(
                    f"optimizer-state sha: ZeRO param group {i} has no Adam state '{key}' after a step;"
                    " the sha would not cover it (a bug in albor, or an optimizer other than Adam/AdamW)"
                )
            _update(h, moment)
    return h.digest()


def optimizer_state_sha(engine, env: DistEnv) -> str:
    """The run-wide sha: every rank must call this (it gathers)."""
    return env.combined_digest(partition_digest(engine.optimizer))
