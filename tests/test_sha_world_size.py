"""The optimizer-state sha is the same on 1, 2 and 3 ranks, and is what docs/checkpoints.md defines.

Each world size is one launch (tests/dist_harness.py) of a real tiny ZeRO-2
engine on gloo ranks. After two training steps each launch saves a DeepSpeed
checkpoint and reports the live sha; then it writes one known global state
(a vector generated here, the same for every world size) into its ranks'
partitions — padding set to garbage — and reports the sha of that state and
of copies with one element changed, at the edges of the stream, of its
sections, groups and partitions. A small chunk (997 elements, a prime) makes
most partition edges fall inside chunks, so many chunks straddle two ranks.

The expected values are computed here with hashlib alone, from the definition:
from the known global vectors, and from DeepSpeed's shard files read with
torch.load.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from albor.distributed.optimizer_sha import CHUNK_ELEMENTS
from dist_harness import run_distributed_test

VOCAB = 64
SMALL_CHUNK = 997
ONE_CHUNK = 1 << 30  # more than the whole stream: one chunk, made of every rank's pieces
SEED = 7
HEADER = b"albor-optimizer-state-v2\n"
SECTIONS = ("master", "exp_avg", "exp_avg_sq")
RANK_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


# --- the definition, from scratch -------------------------------------------------------


def stream_bytes(tensors: list[torch.Tensor]) -> bytes:
    """The stream: float32 tensors in stream order, as raw little-endian bytes."""
    return b"".join(t.detach().reshape(-1).numpy().astype("<f4").tobytes() for t in tensors)


def chunk_digests(stream: bytes, chunk: int) -> list[bytes]:
    return [hashlib.sha256(stream[at : at + 4 * chunk]).digest() for at in range(0, len(stream), 4 * chunk)]


def framed(digests: list[bytes], chunk: int, total: int) -> str:
    return hashlib.sha256(HEADER + struct.pack("<QQ", chunk, total) + b"".join(digests)).hexdigest()


def documented_sha(tensors: list[torch.Tensor], chunk: int) -> str:
    """The sha of a stream given as float32 tensors in stream order, as docs/checkpoints.md defines it."""
    stream = stream_bytes(tensors)
    return framed(chunk_digests(stream, chunk), chunk, len(stream) // 4)


def sha_from_shard_files(tag_dir: Path, world_size: int, chunk: int) -> str:
    """The sha rebuilt from DeepSpeed's ZeRO-2 shard files alone (the recipe in docs/checkpoints.md)."""
    osds = [
        torch.load(tag_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", map_location="cpu",
                   weights_only=False)["optimizer_state_dict"]
        for r in range(world_size)
    ]
    sections: dict[str, list[torch.Tensor]] = {key: [] for key in SECTIONS}
    for i in range(len(osds[0]["single_partition_of_fp32_groups"])):
        for osd in osds:  # rank order: the partitions of group i, in its flat order
            assert osd["partition_count"][i] == world_size
            master = osd["single_partition_of_fp32_groups"][i]  # saved without its padding
            base = osd["base_optimizer_state"]
            moments = base["state"][base["param_groups"][i]["params"][0]]  # still padded
            sections["master"].append(master)
            for key in SECTIONS[1:]:
                sections[key].append(moments[key][: master.numel()])
    return documented_sha([t for key in SECTIONS for t in sections[key]], chunk)


def known_state(group_numels: list[int]) -> dict[str, list[torch.Tensor]]:
    """One global state, per section per group, the same whatever the world size."""
    g = torch.Generator().manual_seed(SEED)
    return {key: [torch.randn(n, generator=g).abs_() if key == "exp_avg_sq" else torch.randn(n, generator=g)
                  for n in group_numels] for key in SECTIONS}


def locate(position: int, group_numels: list[int]) -> tuple[str, int, int]:
    """(section, group, element in the group) of a stream position."""
    section, rest = divmod(position, sum(group_numels))
    for i, n in enumerate(group_numels):
        if rest < n:
            return SECTIONS[section], i, rest
        rest -= n
    raise IndexError(position)


# --- the ranks --------------------------------------------------------------------------


def _group_numels(engine) -> list[int]:
    """From the model, as albor groups it for AdamW: matrices, then norms' gains."""
    params = list(engine.module.parameters())
    return [sum(p.numel() for p in params if p.ndim >= 2), sum(p.numel() for p in params if p.ndim < 2)]


