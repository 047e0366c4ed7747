"""EpochCheckpoint on 2 real gloo ranks around a real DeepSpeed ZeRO-2 engine (tiny model, CPU).

One launch (tests/dist_harness.py) builds the engine once per rank and writes
several run directories, each with its own story: four good epochs (files,
pruning, client_state), a failure on rank 1 after a good epoch, a failure on
rank 0 after a good epoch, and a failure at the very first epoch. The ranks
report what they saw; the files are read here, after both ranks are gone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from albor.contract import EpochArtifact
from dist_harness import run_distributed_test

WORLD = 2
VOCAB, MICRO, SEQ = 64, 2, 16
GOOD_EPOCHS = 4
SEED = 1234
# Forced onto the CPU and gloo, whatever the machine has: these tests are about files and votes.
RANK_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def _metadata(epoch: int) -> dict:
    """A small stand-in for the loop's metadata: only its presence and content matter here."""
    return {"epoch": epoch, "val_loss": 3.0 - epoch / 10, "optimizer_state_sha": f"{epoch:064x}"}


def _shard_name(rank: int) -> str:
    """The file ZeRO-2 writes for one rank's optimizer partition."""
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _build(rank: int, world_size: int, tmp: Path):
    """The engine, loader and step of a tiny run, built the way albor.train builds them."""
    import numpy as np
    import torch

    import deepspeed
    from albor.data.loader import Split, TrainLoader
    from albor.distributed.ds_config import default_ds_config_path, load_ds_config, resolve_ds_config
    from albor.distributed.engine import build_engine
    from albor.distributed.process_group import DistEnv
    from albor.distributed.step import DeepSpeedStep
    from albor.model import AlborLlama, model_preset
    from fakes import loop_config

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the harness's group, as init_distributed does
    env = DistEnv(rank, world_size, rank, torch.device("cpu"))
    config = loop_config(tmp / f"config-{rank}", batch_size=MICRO, seq_length=SEQ, seed=SEED)
    ds = resolve_ds_config(
        load_ds_config(default_ds_config_path("cpu", world_size)), config, world_size=world_size,
        device_type="cpu", bf16_supported=False, source="zero2-cpu-fp32.json",
    )
    tokens = (np.arange(40 * (SEQ + 1) * MICRO * world_size) * 7 % VOCAB).astype(np.uint16)
    split = Split("train", (tokens,), "f" * 64, np.array([0, tokens.shape[0]], dtype=np.int64))
    loader = TrainLoader(split, micro_batch=MICRO, seq_length=SEQ, rank=rank, world_size=world_size, seed=SEED)
    model_cfg = model_preset("tiny", vocab_size=VOCAB)
    torch.manual_seed(SEED)
    engine = build_engine(AlborLlama(model_cfg), ds, env, lr=1e-3, weight_decay=0.01)
    step = DeepSpeedStep(engine, loader, env, grad_accumulation=1, gpu=_NoGpu())
    return env, engine, loader, model_cfg, step


class _NoGpu:
    def read(self) -> float:
        return 0.0


def _save(writer, run_dir: Path, epoch: int) -> tuple:
    """("ok",) or ("raised", class name, message)."""
    try:
        writer.save(epoch, EpochArtifact.for_epoch(run_dir, epoch), _metadata(epoch))
        return ("ok",)
    except Exception as e:
        return ("raised", type(e).__name__, str(e))


