"""Checkpointer on 2 real gloo ranks around a real DeepSpeed ZeRO-2 engine (tiny model, CPU).

One launch (tests/dist_harness.py) builds the engine once per rank and writes
several run directories, each with its own story: five good checkpoints of
both kinds (files, the fp32 .apr, per-rank RNG files, the order of the writes,
pruning, client_state), a failure on rank 1 after a good checkpoint, a failure
on rank 0 after one, a marker that cannot be written, and a failure at the
very first checkpoint. The ranks report what they saw; the files are read
here, after both ranks are gone. Pruning by step across kinds is also tested
on its own, on made-up directories.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from albor.contract import CheckpointPoint
from dist_harness import run_distributed_test

WORLD = 2
VOCAB, MICRO, SEQ = 64, 2, 16
SEED = 1234
# The good run's checkpoints, one optimizer step before each: (kind, epoch). Steps are 1, 2, 3, ...
GOOD = [("epoch", 0), ("preemption", 0), ("epoch", 1), ("preemption", 1), ("epoch", 2)]
# Forced onto the CPU and gloo, whatever the machine has: these tests are about files and votes.
RANK_ENV = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def _point(run_dir: Path, kind: str, epoch: int, step: int) -> CheckpointPoint:
    if kind == "epoch":
        return CheckpointPoint.for_epoch(run_dir, epoch, step=step)
    return CheckpointPoint.for_preemption(run_dir, step=step, epoch=epoch)


def _good_points(run_dir: Path) -> list[CheckpointPoint]:
    return [_point(run_dir, kind, epoch, step) for step, (kind, epoch) in enumerate(GOOD, start=1)]


def _metadata(point: CheckpointPoint) -> dict:
    """A small stand-in for the loop's metadata: only its presence and content matter here."""
    return {"val_loss": 3.0 - point.step / 10, "optimizer_state_sha": f"{point.step:064x}", "world_size": WORLD}


def _marker(point: CheckpointPoint) -> dict:
    """What the marker must hold: the loop's metadata and the point's identity."""
    return {**_metadata(point), "kind": point.kind, "tag": point.tag, "step": point.step, "epoch": point.epoch}


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


def _save(writer, point: CheckpointPoint) -> tuple:
    """("ok",) or ("raised", class name, message)."""
    try:
        writer.save(point, _metadata(point))
        return ("ok",)
    except Exception as e:
        return ("raised", type(e).__name__, str(e))


def _rng_snapshot(loader) -> dict:
    """This rank's RNG states and cursor, as the rank file must hold them."""
    import random

    import numpy as np
    import torch

    return {
        "cursor": loader.state_dict(), "torch": torch.get_rng_state().tolist(),
        "python": list(random.getstate()[1]), "numpy": np.random.get_state()[1].tolist(),
    }


