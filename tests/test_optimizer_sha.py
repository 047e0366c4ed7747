"""The optimizer-state sha on a real DeepSpeed ZeRO-2 engine: what it covers, recomputed independently.

One rank in this process (albor's dev mode: a gloo group on a HashStore), the
tiny model with a 64-token vocabulary, two AdamW steps. The expected sha is
computed here from DeepSpeed's and torch's own state, as docs/checkpoints.md
defines it, without albor's helpers: per param group the unpadded fp32 master
partition, then exp_avg, then exp_avg_sq (raw little-endian float32), then
sha256 over the ranks' 32-byte digests in rank order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pytest
import torch

from albor.distributed.optimizer_sha import optimizer_state_sha
from tests.dev_engine import dev_mode_engine

VOCAB = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(engine, env) after two steps of a tiny ZeRO-2 engine built as albor builds it."""
    with dev_mode_engine(tmp_path_factory.mktemp("data"), steps=2, vocab=VOCAB) as pair:
        yield pair


def _sha(rank_parts: Iterable[Iterable[torch.Tensor]]) -> str:
    """The documented definition, over each rank's tensors in hashing order."""
    digests = []
    for parts in rank_parts:
        h = hashlib.sha256()
        for t in parts:
            h.update(t.detach().contiguous().numpy().astype("<f4", copy=False).tobytes())
        digests.append(h.digest())
    return hashlib.sha256(b"".join(digests)).hexdigest()


def _live_parts(optimizer) -> list[torch.Tensor]:
    """From the engine's live state: ZeRO's fp32 partitions and torch AdamW's state, unpadded."""
    parts = []
    for i, flat in enumerate(optimizer.single_partition_of_fp32_groups):
        real = optimizer.partition_size[i] - optimizer.groups_padding[i]
        state = optimizer.optimizer.state[flat]
        parts += [flat[:real], state["exp_avg"][:real], state["exp_avg_sq"][:real]]
    return parts


def test_sha_is_the_documented_hash_of_masters_and_both_moments(trained):
    engine, env = trained
    parts = _live_parts(engine.optimizer)
    assert len(parts) == 6 and all(p.dtype == torch.float32 and p.numel() > 0 for p in parts)
    assert optimizer_state_sha(engine, env) == _sha([parts])
    assert optimizer_state_sha(engine, env) != _sha([parts[0::3]])  # not the masters alone


def test_sha_matches_the_shard_deepspeed_saved(trained, tmp_path):
    """From the file a user keeps: zero_pp_rank_0_mp_rank_00_optim_states.pt, loaded with torch."""
    engine, env = trained
    engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    shard = torch.load(tmp_path / "t" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False)["optimizer_state_dict"]
    base = shard["base_optimizer_state"]  # the inner torch optimizer's state_dict(), still padded
    parts = []
    for i, master in enumerate(shard["single_partition_of_fp32_groups"]):  # saved without the padding
        moments = base["state"][base["param_groups"][i]["params"][0]]
        parts += [master, moments["exp_avg"][: master.numel()], moments["exp_avg_sq"][: master.numel()]]
    assert optimizer_state_sha(engine, env) == _sha([parts])


@pytest.mark.parametrize("key", ["master", "exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("group", [0, 1])
def test_one_changed_element_changes_the_sha(trained, key, group):
    engine, env = trained
    optimizer = engine.optimizer
    flat = optimizer.single_partition_of_fp32_groups[group]
    tensor = flat if key == "master" else optimizer.optimizer.state[flat][key]
    last = optimizer.partition_size[group] - optimizer.groups_padding[group] - 1
    before = optimizer_state_sha(engine, env)
    kept = tensor[last].item()
    with torch.no_grad():  # the master partition is a leaf that requires grad
        tensor[last] = kept + 1.0
    try:
        assert optimizer_state_sha(engine, env) != before
    finally:
        with torch.no_grad():
            tensor[last] = kept
    assert optimizer_state_sha(engine, env) == before


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