def _scenarios(rank: int, world_size: int, tmp: Path) -> dict:
    import torch
    import torch.distributed as dist

    from albor.distributed.checkpoint import EpochCheckpoint

    env, engine, loader, model_cfg, step = _build(rank, world_size, tmp)

    def writer(run_dir: Path) -> EpochCheckpoint:
        return EpochCheckpoint(engine, env, model_cfg, loader, run_dir, seed=SEED)

    out: dict = {}
    # Four good epochs, one optimizer step each; ranks draw different random numbers, so the
    # saved RNG state is the saving rank's own and not torch's seeded default.
    good, at_save = tmp / "good", []
    for epoch in range(GOOD_EPOCHS):
        step(epoch, 1e-3)
        torch.rand(3 + rank)
        at_save.append({"cursor": loader.state_dict(), "rng": torch.get_rng_state().tolist()})
        out[f"good-{epoch}"] = _save(writer(good), good, epoch)
    out["at_save"] = at_save
    dist.barrier()
    if rank == 0:  # written by rank 0 alone, so only rank 0 can read it back
        from albor.apr import read_apr

        def apr_summary(epoch: int):
            try:
                meta, tensors = read_apr(EpochArtifact.for_epoch(good, epoch).checkpoint_path)
            except Exception as e:  # reported, so the test that reads it fails, not the whole launch
                return f"{type(e).__name__}: {e}"
            return meta["epoch"], meta["vocab_size"], tuple(tensors["model.embed_tokens.weight"].shape)

        out["apr"] = {epoch: apr_summary(epoch) for epoch in range(GOOD_EPOCHS)}
        out["client_state"] = {}
        for tag in sorted(p.name for p in (good / "ckpt" / "deepspeed").glob("epoch-*")):
            state = torch.load(good / "ckpt" / "deepspeed" / tag / "mp_rank_00_model_states.pt",
                               map_location="cpu", weights_only=False)
            out["client_state"][tag] = {
                "epoch": state.get("epoch"), "seed": state.get("seed"), "data_cursor": state.get("data_cursor"),
                "torch_rng": state["torch_rng"].tolist() if "torch_rng" in state else None,
            }

    # A good epoch 0, then epoch 1 fails on one rank only.
    for failing, name in ((1, "rank1_shard"), (0, "rank0_apr")):
        run_dir = tmp / name
        out[f"{name}-0"] = _save(writer(run_dir), run_dir, 0)
        dist.barrier()
        if rank == 0:
            out[f"{name}-before"] = _tree_digest(run_dir / "ckpt")
        dist.barrier()
        if rank == failing == 1:  # rank 1 cannot write its optimizer shard
            (run_dir / "ckpt" / "deepspeed" / "epoch-001" / _shard_name(1)).mkdir(parents=True)
        if rank == failing == 0:  # rank 0 cannot write the .apr
            EpochArtifact.for_epoch(run_dir, 1).checkpoint_path.mkdir(parents=True)
        out[f"{name}-1"] = _save(writer(run_dir), run_dir, 1)
        dist.barrier()

    # The very first epoch fails: there is no earlier `latest` to go back to.
    first = tmp / "first_fails"
    if rank == 1:
        (first / "ckpt" / "deepspeed" / "epoch-000" / _shard_name(1)).mkdir(parents=True)
    out["first_fails-0"] = _save(writer(first), first, 0)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def run(deepspeed_ops_ready, tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("dist-ckpt")
    ranks = run_distributed_test(_scenarios, WORLD, tmp, timeout=240, env=RANK_ENV)
    return tmp, ranks


def _files_of_epoch(ckpt: Path, epoch: int) -> list[str]:
    tag = f"epoch-{epoch:03d}"
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob(f"*{tag}*"))


def test_good_epochs_write_apr_deepspeed_state_latest_and_metadata(run):
    tmp, ranks = run
    ckpt = tmp / "good" / "ckpt"
    for epoch in range(GOOD_EPOCHS):
        assert [r[f"good-{epoch}"] for r in ranks] == [("ok",)] * WORLD
        artifact = EpochArtifact.for_epoch(tmp / "good", epoch)
        assert ranks[0]["apr"][epoch] == (epoch, VOCAB, (VOCAB, 128))  # albor's reader accepts it
        assert json.loads(artifact.metadata_path.read_text()) == _metadata(epoch)
    assert (ckpt / "deepspeed" / "latest").read_text() == f"epoch-{GOOD_EPOCHS - 1:03d}"
    last = ckpt / "deepspeed" / f"epoch-{GOOD_EPOCHS - 1:03d}"
    assert {p.name for p in last.iterdir()} >= {"mp_rank_00_model_states.pt", _shard_name(0), _shard_name(1)}