def _scenarios(rank: int, world_size: int, tmp: Path) -> dict:
    import random

    import numpy as np
    import torch
    import torch.distributed as dist

    import albor.distributed.checkpoint as checkpoint_module
    from albor.distributed.checkpoint import Checkpointer

    env, engine, loader, model_cfg, step = _build(rank, world_size, tmp)
    writes: list[str] = []  # the names albor's own atomic writes wrote, in order

    def recording(write):
        def wrapper(path, payload):
            write(path, payload)
            writes.append(Path(path).name)
        return wrapper

    checkpoint_module.write_json_atomic = recording(checkpoint_module.write_json_atomic)
    checkpoint_module.write_text_atomic = recording(checkpoint_module.write_text_atomic)

    def writer(run_dir: Path) -> Checkpointer:
        return Checkpointer(engine, env, model_cfg, loader, run_dir, seed=SEED)

    out: dict = {"writes": {}}
    # Good checkpoints of both kinds, one optimizer step each. Ranks draw different random
    # numbers first, so each rank file must hold its own rank's states.
    good, at_save = tmp / "good", []
    if rank == 0:  # a conversion of an older state under a tag about to be written: must not survive it
        (good / "ckpt" / "deepspeed" / "epoch-002_universal" / "zero").mkdir(parents=True)
    for point in _good_points(good):
        step(point.step - 1, 1e-3)
        torch.rand(3 + rank)
        random.random() if rank else None
        np.random.rand(1 + rank)
        at_save.append(_rng_snapshot(loader))
        module_at_save = None
        if point.tag == "epoch-002":
            # The module as a GPU run holds it: rounded to bf16. The master weights stay fp32,
            # so an .apr written from the module would differ from DeepSpeed's consolidation.
            module_at_save = [p.detach().clone() for p in engine.module.parameters()]
            for p in engine.module.parameters():
                p.data.copy_(p.data.bfloat16().float())
            out["module_differs_from_master"] = any(
                not torch.equal(p, q) for p, q in zip(module_at_save, engine.module.parameters())
            )
        writes.clear()
        out[f"good-{point.tag}"] = _save(writer(good), point)
        out["writes"][point.tag] = list(writes)
        if module_at_save is not None:
            for p, saved in zip(engine.module.parameters(), module_at_save):
                p.data.copy_(saved)
    out["at_save"] = at_save
    dist.barrier()
    if rank == 0:  # written by rank 0 alone, so only rank 0 can read it back
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from albor.apr import read_apr

        def apr_summary(point):
            try:
                meta, tensors = read_apr(point.apr_path)
            except Exception as e:  # reported, so the test that reads it fails, not the whole launch
                return f"{type(e).__name__}: {e}"
            return meta["epoch"], meta["vocab_size"], tuple(tensors["model.embed_tokens.weight"].shape)

        out["apr"] = {p.tag: apr_summary(p) for p in _good_points(good) if p.kind == "epoch"}

        def apr_vs_zero_to_fp32() -> dict:
            last = _good_points(good)[-1]
            _, apr = read_apr(last.apr_path)
            consolidated = get_fp32_state_dict_from_zero_checkpoint(str(good / "ckpt" / "deepspeed"), tag=last.tag)
            return {
                "apr_names": sorted(apr), "zero_names": sorted(consolidated),
                "different": [n for n in apr
                              if not torch.equal(apr[n].view(torch.int32), consolidated[n].view(torch.int32))],
                "head_is_embedding": torch.equal(consolidated["lm_head.weight"],
                                                 consolidated["model.embed_tokens.weight"]),
                "dtypes": sorted({str(t.dtype) for t in apr.values()}),
            }

        def client_state() -> dict:
            found = {}
            for tag_dir in sorted((good / "ckpt" / "deepspeed").iterdir()):
                if tag_dir.is_dir():
                    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
                    found[tag_dir.name] = {
                        "albor": {k: state.get(k) for k in ("epoch", "seed", "step")},
                        "per_rank_keys": sorted(set(state) & {"data_cursor", "torch_rng"}),  # rank 0's alone: wrong
                    }
            return found

        for key, read in (("apr_vs_zero_to_fp32", apr_vs_zero_to_fp32), ("client_state", client_state)):
            try:
                out[key] = read()
            except Exception as e:  # reported, so the test that reads it fails, not the whole launch
                out[key] = f"{type(e).__name__}: {e}"

    # A good first checkpoint, then the second fails on one rank only.
    for failing, name in ((1, "rank1_shard"), (0, "rank0_apr")):
        run_dir = tmp / name
        first, second = _point(run_dir, "epoch", 0, 1), _point(run_dir, "epoch", 1, 2)
        out[f"{name}-0"] = _save(writer(run_dir), first)
        dist.barrier()
        if rank == 0:
            out[f"{name}-before"] = _tree_digest(run_dir / "ckpt")
        dist.barrier()
        if rank == failing == 1:  # rank 1 cannot write its optimizer shard
            (run_dir / "ckpt" / "deepspeed" / "epoch-001" / _shard_name(1)).mkdir(parents=True)
        if rank == failing == 0:  # rank 0 cannot write the .apr
            second.apr_path.mkdir(parents=True)
        writes.clear()
        out[f"{name}-1"] = _save(writer(run_dir), second)
        out["writes"][name] = list(writes)
        dist.barrier()

    # Every rank's files are written, but rank 0 cannot write the marker: the second vote.
    run_dir = tmp / "marker_fails"
    out["marker_fails-0"] = _save(writer(run_dir), _point(run_dir, "preemption", 0, 1))
    dist.barrier()
    if rank == 0:
        out["marker_fails-before"] = _tree_digest(run_dir / "ckpt")
        _point(run_dir, "epoch", 0, 2).metadata_path.mkdir()
    dist.barrier()
    out["marker_fails-1"] = _save(writer(run_dir), _point(run_dir, "epoch", 0, 2))
    dist.barrier()

    # The very first checkpoint fails: there is no earlier `latest` to go back to.
    first = tmp / "first_fails"
    if rank == 1:
        (first / "ckpt" / "deepspeed" / "epoch-000" / _shard_name(1)).mkdir(parents=True)
    out["first_fails-0"] = _save(writer(first), _point(first, "epoch", 0, 1))
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("dist-ckpt")
    ranks = run_distributed_test(_scenarios, WORLD, tmp, timeout=240, env=RANK_ENV)
    return tmp, ranks