def _tensors(optimizer, i: int) -> dict[str, torch.Tensor]:
    """This rank's padded partition of group i: DeepSpeed's master and torch AdamW's moments."""
    flat = optimizer.single_partition_of_fp32_groups[i]
    state = optimizer.optimizer.state[flat]
    return {"master": flat, "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}


def _write(optimizer, rank: int, state: dict[str, list[torch.Tensor]]) -> None:
    """This rank's slice of the global ``state``; garbage in the padding, which the sha must not see."""
    for i in range(len(state["master"])):
        size = optimizer.partition_size[i]
        start = rank * size
        real = size - optimizer.groups_padding[i]
        for key, t in _tensors(optimizer, i).items():
            with torch.no_grad():  # the master partition is a leaf that requires grad
                t[:real] = state[key][i][start : start + real]
                t[real:] = 1e30


def _edges(optimizer, world_size: int, group_numels: list[int]) -> list[int]:
    """Stream positions on either side of every edge: the stream's, sections', groups' and partitions'."""
    per_section = sum(group_numels)
    edges = {0, 3 * per_section}
    for section in range(3):
        base = section * per_section
        for i, n in enumerate(group_numels):
            edges.update(base + min(n, r * optimizer.partition_size[i]) for r in range(world_size + 1))
            base += n
    return sorted({p for e in edges for p in (e - 1, e) if 0 <= p < 3 * per_section})


def _rank(rank: int, world_size: int, out: Path) -> dict:
    from albor.distributed import compat
    from albor.distributed.ds_config import default_ds_config_path, load_ds_config, resolve_ds_config
    from albor.distributed.engine import build_engine
    from albor.distributed.optimizer_sha import optimizer_state_sha
    from albor.distributed.process_group import DistEnv
    from albor.model import AlborLlama, model_preset
    from fakes import loop_config

    from albor.distributed.process_group import init_distributed

    init_distributed()  # adopts the harness's group, as a launched rank does
    env = DistEnv(rank, world_size, rank, torch.device("cpu"))
    config = loop_config(out / f"config-{rank}", batch_size=2, seq_length=8)
    ds = resolve_ds_config(load_ds_config(default_ds_config_path("cpu", world_size)), config,
                           world_size=world_size, device_type="cpu", bf16_supported=False, source="test")
    torch.manual_seed(0)
    engine = build_engine(AlborLlama(model_preset("tiny", vocab_size=VOCAB)), ds, env, lr=1e-3, weight_decay=0.01)
    batches = torch.randint(0, VOCAB, (2, 2, 9), generator=torch.Generator().manual_seed(100 + rank))
    for tokens in batches:
        logits = engine(tokens[:, :-1])
        engine.backward(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)))
        engine.step()
    optimizer = engine.optimizer

    engine.save_checkpoint(str(out / f"ws{world_size}"), tag="t", save_latest=False)
    result: dict = {"trained": {c: optimizer_state_sha(engine, env, chunk=c) for c in (CHUNK_ELEMENTS, SMALL_CHUNK)}}
    result["layouts"] = [tuple(layout) for layout in compat.zero_group_layouts(optimizer)]
    result["padding"] = list(optimizer.groups_padding)

    numels = _group_numels(engine)
    state = known_state(numels)
    _write(optimizer, rank, state)
    result["known"] = {c: optimizer_state_sha(engine, env, chunk=c) for c in (CHUNK_ELEMENTS, SMALL_CHUNK, ONE_CHUNK)}
    result["changed"] = {}
    for position in _edges(optimizer, world_size, numels):
        key, i, element = locate(position, numels)
        size = optimizer.partition_size[i]
        owner, local = divmod(element, size)
        t = _tensors(optimizer, i)[key]
        if owner == rank:
            with torch.no_grad():
                t[local] += 1.0
        result["changed"][position] = optimizer_state_sha(engine, env, chunk=SMALL_CHUNK)
        if owner == rank:
            with torch.no_grad():
                t[local] = state[key][i][element]
    result["restored"] = optimizer_state_sha(engine, env, chunk=SMALL_CHUNK)

    # A moment missing on the last rank only: every rank raises, none waits for the others.
    if rank == world_size - 1:
        optimizer.optimizer.state[optimizer.single_partition_of_fp32_groups[1]].pop("exp_avg")
    try:
        optimizer_state_sha(engine, env)
        result["missing"] = None
    except RuntimeError as e:
        result["missing"] = str(e)
    return result


# --- the tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, tuple[Path, list[dict]]]:
    # The three launches run side by side: most of a rank's time is start-up, not this box's two cores.
    tmps = {world_size: tmp_path_factory.mktemp(f"ws{world_size}") for world_size in (1, 2, 3)}
    with concurrent.futures.ThreadPoolExecutor(len(tmps)) as pool:
        launched = {world_size: pool.submit(run_distributed_test, _rank, world_size, tmp, timeout=180, env=RANK_ENV)
                    for world_size, tmp in tmps.items()}
        return {world_size: (tmps[world_size], future.result()) for world_size, future in launched.items()}


