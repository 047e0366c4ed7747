"""sha256 over the whole ZeRO-2 optimizer state, the same whatever the world size (v2).

The hashed stream is the global state without padding, as raw little-endian
float32: every param group's fp32 master weights (groups in order, each in its
flat order, which is its parameters' order), then every group's ``exp_avg``,
then every group's ``exp_avg_sq``. It is cut into chunks of ``chunk`` elements
(the last may be short); the sha is sha256 over a header and the chunks'
sha256 digests in chunk order (docs/checkpoints.md gives it byte for byte).

A rank owns, for each group and each of the three sections, one contiguous
range of the stream: its ZeRO partition. It hashes in place every chunk that
lies inside one of its ranges; a chunk that straddles two ranges (of two ranks,
or of two groups or sections) is sent to rank 0 in pieces, at most two per
range, where it is assembled and hashed. Rank 0 then orders the digests and
broadcasts the sha. So the cost is one pass over each rank's own state plus a
few chunks of traffic, and the result does not depend on how the state is cut.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections import defaultdict
from typing import NamedTuple

import torch
import torch.distributed as dist

from albor.distributed.compat import zero_group_layouts, zero_partitions
from albor.distributed.process_group import DistEnv

#: Elements per chunk (256 KiB of float32). Each rank sends rank 0 at most two partial chunks per
#: range (3 MiB for albor's two groups) and 32 bytes per whole chunk (about 0.5 MB for albor-370m in all);
#: on the tiny model 2^16 hashed 2 ranks' state in half the time 2^18 took (less of it travels).
CHUNK_ELEMENTS = 1 << 16
HEADER = b"albor-optimizer-state-v2\n"
_SECTIONS = ("master", "exp_avg", "exp_avg_sq")
_HOST_BLOCK = 1 << 24  # elements per host copy when the state lives on a GPU


class OptimizerShaError(RuntimeError):
    """The state is not what the sha covers; raised on every rank together."""


class _Range(NamedTuple):
    """One of this rank's partitions of one section of one group, and where it lies in the stream."""

    tensor: torch.Tensor  # 1-D float32, exactly the partition's real elements
    offset: int  # its first element's position in the stream


class _Local(NamedTuple):
    """What a rank sends to rank 0."""

    total: int  # elements in the stream, as this rank sees it
    digests: dict[int, bytes]  # chunk index -> sha256 of a chunk wholly inside one of this rank's ranges
    pieces: list[tuple[int, int, bytes]]  # (chunk index, element offset in the chunk, bytes) of straddling chunks


def _ranges(zero_optimizer, env: DistEnv) -> tuple[list[_Range], int]:
    """This rank's ranges of the stream, and the stream's length in elements."""
    parts = zero_partitions(zero_optimizer)
    try:
        layouts = zero_group_layouts(zero_optimizer)
    except RuntimeError as e:  # a group out of parameter order: its stream would depend on the world size
        raise OptimizerShaError(f"optimizer-state sha: {e}") from e
    group_base, per_section = [], 0
    for i, (part, layout) in enumerate(zip(parts, layouts)):
        if (layout.partition_id, layout.partition_count) != (env.rank, env.world_size):
            raise OptimizerShaError(
                f"optimizer-state sha: ZeRO param group {i} is partitioned as rank {layout.partition_id} of"
                f" {layout.partition_count}, not over the whole job (rank {env.rank} of {env.world_size})"
            )
        real = max(0, min(layout.partition_size, layout.numel - layout.start))
        if part.master.numel() != real:  # only the tail of the group may be padding
            raise OptimizerShaError(
                f"optimizer-state sha: ZeRO param group {i} holds {part.master.numel()} real elements on rank"
                f" {env.rank}, its layout says {real}"
            )
        group_base.append(per_section)
        per_section += layout.numel
    ranges = []
    for section, key in enumerate(_SECTIONS):
        for i, (part, layout) in enumerate(zip(parts, layouts)):
            t = getattr(part, key)
            if t is None:
                raise OptimizerShaError(
                    f"optimizer-state sha: ZeRO param group {i} has no Adam state '{key}' after a step;"
                    " the sha would not cover it (a bug in albor, or an optimizer other than Adam/AdamW)"
                )
            if t.dtype != torch.float32:
                raise OptimizerShaError(f"optimizer-state sha: ZeRO param group {i}'s {key} is {t.dtype}, not float32")
            if t.numel():
                ranges.append(_Range(t.detach().reshape(-1), section * per_section + group_base[i] + layout.start))
    return ranges, 3 * per_section