def _files_of(ckpt: Path, tag: str) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob(f"*{tag}*"))


def test_good_checkpoints_write_their_files_and_the_marker_with_the_points_identity(run):
    tmp, ranks = run
    ckpt = tmp / "good" / "ckpt"
    for point in _good_points(tmp / "good"):
        assert [r[f"good-{point.tag}"] for r in ranks] == [("ok",)] * WORLD
        if point.kind == "epoch":
            assert ranks[0]["apr"][point.tag] == (point.epoch, VOCAB, (VOCAB, 128))  # albor's reader accepts it
        else:
            assert point.apr_path is None and not list(ckpt.glob(f"{point.tag}*.apr"))
    for point in _good_points(tmp / "good"):
        if point.tag != "step-0000002":  # pruned, with its marker (below)
            assert json.loads(point.metadata_path.read_text()) == _marker(point)
    assert (ckpt / "deepspeed" / "latest").read_text() == "epoch-002"
    last = ckpt / "deepspeed" / "epoch-002"
    assert {p.name for p in last.iterdir()} >= {
        "mp_rank_00_model_states.pt", _shard_name(0), _shard_name(1), "albor-rank-0.json", "albor-rank-1.json",
    }


def test_each_rank_writes_its_files_before_rank0_writes_latest_then_the_marker(run):
    _, ranks = run
    for point in _good_points(Path("run")):
        assert ranks[0]["writes"][point.tag] == ["albor-rank-0.json", "latest", f"{point.tag}.metadata.json"]
        assert ranks[1]["writes"][point.tag] == ["albor-rank-1.json"]
    # Rank 1's shard failed: the first vote stopped rank 0 before the marker (`latest` is only put back).
    assert ranks[0]["writes"]["rank1_shard"][0] == "albor-rank-0.json"
    assert "epoch-001.metadata.json" not in ranks[0]["writes"]["rank1_shard"]


def test_the_apr_holds_the_fp32_master_weights_bit_for_bit_as_zero_to_fp32(run):
    _, ranks = run
    assert ranks[0]["module_differs_from_master"]  # so an .apr taken from the module would show
    check = ranks[0]["apr_vs_zero_to_fp32"]
    assert check["different"] == []
    assert check["dtypes"] == ["torch.float32"]
    assert check["apr_names"] == sorted(set(check["zero_names"]) - {"lm_head.weight"})  # the tied head, as HF saves it
    assert check["head_is_embedding"]


def test_every_rank_file_holds_that_ranks_own_rngs_and_cursor(run):
    tmp, ranks = run
    ds = tmp / "good" / "ckpt" / "deepspeed"
    for i, point in enumerate(_good_points(tmp / "good")):
        if not (ds / point.tag).is_dir():
            continue
        files = [json.loads((ds / point.tag / f"albor-rank-{r}.json").read_text()) for r in range(WORLD)]
        for r, saved in enumerate(files):
            expected = ranks[r]["at_save"][i]
            assert (saved["rank"], saved["world_size"], saved["tag"]) == (r, WORLD, point.tag)
            assert saved["data_cursor"] == expected["cursor"]
            assert saved["data_cursor"]["position"] == point.step  # one step per checkpoint moved it
            assert list(base64.b64decode(saved["torch_cpu"])) == expected["torch"]
            assert saved["python_random"][1] == expected["python"]
            assert saved["numpy_random"]["key"] == expected["numpy"]
            assert saved["cuda"] is None
        for key in ("torch_cpu", "python_random", "numpy_random"):
            assert files[0][key] != files[1][key], key  # the ranks' RNGs differed, and so do their files