def test_only_the_last_two_deepspeed_states_are_kept_and_every_apr(run):
    tmp, _ = run
    ckpt = tmp / "good" / "ckpt"
    assert sorted(p.name for p in (ckpt / "deepspeed").iterdir() if p.is_dir()) == ["epoch-002", "epoch-003"]
    assert sorted(p.name for p in ckpt.glob("*.apr")) == [f"epoch-{e:03d}.apr" for e in range(GOOD_EPOCHS)]
    assert sorted(p.name for p in ckpt.glob("*.metadata.json")) == [
        f"epoch-{e:03d}.metadata.json" for e in range(GOOD_EPOCHS)
    ]


def test_client_state_holds_epoch_seed_cursor_and_rng_at_save_time(run):
    _, ranks = run
    saved, at_save = ranks[0]["client_state"], ranks[0]["at_save"]
    assert sorted(saved) == ["epoch-002", "epoch-003"]
    for tag, state in saved.items():
        epoch = int(tag.removeprefix("epoch-"))
        assert state["epoch"] == epoch and state["seed"] == SEED
        assert state["data_cursor"] == at_save[epoch]["cursor"]
        assert state["data_cursor"]["position"] == epoch + 1  # one step per epoch moved it
        assert state["torch_rng"] == at_save[epoch]["rng"]
    # The RNG really moved between saves, so comparing it proves something.
    assert at_save[2]["rng"] != at_save[3]["rng"]


@pytest.mark.parametrize("name, failing", [("rank1_shard", 1), ("rank0_apr", 0)])
def test_a_failure_on_one_rank_fails_every_rank_naming_it(run, name, failing):
    _, ranks = run
    assert [r[f"{name}-0"] for r in ranks] == [("ok",)] * WORLD
    outcomes = [r[f"{name}-1"] for r in ranks]
    assert [o[:2] for o in outcomes] == [("raised", "CheckpointError")] * WORLD, outcomes
    for o in outcomes:
        assert f"writing epoch-001 failed on rank(s) {failing}:" in o[2]
    assert "Is a directory" in outcomes[failing][2]  # the failing rank says what went wrong


@pytest.mark.parametrize("name", ["rank1_shard", "rank0_apr"])
def test_the_failed_epoch_is_undone_and_the_earlier_one_untouched(run, name):
    tmp, ranks = run
    ckpt = tmp / name / "ckpt"
    left = _files_of_epoch(ckpt, 1)
    if name == "rank0_apr":
        # The directory the test put in the .apr's place is not albor's to remove; nothing else remains.
        assert left == ["epoch-001.apr"] and not any((ckpt / "epoch-001.apr").iterdir())
    else:
        assert left == []
    assert (ckpt / "deepspeed" / "latest").read_text() == "epoch-000"
    assert _tree_digest(ckpt) == ranks[0][f"{name}-before"]  # epoch 0 byte-identical, nothing added


def test_a_failed_first_epoch_leaves_no_latest(run):
    tmp, ranks = run
    outcomes = [r["first_fails-0"] for r in ranks]
    assert [o[:2] for o in outcomes] == [("raised", "CheckpointError")] * WORLD, outcomes
    ckpt = tmp / "first_fails" / "ckpt"
    assert not (ckpt / "deepspeed" / "latest").exists()
    assert _files_of_epoch(ckpt, 0) == []
    # DeepSpeed's recovery scripts belong to no epoch; nothing else may remain.
    assert set(_tree_digest(ckpt)) <= {"deepspeed/zero_to_fp32.py", "deepspeed/zero_to_torch.py"}