class _HostBytes:
    """A range's elements as little-endian bytes in host memory, read in increasing order.

    A contiguous CPU tensor is read in place (no copy); one elsewhere (a GPU) is
    copied through blocks of at most ``block`` elements (a multiple of the
    chunk) that end on chunk boundaries, so each element is copied once:
    hashlib reads host memory only.
    """

    def __init__(self, r: _Range, chunk: int, block: int) -> None:
        self._r, self._chunk, self._block = r, chunk, block
        t = r.tensor
        self._lo, self._hi, self._mv = 0, 0, memoryview(b"")
        if t.device.type == "cpu" and t.is_contiguous() and sys.byteorder == "little":
            self._hi, self._mv = t.numel(), memoryview(t.view(torch.uint8).numpy())

    def get(self, lo: int, hi: int) -> memoryview:
        """Bytes of elements ``[lo, hi)`` of the range (at most one chunk, after those asked before)."""
        if not (self._lo <= lo and hi <= self._hi):
            offset = self._r.offset
            aligned_end = (offset + lo + self._block) // self._chunk * self._chunk - offset
            self._lo, self._hi = lo, min(self._r.tensor.numel(), max(hi, aligned_end))
            host = self._r.tensor[self._lo : self._hi].cpu().numpy().astype("<f4", copy=False)
            self._mv = memoryview(host.view("u1"))
        return self._mv[(lo - self._lo) * 4 : (hi - self._lo) * 4]


def _hash_local(zero_optimizer, env: DistEnv, chunk: int) -> _Local:
    ranges, total = _ranges(zero_optimizer, env)
    digests: dict[int, bytes] = {}
    pieces: list[tuple[int, int, bytes]] = []
    for r in ranges:
        host = _HostBytes(r, chunk, max(chunk, _HOST_BLOCK // chunk * chunk))
        end = r.offset + r.tensor.numel()
        pos = r.offset
        while pos < end:
            k = pos // chunk
            chunk_start, chunk_end = k * chunk, min((k + 1) * chunk, total)
            stop = min(chunk_end, end)
            data = host.get(pos - r.offset, stop - r.offset)
            if pos == chunk_start and stop == chunk_end:
                digests[k] = hashlib.sha256(data).digest()
            else:
                pieces.append((k, pos - chunk_start, bytes(data)))
            pos = stop
    return _Local(total, digests, pieces)


def _combine(locals_: list[_Local], chunk: int) -> str:
    """The sha from every rank's digests and pieces (rank 0's part); raises if they do not tile the stream."""
    totals = {local.total for local in locals_}
    if len(totals) != 1:
        raise OptimizerShaError(f"optimizer-state sha: the ranks disagree on the state's size: {sorted(totals)}")
    total = totals.pop()
    count = -(-total // chunk)
    digests: dict[int, bytes] = {}
    pieces: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
    for local in locals_:
        for k, digest in local.digests.items():
            if k in digests:
                raise OptimizerShaError(f"optimizer-state sha: chunk {k} hashed twice")
            digests[k] = digest
        for k, at, data in local.pieces:
            pieces[k].append((at, data))
    for k, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        at = 0
        for start, data in parts:
            if start != at:
                raise OptimizerShaError(f"optimizer-state sha: chunk {k}'s pieces leave a gap or overlap at {start}")
            at += len(data) // 4
        if k in digests or at != min((k + 1) * chunk, total) - k * chunk:
            raise OptimizerShaError(f"optimizer-state sha: chunk {k}'s pieces do not make the chunk")
        digests[k] = hashlib.sha256(b"".join(data for _, data in parts)).digest()
    if sorted(digests) != list(range(count)):
        raise OptimizerShaError(f"optimizer-state sha: {count - len(digests)} of {count} chunks were not hashed")
    h = hashlib.sha256(HEADER + struct.pack("<QQ", chunk, total))
    for k in range(count):
        h.update(digests[k])
    return h.hexdigest()


def optimizer_state_sha(engine, env: DistEnv, *, chunk: int = CHUNK_ELEMENTS) -> str:
    """The run-wide sha of ``engine``'s ZeRO-2 optimizer state; every rank must call it and gets the same.

    Taken only after optimizer steps: a missing Adam moment means the state is
    not laid out as this hash assumes, so it raises (on every rank, after the
    exchange, so no rank is left waiting) rather than hash less than it claims.
    ``chunk`` is the documented chunk size unless a test picks a smaller one.
    """
    if chunk < 1:
        raise ValueError(f"optimizer-state sha: chunk must be at least 1 element, got {chunk}")
    try:
        local: _Local | str = _hash_local(engine.optimizer, env, chunk)
    except OptimizerShaError as e:
        local = str(e)
    gathered = _gather_to_main(local, env)
    outcome: tuple[str, str] = ("", "")
    if env.is_main:
        errors = [f"rank {r}: {x}" if env.world_size > 1 else x for r, x in enumerate(gathered) if isinstance(x, str)]
        try:
            outcome = ("error", errors[0]) if errors else ("ok", _combine(gathered, chunk))
        except OptimizerShaError as e:
            outcome = ("error", str(e))
    kind, value = _broadcast_from_main(outcome, env)
    if kind != "ok":
        raise OptimizerShaError(value)
    return value


# Object collectives on the default group (every rank is one data-parallel partition, checked above).


def _gather_to_main(obj, env: DistEnv) -> list:
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def _broadcast_from_main(obj, env: DistEnv):
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
