"""The optimizer-state sha on a real one-rank DeepSpeed ZeRO-2 engine: what it covers, recomputed independently.

One rank in this process (albor's dev mode: a gloo group on a HashStore), the
tiny model with a 64-token vocabulary, two AdamW steps. The expected sha is
computed with hashlib alone, as docs/checkpoints.md defines it: the unpadded
fp32 masters of every param group, then every group's exp_avg, then every
group's exp_avg_sq (raw little-endian float32), cut into chunks, sha256 over
a header and the chunks' digests (``documented_sha``). Other world sizes are
tests/test_sha_world_size.py's.
"""

from __future__ import annotations

import pytest
import torch

from albor.distributed.optimizer_sha import CHUNK_ELEMENTS, optimizer_state_sha
from test_sha_world_size import documented_sha, sha_from_shard_files
from tests.dev_engine import dev_mode_engine

VOCAB = 64
CHUNKS = (CHUNK_ELEMENTS, 997)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(engine, env) after two steps of a tiny ZeRO-2 engine built as albor builds it."""
    with dev_mode_engine(tmp_path_factory.mktemp("data"), steps=2, vocab=VOCAB) as pair:
        yield pair


def _live_stream(optimizer) -> list[torch.Tensor]:
    """From the engine's live state: ZeRO's fp32 partitions and torch AdamW's state, unpadded, in stream order."""
    sections = {"master": [], "exp_avg": [], "exp_avg_sq": []}
    for i, flat in enumerate(optimizer.single_partition_of_fp32_groups):
        real = optimizer.partition_size[i] - optimizer.groups_padding[i]
        state = optimizer.optimizer.state[flat]
        sections["master"].append(flat[:real])
        for key in ("exp_avg", "exp_avg_sq"):
            sections[key].append(state[key][:real])
    return [t for parts in sections.values() for t in parts]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_sha_is_the_documented_hash_of_masters_and_both_moments(trained, chunk):
    engine, env = trained
    stream = _live_stream(engine.optimizer)
    assert len(stream) == 6 and all(p.dtype == torch.float32 and p.numel() > 0 for p in stream)
    assert optimizer_state_sha(engine, env, chunk=chunk) == documented_sha(stream, chunk)
    assert optimizer_state_sha(engine, env, chunk=chunk) != documented_sha(stream[:2], chunk)  # not the masters alone
    assert optimizer_state_sha(engine, env) == optimizer_state_sha(engine, env, chunk=CHUNK_ELEMENTS)


def test_sha_matches_the_shard_deepspeed_saved(trained, tmp_path):
    """From the file a user keeps: zero_pp_rank_0_mp_rank_00_optim_states.pt, loaded with torch."""
    engine, env = trained
    engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    for chunk in CHUNKS:
        assert optimizer_state_sha(engine, env, chunk=chunk) == sha_from_shard_files(tmp_path / "t", 1, chunk)


def test_state_off_the_cpu_is_hashed_through_host_copies_to_the_same_sha(trained, monkeypatch):
    """A GPU's state reaches hashlib through bounded host copies; forced here on the CPU, with small blocks."""
    from albor.distributed import optimizer_sha

    engine, env = trained
    in_place = {chunk: optimizer_state_sha(engine, env, chunk=chunk) for chunk in CHUNKS}
    copies = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(optimizer_sha.sys, "byteorder", "not little")  # the in-place path's precondition
    monkeypatch.setattr(optimizer_sha, "_HOST_BLOCK", 5000)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t: copies.append(t.numel()) or real_cpu(t))
    for chunk in CHUNKS:
        copies.clear()
        assert optimizer_state_sha(engine, env, chunk=chunk) == in_place[chunk]
        assert copies and max(copies) <= max(chunk, 5000) and sum(copies) == 3 * sum(
            p.numel() for p in engine.module.parameters())


@pytest.mark.parametrize("key", ["master", "exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("group", [0, 1])
@pytest.mark.parametrize("at", ["first", "last"])
def test_one_changed_element_changes_the_sha(trained, key, group, at):
    engine, env = trained
    optimizer = engine.optimizer
    flat = optimizer.single_partition_of_fp32_groups[group]
    tensor = flat if key == "master" else optimizer.optimizer.state[flat][key]
    index = 0 if at == "first" else optimizer.partition_size[group] - optimizer.groups_padding[group] - 1
    before = optimizer_state_sha(engine, env, chunk=997)
    kept = tensor[index].item()
    with torch.no_grad():  # the master partition is a leaf that requires grad
        tensor[index] = kept + 1.0
    try:
        assert optimizer_state_sha(engine, env, chunk=997) != before
    finally:
        with torch.no_grad():
            tensor[index] = kept
    assert optimizer_state_sha(engine, env, chunk=997) == before


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_a_missing_moment_raises_naming_group_and_key(trained, key):
    engine, env = trained
    optimizer = engine.optimizer
    state = optimizer.optimizer.state[optimizer.single_partition_of_fp32_groups[1]]
    kept = state.pop(key)
    try:
        with pytest.raises(RuntimeError, match=rf"group 1 has no Adam state '{key}'"):
            optimizer_state_sha(engine, env)
    finally:
        state[key] = kept


def test_a_group_out_of_parameter_order_is_refused(trained, monkeypatch):
    """DeepSpeed's round_robin_gradients orders a group by world size: no world-size-free sha of that."""
    engine, env = trained
    optimizer = engine.optimizer
    monkeypatch.setattr(optimizer, "round_robin_bit16_indices",
                        [list(reversed(indices)) for indices in optimizer.round_robin_bit16_indices])
    with pytest.raises(RuntimeError, match="optimizer-state sha: ZeRO param group 0 .*round_robin_gradients"):
        optimizer_state_sha(engine, env)