def test_client_state_keeps_only_what_every_rank_shares(run):
    _, ranks = run
    saved = ranks[0]["client_state"]
    assert sorted(saved) == ["epoch-002", "step-0000004"]
    assert saved["step-0000004"]["albor"] == {"epoch": 1, "seed": SEED, "step": 4}
    assert saved["epoch-002"]["albor"] == {"epoch": 2, "seed": SEED, "step": 5}
    assert all(s["per_rank_keys"] == [] for s in saved.values())


def test_pruning_keeps_the_two_newest_deepspeed_states_of_any_kind_and_every_epochs_apr(run):
    tmp, _ = run
    ckpt = tmp / "good" / "ckpt"
    # (Also gone: a stale epoch-002_universal, made before epoch-002 was written.)
    assert sorted(p.name for p in (ckpt / "deepspeed").iterdir() if p.is_dir()) == ["epoch-002", "step-0000004"]
    assert sorted(p.name for p in ckpt.glob("*.apr")) == ["epoch-000.apr", "epoch-001.apr", "epoch-002.apr"]
    # The pruned preemption checkpoint lost its marker too; every epoch keeps its own.
    assert sorted(p.name for p in ckpt.glob("*.metadata.json")) == [
        "epoch-000.metadata.json", "epoch-001.metadata.json", "epoch-002.metadata.json", "step-0000004.metadata.json",
    ]


@pytest.mark.parametrize("name, failing", [("rank1_shard", 1), ("rank0_apr", 0), ("marker_fails", 0)])
def test_a_failure_on_one_rank_fails_every_rank_naming_it(run, name, failing):
    _, ranks = run
    assert [r[f"{name}-0"] for r in ranks] == [("ok",)] * WORLD
    outcomes = [r[f"{name}-1"] for r in ranks]
    assert [o[:2] for o in outcomes] == [("raised", "CheckpointError")] * WORLD, outcomes
    tag = "epoch-000" if name == "marker_fails" else "epoch-001"
    for o in outcomes:
        assert f"writing {tag} failed on rank(s) {failing}:" in o[2]
    assert "Is a directory" in outcomes[failing][2]  # the failing rank says what went wrong


@pytest.mark.parametrize("name", ["rank1_shard", "rank0_apr", "marker_fails"])
def test_the_failed_checkpoint_is_undone_and_the_earlier_one_untouched(run, name):
    tmp, ranks = run
    ckpt = tmp / name / "ckpt"
    failed = "epoch-000" if name == "marker_fails" else "epoch-001"
    left = _files_of(ckpt, failed)
    if name == "rank0_apr":
        # The directory the test put in the .apr's place is not albor's to remove; nothing else remains.
        assert left == ["epoch-001.apr"] and not any((ckpt / "epoch-001.apr").iterdir())
    elif name == "marker_fails":
        assert left == ["epoch-000.metadata.json"] and not any((ckpt / "epoch-000.metadata.json").iterdir())
    else:
        assert left == []
    earlier = "step-0000001" if name == "marker_fails" else "epoch-000"
    assert (ckpt / "deepspeed" / "latest").read_text() == earlier
    assert _tree_digest(ckpt) == ranks[0][f"{name}-before"]  # the earlier checkpoint byte-identical, nothing added


def test_a_failed_first_checkpoint_leaves_no_latest(run):
    tmp, ranks = run
    outcomes = [r["first_fails-0"] for r in ranks]
    assert [o[:2] for o in outcomes] == [("raised", "CheckpointError")] * WORLD, outcomes
    ckpt = tmp / "first_fails" / "ckpt"
    assert not (ckpt / "deepspeed" / "latest").exists()
    assert _files_of(ckpt, "epoch-000") == []
    # DeepSpeed's recovery scripts belong to no checkpoint; nothing else may remain.
    assert set(_tree_digest(ckpt)) <= {"deepspeed/zero_to_fp32.py", "deepspeed/zero_to_torch.py"}


