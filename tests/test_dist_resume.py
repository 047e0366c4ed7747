"""Resume (albor.distributed.resume) on real ZeRO-2 engines of the tiny model, CPU and gloo.

One 2-rank launch (tests/dist_harness.py): train K steps, save a preemption
checkpoint, train M more. Then, in the same ranks, a fresh engine with another
init seed and scrambled RNGs restores it and trains the same M steps; then
damaged copies of the checkpoint are refused. One 1-rank launch then resumes
the same checkpoint on one rank through DeepSpeed's universal format, with the
micro-batch doubled so the global batch stays. The ranks report; the
assertions happen here.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from dist_harness import run_distributed_test

WORLD = 2
VOCAB, MICRO, SEQ = 64, 2, 16
SEED = 1234
K, M = 2, 2  # steps before the checkpoint, steps after it
TAG = f"step-{K:07d}"
RANK_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
#: Damaged copies of the checkpoint, each resumed on both ranks; the damage is done by rank 0.
DAMAGE = ("rank1_file_corrupt", "rank0_file_missing", "rank1_shard_missing", "rank1_shard_truncated")


def _lr(step: int) -> float:
    return 1e-3 * (1 + 0.1 * step)


def _build(rank: int, world_size: int, tmp: Path, *, micro: int, init_seed: int, universal: bool = False):
    """Engine, loader and step of a tiny run, built the way albor.run_setup builds them."""
    import numpy as np
    import torch

    from albor.data.loader import Split, TrainLoader
    from albor.distributed.ds_config import default_ds_config_path, load_ds_config, resolve_ds_config
    from albor.distributed.engine import build_engine
    from albor.distributed.process_group import DistEnv
    from albor.distributed.step import DeepSpeedStep
    from albor.model import AlborLlama, model_preset
    from fakes import loop_config

    from albor.distributed.process_group import init_distributed

    init_distributed()  # adopts the harness's group, as a launched rank does
    env = DistEnv(rank, world_size, rank, torch.device("cpu"))
    config = loop_config(tmp / f"config-{rank}-{world_size}", batch_size=micro, seq_length=SEQ, seed=SEED)
    ds = resolve_ds_config(
        load_ds_config(default_ds_config_path("cpu", world_size)), config, world_size=world_size,
        device_type="cpu", bf16_supported=False, source="zero2-cpu-fp32.json",
    )
    if universal:
        ds["checkpoint"] = {"load_universal": True}
    tokens = np.random.default_rng(7).integers(0, VOCAB, 24 * (SEQ + 1) * MICRO * WORLD).astype(np.uint16)
    split = Split("train", (tokens,), "f" * 64, np.array([0, tokens.shape[0]], dtype=np.int64))
    loader = TrainLoader(split, micro_batch=micro, seq_length=SEQ, rank=rank, world_size=world_size, seed=SEED)
    model_cfg = model_preset("tiny", vocab_size=VOCAB)
    torch.manual_seed(init_seed)
    engine = build_engine(AlborLlama(model_cfg), ds, env, lr=1e-3, weight_decay=0.01)
    step = DeepSpeedStep(engine, loader, env, grad_accumulation=1, gpu=_NoGpu())
    return env, engine, loader, model_cfg, step


class _NoGpu:
    def read(self) -> float:
        return 0.0


def _train(step, first: int, count: int) -> list[tuple[float, float]]:
    out = []
    for s in range(first, first + count):
        r = step(s, _lr(s))
        out.append((r.train_loss, r.grad_norm))
    return out


def _draws() -> tuple:
    """What each RNG albor restores would draw next; the RNGs are left as they were."""
    import random

    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    drawn = random.random(), float(np.random.rand()), torch.rand(2).tolist()
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])
    return drawn


def _scramble_rngs(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _partition_state(engine) -> list[dict]:
    """This rank's ZeRO state, group by group: fp32 master partition, Adam's moments and step, copied."""
    opt = engine.optimizer
    out = []
    for flat in opt.single_partition_of_fp32_groups:
        st = opt.optimizer.state[flat]
        moments = {k: st[k].detach().clone() for k in ("exp_avg", "exp_avg_sq", "step")}
        out.append({"master": flat.detach().clone(), **moments})
    return out


def _full_state(engine) -> dict:
    """Every parameter's fp32 master and Adam moments, whole, by name, and each group's step (every rank)."""
    import torch
    import torch.distributed as dist

    from albor.distributed.compat import zero_master_groups, zero_partitions

    names = {id(p): n for n, p in engine.module.named_parameters()}
    world = dist.get_world_size()
    out = {}
    for i, (group, part) in enumerate(zip(zero_master_groups(engine.optimizer), zero_partitions(engine.optimizer))):
        for key, local in (("fp32", part.master), ("exp_avg", part.exp_avg), ("exp_avg_sq", part.exp_avg_sq)):
            pieces = [None] * world
            dist.all_gather_object(pieces, local.detach().clone())  # unpadded: only the group's end is padding
            whole = torch.cat(pieces)
            for p, offset in group.params:
                out[f"{names[id(p)]}/{key}"] = whole[offset:offset + p.numel()].view(p.shape).clone()
        out[f"group{i}/step"] = engine.optimizer.optimizer.state[group.partition]["step"].clone()
    return out


def _two_ranks(rank: int, world_size: int, tmp: Path) -> dict:
    import os
    import time

    import torch
    import torch.distributed as dist

    from albor.contract import CheckpointPoint
    from albor.distributed.checkpoint import Checkpointer, fp32_master_state_dict
    from albor.distributed.resume import load_fp32_masters, restore

    run_dir = tmp / "run"
    ds_dir = run_dir / "ckpt" / "deepspeed"
    out: dict = {}
    env, engine, loader, model_cfg, step = _build(rank, world_size, tmp, micro=MICRO, init_seed=SEED)
    out["before"] = _train(step, 0, K)
    _scramble_rngs(100 + rank)  # ranks' RNGs differ: restoring another rank's would show
    writer = Checkpointer(engine, env, model_cfg, loader, run_dir, seed=SEED)
    point = CheckpointPoint.for_preemption(run_dir, step=K, epoch=0)
    started = time.perf_counter()
    writer.save(point, {"world_size": world_size})
    out["save_s"] = time.perf_counter() - started
    out["draws_at_save"] = _draws()
    out["state_at_save"] = _partition_state(engine)
    out["full_at_save"] = _full_state(engine)
    weights_at_save = fp32_master_state_dict(engine, env)  # rank 0's; None elsewhere
    out["cursor_at_save"] = loader.state_dict()
    out["uninterrupted"] = _train(step, K, M)
    out["state_uninterrupted"] = _partition_state(engine)

    # A fresh run: another init seed, other RNGs, a loader at the start of the data.
    env, engine, loader, model_cfg, step = _build(rank, world_size, tmp, micro=MICRO, init_seed=SEED + 1)
    _scramble_rngs(200 + rank)
    assert loader.state_dict() != out["cursor_at_save"]
    started = time.perf_counter()
    restore(engine, env, ds_dir, TAG, saved_world_size=world_size, loader=loader)
    out["restore_s"] = time.perf_counter() - started
    out["draws_at_restore"] = _draws()
    out["state_at_restore"] = _partition_state(engine)
    out["cursor_at_restore"] = loader.state_dict()
    out["resumed"] = _train(step, K, M)
    out["state_resumed"] = _partition_state(engine)
    if rank == 0:
        out["bytes"] = {p.name: p.stat().st_size for p in (ds_dir / TAG).iterdir()}

    # --init-from: a fresh engine starts from the fp32 weights of the first, which every rank holds whole.
    holder = [weights_at_save]
    dist.broadcast_object_list(holder, src=0)
    weights = holder[0]
    _, engine_init, _, _, _ = _build(rank, world_size, tmp, micro=MICRO, init_seed=SEED + 3)
    try:
        load_fp32_masters(engine_init, env, {**weights, "model.extra.weight": weights["model.norm.weight"]})
        out["init_from_unknown_name"] = ("ok",)
    except Exception as e:
        out["init_from_unknown_name"] = (type(e).__name__, str(e))
    load_fp32_masters(engine_init, env, weights)
    again = fp32_master_state_dict(engine_init, env)
    if rank == 0:
        out["init_from_masters_differ"] = [n for n in weights if not torch.equal(again[n], weights[n])]
    module = dict(engine_init.module.named_parameters())
    out["init_from_module_differs"] = [n for n in weights if not torch.equal(module[n].detach(), weights[n])]

    # Damaged copies: every rank must refuse together, with the same exit code.
    for damage in DAMAGE:
        copy = tmp / damage / "deepspeed"
        if rank == 0:
            shutil.copytree(ds_dir / TAG, copy / TAG)
            target = copy / TAG
            if damage == "rank1_file_corrupt":
                text = (target / "albor-rank-1.json").read_text()
                (target / "albor-rank-1.json").write_text(text[: len(text) // 2])
            elif damage == "rank0_file_missing":
                os.remove(target / "albor-rank-0.json")
            elif damage == "rank1_shard_missing":
                os.remove(target / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
            else:  # found only by DeepSpeed's own load, on rank 1 alone: the last scenario (half-loads the engine)
                shard = target / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
                shard.write_bytes(shard.read_bytes()[:1000])
        dist.barrier()
        try:
            restore(engine, env, copy, TAG, saved_world_size=world_size, loader=loader)
            out[damage] = ("ok",)
        except Exception as e:
            out[damage] = ("raised", type(e).__name__, int(getattr(e, "exit_code", -1)), str(e))
    return out


def _one_rank(rank: int, world_size: int, tmp: Path, ds_dir: Path) -> dict:
    import time

    from albor.distributed.resume import needs_universal, restore

    assert needs_universal(WORLD, world_size)
    # The global batch stays: twice the micro-batch on half the ranks.
    env, engine, loader, _, step = _build(rank, world_size, tmp, micro=MICRO * WORLD // world_size,
                                          init_seed=SEED + 2, universal=True)
    started = time.perf_counter()
    restore(engine, env, ds_dir, TAG, saved_world_size=WORLD, loader=loader)
    out = {"restore_s": time.perf_counter() - started, "full_at_restore": _full_state(engine)}
    out["cursor_at_restore"] = loader.state_dict()
    out["resumed"] = _train(step, K, M)
    started = time.perf_counter()
    restore(engine, env, ds_dir, TAG, saved_world_size=WORLD, loader=loader)  # the conversion is there: reused
    out["second_restore_s"] = time.perf_counter() - started
    out["universal_files"] = sorted(str(p.relative_to(ds_dir)) for p in ds_dir.iterdir())
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("dist-resume")
    return tmp, run_distributed_test(_two_ranks, WORLD, tmp, timeout=240, env=RANK_ENV)


@pytest.fixture(scope="module")
def one(two) -> dict:
    tmp, _ = two
    ds_dir = tmp / "run" / "ckpt" / "deepspeed"
    return run_distributed_test(_one_rank, 1, tmp, ds_dir, timeout=240, env=RANK_ENV)[0]


def _assert_states_equal(a: list[dict], b: list[dict]) -> None:
    import torch

    assert len(a) == len(b) == 2
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"group {i} {key} differs"


def test_a_resumed_run_continues_bit_for_bit(two):
    _, ranks = two
    sizes = ranks[0]["bytes"]
    print(f"\n2-rank save {max(r['save_s'] for r in ranks):.2f} s, restore {max(r['restore_s'] for r in ranks):.2f} s, "
          f"{sum(sizes.values())} bytes: {sizes}")  # the figures for README (-s shows them)
    for r in ranks:
        assert r["resumed"] == r["uninterrupted"]  # train_loss and grad_norm of every step, exactly
        assert r["cursor_at_restore"] == r["cursor_at_save"]
    # The numbers changed from step to step, so equality means something.
    assert len({loss for loss, _ in ranks[0]["uninterrupted"] + ranks[0]["before"]}) == K + M


def test_the_optimizer_state_is_restored_bit_for_bit_on_every_rank(two):
    _, ranks = two
    for r in ranks:
        _assert_states_equal(r["state_at_restore"], r["state_at_save"])
        _assert_states_equal(r["state_resumed"], r["state_uninterrupted"])
    import torch

    assert not torch.equal(ranks[0]["state_at_save"][0]["master"], ranks[1]["state_at_save"][0]["master"])


def test_each_rank_gets_its_own_rngs_back(two):
    _, ranks = two
    for r in ranks:
        assert r["draws_at_restore"] == r["draws_at_save"]
    assert ranks[0]["draws_at_save"] != ranks[1]["draws_at_save"]  # so a rank given its peer's state would fail


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_refused_on_every_rank_with_exit_3(two, damage):
    _, ranks = two
    outcomes = [r[damage] for r in ranks]
    assert [o[:3] for o in outcomes] == [("raised", "DataError", 3)] * WORLD, outcomes
    assert all("\n" not in o[3] for o in outcomes)
    failing = 0 if damage.startswith("rank0") else 1
    own = outcomes[failing][3]
    if damage.endswith("file_corrupt"):
        assert "albor-rank-1.json: unreadable" in own
    elif damage.endswith("file_missing"):
        assert "albor-rank-0.json: missing" in own
    elif damage.endswith("shard_missing"):
        assert "optimizer shards of ranks [0]" in own
    else:
        assert "half-loaded" in own and "resuming failed on rank(s) 1" in outcomes[0][3]


def test_init_from_puts_the_fp32_weights_into_every_ranks_master_partition_and_the_module(two):
    _, ranks = two
    assert ranks[0]["init_from_masters_differ"] == []  # gathered back from both ranks' partitions, bit for bit
    assert [r["init_from_module_differs"] for r in ranks] == [[], []]
    for r in ranks:  # checked before anything is copied
        kind, message = r["init_from_unknown_name"]
        assert kind == "ConfigError" and "model.extra.weight" in message


def test_resuming_on_one_rank_continues_within_1e5(two, one):
    _, ranks = two
    for (loss, norm), (loss_1, norm_1) in zip(ranks[0]["uninterrupted"], one["resumed"], strict=True):
        assert math.isclose(loss_1, loss, rel_tol=1e-5), (loss_1, loss)
        assert math.isclose(norm_1, norm, rel_tol=1e-4), (norm_1, norm)
    assert one["cursor_at_restore"] == ranks[0]["cursor_at_save"]


def test_resuming_on_one_rank_restores_every_parameters_optimizer_state(two, one):
    import torch

    _, ranks = two
    saved, loaded = ranks[0]["full_at_save"], one["full_at_restore"]
    assert saved.keys() == loaded.keys() and len(saved) == 38 * 3 + 2
    different = [k for k in saved if not torch.equal(saved[k], loaded[k])]
    assert different == []


def test_the_universal_conversion_is_made_once_and_leaves_no_pointer(one):
    assert one["universal_files"] == ["latest", TAG, f"{TAG}_universal", "zero_to_fp32.py", "zero_to_torch.py"]
    print(f"\n1-rank restore: {one['restore_s']:.2f} s with the conversion, {one['second_restore_s']:.2f} s without")