@pytest.fixture(scope="module")
def numels() -> list[int]:
    from albor.model import AlborLlama, model_preset

    params = list(AlborLlama(model_preset("tiny", vocab_size=VOCAB)).parameters())
    return [sum(p.numel() for p in params if p.ndim >= 2), sum(p.numel() for p in params if p.ndim < 2)]


def _all_same(ranks: list[dict], key: str):
    values = [r[key] for r in ranks]
    assert all(v == values[0] for v in values), (key, values)
    return values[0]


def test_the_layouts_cut_each_group_into_equal_partitions_padding_only_at_the_end(runs, numels):
    for world_size, (_, ranks) in runs.items():
        for rank, result in enumerate(ranks):
            for (partition_id, count, size, numel), n in zip(result["layouts"], numels):
                assert (partition_id, count, numel) == (rank, world_size, n)
                assert size == math.ceil(n / (2 * world_size)) * 2  # DeepSpeed aligns a group to 2 x world
    assert runs[3][1][2]["padding"] == [4, 0]  # 745,472 elements over 3 ranks: the last one pads group 0


def test_the_same_state_gives_the_same_sha_on_1_2_and_3_ranks(runs, numels):
    state = known_state(numels)
    stream = [t for key in SECTIONS for t in state[key]]
    for chunk in (CHUNK_ELEMENTS, SMALL_CHUNK, ONE_CHUNK):
        expected = documented_sha(stream, chunk)
        for world_size, (_, ranks) in runs.items():
            assert _all_same(ranks, "known")[chunk] == expected, (world_size, chunk)
    assert documented_sha(stream, SMALL_CHUNK) != documented_sha(stream, CHUNK_ELEMENTS)  # the chunk is framed


def test_one_changed_element_anywhere_changes_the_sha_on_every_world_size(runs, numels):
    state = known_state(numels)
    stream = stream_bytes([t for key in SECTIONS for t in state[key]])
    digests, total = chunk_digests(stream, SMALL_CHUNK), len(stream) // 4
    known = framed(digests, SMALL_CHUNK, total)

    def expected(position: int) -> str:
        """The stream with ``position`` increased by 1 in float32, as the ranks did: only its chunk's digest moves."""
        k = position // SMALL_CHUNK
        changed = bytearray(stream[4 * k * SMALL_CHUNK : 4 * (k + 1) * SMALL_CHUNK])
        at = 4 * (position - k * SMALL_CHUNK)
        (value,) = struct.unpack_from("<f", changed, at)
        struct.pack_into("<f", changed, at, float(np.float32(value) + np.float32(1.0)))
        return framed([*digests[:k], hashlib.sha256(changed).digest(), *digests[k + 1 :]], SMALL_CHUNK, total)

    straddling = 0
    for world_size, (_, ranks) in runs.items():
        changed = _all_same(ranks, "changed")
        assert len(changed) >= 12
        for position, sha in changed.items():
            assert sha == expected(position) != known, (world_size, position)
            straddling += position % SMALL_CHUNK not in (0, SMALL_CHUNK - 1)
        assert _all_same(ranks, "restored") == known
    assert straddling >= 30  # most edges fall inside a chunk, not on its border


def test_the_recipe_in_the_docs_recomputes_it(runs):
    """The Python recipe docs/checkpoints.md gives an outside tool, run as printed."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md").read_text()
    section = docs[docs.index("## The optimizer-state sha"):]
    namespace: dict = {}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), namespace)
    recipe = namespace["albor_optimizer_state_sha"]
    tmp, ranks = runs[2]
    assert recipe(tmp / "ws2" / "t", 2) == _all_same(ranks, "trained")[CHUNK_ELEMENTS]  # its default chunk is albor's
    tmp, ranks = runs[3]
    assert recipe(tmp / "ws3" / "t", 3, chunk=SMALL_CHUNK) == _all_same(ranks, "trained")[SMALL_CHUNK]


def test_a_moment_missing_on_one_rank_raises_on_every_rank_naming_it(runs):
    for world_size, (_, ranks) in runs.items():
        message = _all_same(ranks, "missing")
        assert message is not None and "group 1 has no Adam state 'exp_avg'" in message
        assert message.startswith(f"rank {world_size - 1}: ") == (world_size > 1), message


def test_the_live_sha_is_recomputed_from_deepspeeds_shard_files(runs):
    for world_size in (1, 2, 3):
        tmp, ranks = runs[world_size]
        trained = _all_same(ranks, "trained")
        for chunk in (CHUNK_ELEMENTS, SMALL_CHUNK):
            assert sha_from_shard_files(tmp / f"ws{world_size}" / "t", world_size, chunk) == trained[chunk]
    assert runs[2][1][0]["trained"] != runs[3][1][0]["trained"]  # each world size trained on its own batches