# --- pruning and the complete checkpoints, on made-up directories ----------------------------


def _fake_checkpoint(ckpt: Path, tag: str, step: int, *, universal: bool = False) -> None:
    (ckpt / "deepspeed" / tag).mkdir(parents=True)
    if universal:
        (ckpt / "deepspeed" / f"{tag}_universal").mkdir()
    if tag.startswith("epoch-"):
        (ckpt / f"{tag}.apr").write_bytes(b"apr")
    (ckpt / f"{tag}.metadata.json").write_text(json.dumps({"tag": tag, "step": step}))


def test_pruning_orders_by_step_across_kinds_never_by_name(tmp_path):
    from albor.distributed.checkpoint import KEEP_DEEPSPEED_STATES, complete_checkpoints, prune

    ckpt = tmp_path / "ckpt"
    # By name, "epoch-1000" < "epoch-999" and every "epoch-" < every "step-"; by step the order is this one.
    for tag, step in (("epoch-999", 9990), ("step-0009995", 9995), ("epoch-1000", 10000), ("step-0010004", 10004)):
        _fake_checkpoint(ckpt, tag, step, universal=tag == "step-0009995")
    (ckpt / "deepspeed" / "step-0010008").mkdir()  # no marker: not a checkpoint, not prune's to touch
    assert [c.tag for c in complete_checkpoints(ckpt)] == ["epoch-999", "step-0009995", "epoch-1000", "step-0010004"]
    prune(ckpt, KEEP_DEEPSPEED_STATES)
    assert sorted(p.name for p in (ckpt / "deepspeed").iterdir()) == ["epoch-1000", "step-0010004", "step-0010008"]
    assert sorted(p.name for p in ckpt.glob("*.metadata.json")) == [
        "epoch-1000.metadata.json", "epoch-999.metadata.json", "step-0010004.metadata.json",
    ]
    assert sorted(p.name for p in ckpt.glob("*.apr")) == ["epoch-1000.apr", "epoch-999.apr"]


def test_complete_checkpoints_skip_an_unreadable_marker_and_foreign_names(tmp_path, caplog):
    from albor.distributed.checkpoint import complete_checkpoints

    ckpt = tmp_path / "ckpt"
    _fake_checkpoint(ckpt, "epoch-000", 5)
    _fake_checkpoint(ckpt, "step-0000005", 5)  # the same step: the epoch checkpoint counts as the newer
    (ckpt / "epoch-001.metadata.json").write_text('{"step": ')  # killed while writing? (albor writes atomically)
    (ckpt / "notes.metadata.json").write_text('{"step": 99}')
    assert [(c.tag, c.kind, c.step) for c in complete_checkpoints(ckpt)] == [
        ("step-0000005", "preemption", 5), ("epoch-000", "epoch", 5),
    ]
    assert "epoch-001.metadata.json cannot be read" in caplog.text


# --- on a GPU: a bf16 module, fp32 masters, the CUDA RNG (launcher/gpu_check.sh) --------------


