"""sha256 over the real ZeRO-2 optimizer state: master weights and both Adam moments.

Each rank hashes its own partition, without the alignment padding at its
end; the 32-byte digests are gathered in rank order and hashed once more
(DESIGN §2). The result depends on the world size, so it is recorded with it.
"""

from __future__ import annotations

import hashlib

import torch

from albor.distributed.process_group import DistEnv

_CHUNK = 1 << 24  # elements per host copy when the state lives on a GPU


def _update(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach()
    if t.device.type == "cpu" and t.is_contiguous():
        h.update(memoryview(t.view(torch.uint8).numpy()))  # in place: no copy
        return
    # hashlib reads host memory only: stream a GPU tensor through bounded chunks.
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        h.update(memoryview(flat[start : start + _CHUNK].cpu().view(torch.uint8).numpy()))


def partition_digest(zero_optimizer) -> bytes:
    """Digest of this rank's partition of a DeepSpeedZeroOptimizer (stage 1 or 2)."""
    h = hashlib.sha256()
    for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        real = zero_optimizer.partition_size[i] - zero_optimizer.groups_padding[i]
        state = zero_optimizer.optimizer.state.get(flat, {})
        _update(h, flat[:real])
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                _update(h, state[key][:real])
    return h.digest()


def optimizer_state_sha(engine, env: DistEnv) -> str:
    """The run-wide sha: every rank must call this (it gathers)."""
    return env.combined_digest(partition_digest(engine.optimizer))