def _one_gpu_run(tmp: Path, device: str) -> dict:
    """Train 2 steps on one rank of ``device`` (dev mode), save an epoch checkpoint, restore it into a fresh engine."""
    import numpy as np
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from albor.apr import read_apr
    from albor.data.loader import Split, TrainLoader
    from albor.distributed.checkpoint import Checkpointer, fp32_master_state_dict
    from albor.distributed.ds_config import default_ds_config_path, load_ds_config, resolve_ds_config
    from albor.distributed.engine import build_engine
    from albor.distributed.process_group import init_distributed, shutdown
    from albor.distributed.resume import load_fp32_masters, restore
    from albor.distributed.step import DeepSpeedStep
    from albor.model import AlborLlama, model_preset
    from dev_engine import LAUNCHER_ENV
    from fakes import loop_config

    def draws() -> list:
        saved = torch.get_rng_state(), torch.cuda.get_rng_state() if device == "cuda" else None
        drawn = torch.rand(2).tolist() + (torch.rand(2, device=device).tolist() if device == "cuda" else [])
        torch.set_rng_state(saved[0])
        if saved[1] is not None:
            torch.cuda.set_rng_state(saved[1])
        return drawn

    with pytest.MonkeyPatch.context() as mp:
        for name in LAUNCHER_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("OMP_NUM_THREADS", "1")
        env = init_distributed()
        try:
            config = loop_config(tmp, batch_size=MICRO, seq_length=SEQ, seed=SEED)
            ds = resolve_ds_config(load_ds_config(default_ds_config_path(device, 1)), config, world_size=1,
                                   device_type=device, bf16_supported=device == "cuda", source=device)
            tokens = (np.arange(40 * (SEQ + 1) * MICRO) * 7 % VOCAB).astype(np.uint16)
            split = Split("train", (tokens,), "f" * 64, np.array([0, tokens.shape[0]], dtype=np.int64))
            model_cfg = model_preset("tiny", vocab_size=VOCAB)

            def build(seed: int):
                loader = TrainLoader(split, micro_batch=MICRO, seq_length=SEQ, rank=0, world_size=1, seed=SEED)
                torch.manual_seed(seed)
                engine = build_engine(AlborLlama(model_cfg), ds, env, lr=1e-3, weight_decay=0.01)
                return engine, loader, DeepSpeedStep(engine, loader, env, grad_accumulation=1, gpu=_NoGpu())

            engine, loader, step = build(SEED)
            for s in range(2):
                step(s, 1e-3)
            run_dir, point = tmp / "run", CheckpointPoint.for_epoch(tmp / "run", 0, step=2)
            Checkpointer(engine, env, model_cfg, loader, run_dir, seed=SEED).save(point, _metadata(point))
            _, apr = read_apr(point.apr_path)
            consolidated = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "ckpt" / "deepspeed"), tag=point.tag)
            module = {n: p.detach().float().cpu() for n, p in engine.module.named_parameters()}
            out = {
                "module_dtype": str(next(engine.module.parameters()).dtype),
                "apr_dtypes": sorted({str(t.dtype) for t in apr.values()}),
                "apr_vs_zero_to_fp32_different": [n for n in apr if not torch.equal(apr[n], consolidated[n])],
                "apr_differs_from_module": any(not torch.equal(apr[n], module[n]) for n in apr),
                "cuda_state_saved": json.loads(
                    (run_dir / "ckpt" / "deepspeed" / point.tag / "albor-rank-0.json").read_text())["cuda"] is not None,
                "draws_at_save": draws(),
            }
            engine, loader, step = build(SEED + 1)
            torch.manual_seed(99)
            restore(engine, env, run_dir / "ckpt" / "deepspeed", point.tag, saved_world_size=1, loader=loader)
            out["draws_at_restore"] = draws()
            engine, _, _ = build(SEED + 2)  # --init-from the .apr: the masters exact, the module in its dtype
            load_fp32_masters(engine, env, apr)
            again = fp32_master_state_dict(engine, env)
            out["init_from_masters_differ"] = [n for n in apr if not torch.equal(again[n], apr[n])]
            return out
        finally:
            shutdown()


@pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)
def test_on_a_gpu_the_apr_holds_the_fp32_masters_and_the_cuda_rng_comes_back(tmp_path):
    seen = _one_gpu_run(tmp_path, "cuda")
    assert seen["module_dtype"] == "torch.bfloat16"  # what DeepSpeed trains on under the shipped GPU config
    assert seen["apr_dtypes"] == ["torch.float32"]
    assert seen["apr_vs_zero_to_fp32_different"] == []
    assert seen["apr_differs_from_module"]  # the masters, not the bf16 module widened
    assert seen["cuda_state_saved"]
    assert seen["draws_at_restore"] == seen["draws_at_save"]  # torch CPU and CUDA draws
    assert seen["init_from_masters_differ"] == []  # not rounded through the bf16 module
