"""Real multi-process runs: 2 CPU ranks (gloo) of the tiny model on the builtin corpus.

Each launch costs ~20-40 s on 2 cores, so runs are module-scoped and shared
between the tests that read them: one deepspeed happy-path run serves the
contract, run-directory, checkpoint, single-process parity, reproducibility
and torchrun tests, and is watched while it runs (status.json says "running").

Every drill (a fault on one rank, a checkpoint that fails) runs with
collective timeouts well below the test's own launch timeout. A collective
that hangs then ends the run through the timeout path, whose status message
("timed out") the drill tests reject: a hang fails the test deterministically
and no assertion depends on how many seconds a loaded machine took.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
import yaml

from albor.apr import read_apr
from albor.model import AlborLlama, ModelConfig, load_hf_state_dict
from albor.pretrain import main as pretrain_main
from tests.drill_env import DRILL_ENV

pytestmark = pytest.mark.multiproc

REPO = Path(__file__).resolve().parents[1]
RANKS, BATCH, SEQ = 2, 4, 256
STEPS, PER_EPOCH = 20, 10
EPOCHS = STEPS // PER_EPOCH
TOKENS_PER_STEP = RANKS * BATCH * SEQ  # the global batch
LR_MAX, LR_MIN, WARMUP = 1e-3, 1e-6, 5  # lr_min: the config default
GRAD_CLIP = 1.0  # the config default
SHA_CHUNK = 1 << 16  # elements per chunk of the optimizer-state sha's stream (docs/checkpoints.md)
STEP_FIELDS = ("step", "train_loss", "grad_norm", "lr", "tokens_per_sec", "gpu_util_pct", "wall_ms")
METADATA_FIELDS = (
    "epoch", "train_loss", "val_loss", "train_ppl", "val_ppl", "optimizer_state_sha",
    "wall_seconds", "tokens_seen", "grad_norm_max",
)


def base_args(dataset: Path, config: Path, *, batch: int = BATCH, seed: int | None = None) -> list[str]:
    args = [
        "--dataset", str(dataset), "--model", "tiny", "--config", str(config), "--mode", "from-scratch",
        "--total-steps", str(STEPS), "--steps-per-epoch", str(PER_EPOCH), "--batch-size", str(batch),
        "--seq-length", str(SEQ), "--warmup-steps", str(WARMUP), "--lr-max", str(LR_MAX),
    ]
    if seed is not None:
        args += ["--seed", str(seed)]
    return args


def expected_lr(step: int) -> float:
    """README's schedule, written out: linear from 0 over WARMUP steps, then cosine to LR_MIN at STEPS."""
    if step < WARMUP:
        return LR_MAX * step / WARMUP
    progress = (step - WARMUP) / (STEPS - WARMUP)
    return LR_MIN + (LR_MAX - LR_MIN) * (1 + math.cos(math.pi * progress)) / 2


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multirank")


@pytest.fixture(scope="module")
def config_target_met(work) -> Path:
    """2 validation batches a rank (speed) and a target a tiny 20-step run certainly meets."""
    p = work / "target-met.yaml"
    p.write_text("val_batches: 2\ntarget_val_loss: 100.0\n")
    return p


@pytest.fixture(scope="module")
def config_default_target(work) -> Path:
    """2 validation batches a rank; the from-scratch target (3.0) stays, and 20 tiny steps miss it."""
    p = work / "default-target.yaml"
    p.write_text("val_batches: 2\n")
    return p


def status_once_a_step_is_logged(run_dir: Path) -> dict | None:
    """status.json as soon as metrics.jsonl holds a step: the run is certainly live then (19 steps to go)."""
    metrics, status = run_dir / "metrics.jsonl", run_dir / "status.json"
    if not metrics.is_file() or not metrics.read_text().strip():
        return None
    return json.loads(status.read_text()) if status.is_file() else {"status.json": "missing"}


@pytest.fixture(scope="module")
def ds_run(albor_launch, builtin_dataset, config_target_met, work):
    return albor_launch(
        "deepspeed", base_args(builtin_dataset, config_target_met), work / "ds", observe=status_once_a_step_is_logged
    )


@pytest.fixture(scope="module")
def ds_other_seed(albor_launch, builtin_dataset, config_default_target, work):
    # Only the seed differs in what is trained: target_val_loss decides nothing before epoch 3.
    return albor_launch("deepspeed", base_args(builtin_dataset, config_default_target, seed=7), work / "ds-seed7")


@pytest.fixture(scope="module")
def single_run(albor_launch, builtin_dataset, config_target_met, work):
    # One process, no launcher, micro-batch 8 = 2 ranks x 4: the same global batch.
    args = base_args(builtin_dataset, config_target_met, batch=RANKS * BATCH)
    return albor_launch("python", args, work / "single")


@pytest.fixture(scope="module")
def torchrun_run(albor_launch, builtin_dataset, config_target_met, work):
    return albor_launch("torchrun", base_args(builtin_dataset, config_target_met), work / "torchrun")


def fault_run(albor_launch, dataset, config, work, fault: str):
    name = fault.replace(":", "-")
    return albor_launch("deepspeed", base_args(dataset, config), work / name, env={**DRILL_ENV, "ALBOR_FAULT": fault})


def rel_close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def launcher_codes(output: str) -> list[int]:
    """Every rank exit code the deepspeed launcher reported."""
    return [int(c) for c in re.findall(r"exits with return code = (-?\d+)", output)]


def epoch_files(run_dir: Path) -> list[str]:
    """Every epoch file albor or DeepSpeed left: ckpt/epoch-NNN.* and ckpt/deepspeed/epoch-NNN."""
    ckpt = run_dir / "ckpt"
    return sorted(str(p.relative_to(ckpt)) for p in [*ckpt.glob("epoch-*"), *ckpt.glob("deepspeed/epoch-*")])


def assert_no_epoch_zero_files(run_dir: Path) -> None:
    left = [name for name in epoch_files(run_dir) if "epoch-000" in name]
    assert left == [], f"an aborted epoch left files behind: {left}"


def assert_no_timeout(message: str) -> None:
    """The drill ended by the path it tests, not by a collective that hung until the timeout."""
    assert "timed out" not in message.lower() and "timeout" not in message.lower(), message


# ── happy path ──────────────────────────────────────────────────────────────


def test_happy_path_exits_0_when_the_target_is_met(ds_run):
    assert ds_run.returncode == 0, ds_run.tail()
    status = ds_run.status()
    assert status["status"] == "ok"
    assert status["exit_code"] == 0
    assert status["target_met"] is True
    assert status["target_val_loss"] == 100.0
    assert status["epochs_completed"] == EPOCHS
    assert status["steps_completed"] == STEPS
    assert status["abort"] is None


def test_status_says_running_while_the_run_is_live(ds_run):
    assert ds_run.observed is not None, "metrics.jsonl never had a step while the run was live\n" + ds_run.tail()
    assert ds_run.observed.get("status") == "running", ds_run.observed
    assert ds_run.observed.get("world_size") == RANKS, ds_run.observed
    assert ds_run.status()["status"] == "ok"  # and no longer once it ended


def test_every_rank_records_its_exit_on_a_normal_end(ds_run):
    records = ds_run.exit_records()
    assert {rank: r["exit_code"] for rank, r in records.items()} == {0: 0, 1: 0}, ds_run.tail()
    assert len({r["pid"] for r in records.values()}) == RANKS  # two processes, each wrote its own
    assert all(isinstance(r["host"], str) and r["host"] for r in records.values())


def test_happy_path_exits_4_when_a_short_run_misses_the_target(ds_other_seed):
    # 20 steps of a 1.8M-parameter model end near val_loss 7.4, far above the from-scratch
    # target 3.0: "finished, target missed" is the truthful outcome, and it is exit 4.
    assert ds_other_seed.returncode == 4, ds_other_seed.tail()
    assert ds_other_seed.exit_codes() == {0: 4, 1: 4}
    status = ds_other_seed.status()
    assert status["status"] == "ok"
    assert status["exit_code"] == 4
    assert status["target_met"] is False
    assert status["target_val_loss"] == 3.0
    assert status["final_val_loss"] > 3.0
    assert status["epochs_completed"] == EPOCHS


def test_every_contract_field_on_every_step(ds_run):
    assert ds_run.returncode == 0, ds_run.tail()
    rows = ds_run.metrics()
    assert [r["step"] for r in rows] == list(range(STEPS))
    for r in rows:
        missing = [f for f in STEP_FIELDS if f not in r]
        assert not missing, f"step {r.get('step')}: missing {missing}"
        for f in STEP_FIELDS:
            assert isinstance(r[f], (int, float)) and math.isfinite(r[f]), f"step {r['step']}: {f} = {r[f]!r}"
        assert r["train_loss"] > 0 and r["grad_norm"] > 0
        assert math.isclose(r["lr"], expected_lr(r["step"]), rel_tol=1e-12, abs_tol=1e-18), (r["step"], r["lr"])
        assert r["tokens_per_sec"] > 0 and r["wall_ms"] > 0
        # tokens/s is the global batch (2 ranks x 4 x 256, counted here) over the step's wall time.
        assert rel_close(r["tokens_per_sec"] * r["wall_ms"] / 1000, TOKENS_PER_STEP, 1e-9)
        assert 0 <= r["gpu_util_pct"] <= 100
        assert len(r["gpu_util_per_rank"]) == RANKS
        assert r["tokens_seen"] == (r["step"] + 1) * TOKENS_PER_STEP
        assert r["epoch"] == r["step"] // PER_EPOCH
    # Hand-computed points of the schedule: 0 at step 0, 1/5 of the way up at step 1, the peak when
    # warmup ends, and a third of the cosine (cos(pi/3) = 1/2) at step 10: 1e-6 + 0.999e-3 * 0.75.
    by_step = {r["step"]: r["lr"] for r in rows}
    assert by_step[0] == 0.0
    assert rel_close(by_step[1], 2e-4, 1e-12)
    assert rel_close(by_step[WARMUP], 1e-3, 1e-12)
    assert rel_close(by_step[10], 7.5025e-4, 1e-12)


def test_run_directory_holds_the_resolved_config(ds_run, builtin_dataset, config_target_met, work, capsys):
    """config.yaml is what --dry-run resolves for the same flags; ds_config.json is the shipped CPU config, filled."""
    assert ds_run.returncode == 0, ds_run.tail()
    written = yaml.safe_load((ds_run.run_dir / "config.yaml").read_text())
    # A dry run refuses a directory that holds a run: resolve the same flags for a fresh one.
    assert pretrain_main([*base_args(builtin_dataset, config_target_met), "--output-dir", str(work / "dry"), "--dry-run"]) == 0
    dry = yaml.safe_load(capsys.readouterr().out)
    assert written == {**dry, "output_dir": str(ds_run.run_dir)}
    # ...and that resolution is the flags, the YAML and the defaults README documents.
    assert {k: written[k] for k in (
        "model", "batch_size", "seq_length", "total_steps", "steps_per_epoch", "warmup_steps", "lr_max", "lr_min",
        "seed", "grad_clip", "val_batches", "target_val_loss", "regime",
    )} == {
        "model": "tiny", "batch_size": BATCH, "seq_length": SEQ, "total_steps": STEPS, "steps_per_epoch": PER_EPOCH,
        "warmup_steps": WARMUP, "lr_max": LR_MAX, "lr_min": LR_MIN, "seed": 42, "grad_clip": GRAD_CLIP,
        "val_batches": 2, "target_val_loss": 100.0, "regime": "from-scratch",
    }
    written_ds = json.loads((ds_run.run_dir / "ds_config.json").read_text())
    shipped = json.loads((REPO / "albor" / "ds_configs" / "zero2-cpu-fp32.json").read_text())
    assert sorted(k for k, v in shipped.items() if v == "auto") == [
        "gradient_clipping", "train_batch_size", "train_micro_batch_size_per_gpu",
    ]
    assert written_ds == {
        **shipped,
        "train_micro_batch_size_per_gpu": BATCH,
        "train_batch_size": BATCH * shipped["gradient_accumulation_steps"] * RANKS,
        "gradient_clipping": GRAD_CLIP,
    }


def test_two_ranks_match_one_process_on_the_same_global_batch(ds_run, single_run):
    assert ds_run.returncode == 0, ds_run.tail()
    assert single_run.returncode == 0, single_run.tail()
    multi, single = ds_run.metrics(), single_run.metrics()
    assert [r["step"] for r in single] == list(range(STEPS))
    for m, s in zip(multi, single, strict=True):
        # Summation order differs (two 1024-token means vs one 2048-token mean): ~1e-7 apart in practice.
        assert rel_close(m["train_loss"], s["train_loss"], 1e-4), (m["step"], m["train_loss"], s["train_loss"])
        assert rel_close(m["grad_norm"], s["grad_norm"], 1e-4), (m["step"], m["grad_norm"], s["grad_norm"])
        assert m["lr"] == s["lr"]
        assert m["tokens_seen"] == s["tokens_seen"]
    for epoch in range(EPOCHS):
        assert rel_close(ds_run.metadata(epoch)["val_loss"], single_run.metadata(epoch)["val_loss"], 1e-4)
        assert single_run.metadata(epoch)["world_size"] == 1


def test_one_checkpoint_and_metadata_per_epoch(ds_run):
    assert ds_run.returncode == 0, ds_run.tail()
    rows = ds_run.metrics()
    ckpt = ds_run.run_dir / "ckpt"
    assert sorted(p.name for p in ckpt.glob("epoch-*.metadata.json")) == [
        f"epoch-{e:03d}.metadata.json" for e in range(EPOCHS)
    ]
    for epoch in range(EPOCHS):
        meta = ds_run.metadata(epoch)
        missing = [f for f in METADATA_FIELDS if f not in meta]
        assert not missing, f"epoch {epoch}: missing {missing}"
        assert meta["epoch"] == epoch
        assert re.fullmatch(r"[0-9a-f]{64}", meta["optimizer_state_sha"]), meta["optimizer_state_sha"]
        assert meta["world_size"] == RANKS
        assert meta["tokens_seen"] == (epoch + 1) * PER_EPOCH * TOKENS_PER_STEP
        losses = [r["train_loss"] for r in rows if r["epoch"] == epoch]
        assert rel_close(meta["train_loss"], sum(losses) / len(losses), 1e-9)
        assert meta["grad_norm_max"] == max(r["grad_norm"] for r in rows if r["epoch"] == epoch)
        assert math.isfinite(meta["val_loss"]) and rel_close(meta["val_ppl"], math.exp(meta["val_loss"]), 1e-6)
        apr = ckpt / f"epoch-{epoch:03d}.apr"
        assert apr.is_file() and apr.read_bytes()[:4] == b"APR\x00"
    assert ds_run.metadata(0)["optimizer_state_sha"] != ds_run.metadata(1)["optimizer_state_sha"]


# ── checkpoint artifacts, checked against DeepSpeed's own files ─────────────


def recompute_optimizer_sha(tag_dir: Path, world_size: int) -> str:
    """The optimizer-state sha rebuilt from DeepSpeed's shard files alone, as docs/checkpoints.md defines it.

    The stream: every ZeRO param group's fp32 master weights, then every group's
    Adam exp_avg, then every group's exp_avg_sq, each group its ranks' partitions
    in rank order without the alignment padding, as raw little-endian float32.
    It is cut into chunks of 2^16 elements; the sha is sha256 over a header,
    the chunk size and the stream's length (u64 LE each), and the chunks'
    sha256 digests. The padding is derived as DeepSpeed partitions a group: its
    unpadded size (the parameter shapes in the model-states file) cut into
    equal partitions, one per rank, the padding at the end.
    """
    model_states = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
    group_numel = [sum(math.prod(shape) for shape in group.values()) for group in model_states["param_shapes"]]
    sections: dict[str, list[list[torch.Tensor]]] = {
        name: [[] for _ in group_numel] for name in ("master", "exp_avg", "exp_avg_sq")
    }
    for rank in range(world_size):
        shard = tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        osd = torch.load(shard, weights_only=False, map_location="cpu")["optimizer_state_dict"]
        assert osd["partition_count"] == [world_size] * len(group_numel), osd["partition_count"]
        base = osd["base_optimizer_state"]  # the inner AdamW's state_dict(): padded moments
        for i, master in enumerate(osd["single_partition_of_fp32_groups"]):
            partition = master.numel() + osd["group_paddings"][i]  # DeepSpeed saves the master unpadded
            real = max(0, min(partition, group_numel[i] - rank * partition))
            assert master.numel() == real, (rank, i, master.numel(), real)
            moments = base["state"][base["param_groups"][i]["params"][0]]
            sections["master"][i].append(master)
            sections["exp_avg"][i].append(moments["exp_avg"][:real])
            sections["exp_avg_sq"][i].append(moments["exp_avg_sq"][:real])
    tensors = [t for groups in sections.values() for group in groups for t in group]
    assert all(t.dtype == torch.float32 for t in tensors)
    stream = b"".join(t.detach().contiguous().numpy().astype("<f4").tobytes() for t in tensors)
    total = len(stream) // 4
    assert total == 3 * sum(group_numel)  # the partitions cover every parameter once, in each section
    h = hashlib.sha256(b"albor-optimizer-state-v2\n" + struct.pack("<QQ", SHA_CHUNK, total))
    for at in range(0, len(stream), 4 * SHA_CHUNK):
        h.update(hashlib.sha256(stream[at : at + 4 * SHA_CHUNK]).digest())
    return h.hexdigest()


def test_optimizer_state_sha_is_recomputed_from_the_deepspeed_shards(ds_run):
    assert ds_run.returncode == 0, ds_run.tail()
    ds_dir = ds_run.run_dir / "ckpt" / "deepspeed"
    kept = sorted(p.name for p in ds_dir.glob("epoch-*"))
    assert kept == [f"epoch-{e:03d}" for e in range(EPOCHS)]
    for epoch in range(EPOCHS):
        tag_dir = ds_dir / f"epoch-{epoch:03d}"
        assert recompute_optimizer_sha(tag_dir, RANKS) == ds_run.metadata(epoch)["optimizer_state_sha"], epoch
        # What was hashed is a real Adam state after this epoch's steps, at the schedule's lr.
        osd = torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
        base = osd["optimizer_state_dict"]["base_optimizer_state"]
        last_step = (epoch + 1) * PER_EPOCH - 1
        for i, group in enumerate(base["param_groups"]):
            assert int(base["state"][i]["step"]) == last_step + 1
            assert base["state"][i]["exp_avg_sq"].abs().sum() > 0
            assert math.isclose(group["lr"], expected_lr(last_step), rel_tol=1e-12)


def test_apr_holds_deepspeeds_consolidated_weights_bit_for_bit(ds_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    assert ds_run.returncode == 0, ds_run.tail()
    for epoch in range(EPOCHS):
        meta, tensors = read_apr(ds_run.run_dir / "ckpt" / f"epoch-{epoch:03d}.apr")
        assert meta["epoch"] == epoch
        consolidated = get_fp32_state_dict_from_zero_checkpoint(
            str(ds_run.run_dir / "ckpt" / "deepspeed"), tag=f"epoch-{epoch:03d}"
        )
        # The module's names are Hugging Face's; the .apr leaves out the tied head, as save_pretrained does.
        assert meta["tie_word_embeddings"] is True
        assert set(consolidated) == set(tensors) | {"lm_head.weight"}
        assert torch.equal(consolidated["lm_head.weight"], consolidated["model.embed_tokens.weight"])
        for name, t in tensors.items():
            assert t.dtype == consolidated[name].dtype == torch.float32, name
            assert torch.equal(t, consolidated[name]), f"epoch {epoch}: {name} differs from DeepSpeed's state"


def test_apr_loads_into_transformers_with_albors_logits(ds_run):
    import transformers

    assert ds_run.returncode == 0, ds_run.tail()
    meta, tensors = read_apr(ds_run.run_dir / "ckpt" / f"epoch-{EPOCHS - 1:03d}.apr")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=meta["vocab_size"], hidden_size=meta["hidden_size"], intermediate_size=meta["intermediate_size"],
        num_hidden_layers=meta["num_layers"], num_attention_heads=meta["num_heads"],
        num_key_value_heads=meta["num_kv_heads"], head_dim=meta["head_dim"], hidden_act="silu",
        max_position_embeddings=meta["max_position_embeddings"], rms_norm_eps=meta["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": meta["rope_theta"]},
        tie_word_embeddings=meta["tie_word_embeddings"], attention_bias=False, mlp_bias=False,
        attn_implementation="eager",
    ))
    hf.load_state_dict({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, strict=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ours = AlborLlama(ModelConfig(
        hidden_size=meta["hidden_size"], num_layers=meta["num_layers"], num_heads=meta["num_heads"],
        num_kv_heads=meta["num_kv_heads"], head_dim=meta["head_dim"], intermediate_size=meta["intermediate_size"],
        rms_norm_eps=meta["rms_norm_eps"], rope_theta=meta["rope_theta"], vocab_size=meta["vocab_size"],
        max_position_embeddings=meta["max_position_embeddings"], tie_embeddings=meta["tie_word_embeddings"],
    ))
    load_hf_state_dict(ours, tensors)
    ids = torch.randint(0, meta["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids).logits
        got = ours.eval()(ids)
    assert ref.dtype == got.dtype == torch.float32
    assert (got - ref).abs().max().item() <= 1e-4


# ── faults and divergence ────────────────────────────────────────────────────


def test_nan_on_one_rank_aborts_every_rank_with_12(albor_launch, builtin_dataset, config_default_target, work):
    run = fault_run(albor_launch, builtin_dataset, config_default_target, work, "nan:1:3")
    assert run.returncode == 12, run.tail()
    assert run.exit_codes() == {0: 12, 1: 12}, run.tail()
    assert launcher_codes(run.output) and set(launcher_codes(run.output)) == {12}, run.tail()
    assert [r["step"] for r in run.metrics()] == [0, 1, 2]  # gate 007: step 3 never logged
    assert_no_epoch_zero_files(run.run_dir)
    status = run.status()
    assert status["status"] == "aborted"
    assert status["exit_code"] == 12
    assert status["reason"] == "numerical_instability"
    assert status["abort"]["step"] == 3
    assert status["abort"]["ranks"] == [1]
    assert status["abort"]["field"] == "train_loss"


def test_exception_on_one_rank_ends_every_rank_with_14(albor_launch, builtin_dataset, config_default_target, work):
    run = fault_run(albor_launch, builtin_dataset, config_default_target, work, "raise:1:3")
    assert run.returncode == 14, run.tail()
    assert run.exit_codes() == {0: 14, 1: 14}, run.tail()
    assert "InjectedFault" in run.output  # the failing rank's own traceback reached the log
    assert [r["step"] for r in run.metrics()] == [0, 1, 2]
    assert_no_epoch_zero_files(run.run_dir)
    status = run.status()
    assert status["status"] == "aborted"
    assert status["exit_code"] == 14
    assert status["reason"] == "rank_failure"
    assert status["abort"]["ranks"] == [1]
    assert status["abort"]["step"] == 3
    # The flag path: every rank learned of rank 1's exception in the step's own all-reduce.
    assert "exception on rank(s) 1;" in status["abort"]["message"], status["abort"]["message"]
    assert_no_timeout(status["abort"]["message"])


def shared_memory_left(run) -> list[str]:
    """DeepSpeed's CPU all-reduce segments named by this launch's port (it never unlinks them)."""
    port = run.argv[run.argv.index("--master_port") + 1]
    return sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_no_rank_leaves_a_shared_memory_segment(ds_run):
    # 66 MB a rank a run, leaked into /dev/shm until it filled: albor keeps DeepSpeed from mapping it.
    assert shared_memory_left(ds_run) == []


def test_killed_rank_ends_the_survivor_with_14(albor_launch, builtin_dataset, config_default_target, work):
    run = fault_run(albor_launch, builtin_dataset, config_default_target, work, "kill:1:3")
    assert run.returncode != 0, run.tail()
    # The launcher reports the first dead rank it polls: rank 1's SIGKILL, or rank 0's RANK_FAILURE...
    assert launcher_codes(run.output) and set(launcher_codes(run.output)) <= {-9, 14}, run.tail()
    # ...but each rank's own record says what happened: rank 1 died without one, rank 0 ended with 14
    # (even though the launcher SIGTERMs it once it sees rank 1 gone).
    assert run.exit_codes() == {0: 14}, run.tail()
    assert [r["step"] for r in run.metrics()] == [0, 1, 2]
    assert_no_epoch_zero_files(run.run_dir)
    status = run.status()
    assert status["status"] == "aborted"
    assert status["exit_code"] == 14
    assert status["reason"] == "rank_failure"
    assert status["abort"]["step"] == 3
    message = status["abort"]["message"]
    # The exit path: rank 0's collective failed because rank 1's connection went away (gloo says
    # "closed by peer" or "reset by peer", whichever the socket saw first), not by a timeout;
    # and the survivor is not the rank blamed.
    assert message.startswith("lost a peer rank during a collective"), message
    assert "closed by peer" in message or "reset by peer" in message, message
    assert_no_timeout(message)
    assert 0 not in status["abort"]["ranks"], status["abort"]
    assert shared_memory_left(run) == []


def test_validation_spike_on_one_rank_ends_every_rank_with_exactly_10(
    albor_launch, builtin_dataset, config_default_target, work, ds_run
):
    # Gate 005's doubling rule on a real run: rank 1's share of epoch 1's val loss x10 (README: fault drill).
    run = fault_run(albor_launch, builtin_dataset, config_default_target, work, "val-spike:1:1")
    assert run.returncode == 10, run.tail()
    assert run.exit_codes() == {0: 10, 1: 10}, run.tail()
    assert launcher_codes(run.output) and set(launcher_codes(run.output)) == {10}, run.tail()
    assert [r["step"] for r in run.metrics()] == list(range(STEPS))  # epoch 1 trained whole, then validated
    status = run.status()
    assert status["status"] == "aborted"
    assert status["exit_code"] == 10
    assert status["reason"] == "divergence"
    assert status["abort"]["epoch"] == 1
    epoch0 = run.metadata(0)
    assert status["abort"]["value"] > 2.0 * epoch0["val_loss"]
    # Epoch 0's checkpoint is intact and untouched by the drill; epoch 1 left nothing.
    assert epoch_files(run.run_dir) == ["deepspeed/epoch-000", "epoch-000.apr", "epoch-000.metadata.json"]
    assert (run.run_dir / "ckpt" / "deepspeed" / "latest").read_text().strip() == "epoch-000"
    assert epoch0["val_loss"] == ds_run.metadata(0)["val_loss"]  # the same training as the happy path
    tag_dir = run.run_dir / "ckpt" / "deepspeed" / "epoch-000"
    assert recompute_optimizer_sha(tag_dir, RANKS) == epoch0["optimizer_state_sha"]


@pytest.mark.parametrize(
    ("lr_max", "code"),
    [
        pytest.param("1e4", 12, id="lr1e4"),  # measured: grad_norm inf at step 1 (gate 007)
        pytest.param("1.0", 11, id="lr1"),  # measured: epoch-0 val_loss ~85 > 2 ln(4096) = 16.6 (gate 005)
    ],
)
def test_absurd_learning_rate_diverges_and_aborts_every_rank(
    albor_launch, builtin_dataset, config_default_target, work, lr_max, code
):
    # No fault drill: a real blow-up, caught by the gate that sees it first (deterministic: gate 006).
    args = [*base_args(builtin_dataset, config_default_target), "--lr-max", lr_max, "--warmup-steps", "0"]
    run = albor_launch("deepspeed", args, work / f"diverge-{lr_max}", env=DRILL_ENV)
    assert "FAULT DRILL" not in run.output
    assert run.returncode == code, run.tail()
    assert run.exit_codes() == {0: code, 1: code}, run.tail()
    assert launcher_codes(run.output) and set(launcher_codes(run.output)) == {code}, run.tail()
    status = run.status()
    assert status["status"] == "aborted"
    assert status["exit_code"] == code
    rows = run.metrics()
    for r in rows:  # gate 007: nothing non-finite was ever logged
        assert all(math.isfinite(r[f]) for f in STEP_FIELDS), r
    if code == 12:
        assert status["reason"] == "numerical_instability"
        assert status["abort"]["step"] == 1 and status["abort"]["field"] == "grad_norm"
        assert [r["step"] for r in rows] == [0]
    else:
        assert status["reason"] == "divergence_at_epoch_zero"
        assert status["abort"]["epoch"] == 0
        assert status["abort"]["value"] > 2 * math.log(4096)
        assert [r["step"] for r in rows] == list(range(PER_EPOCH))
    # Gate 002: the failed epoch 0 left no checkpoint or metadata.
    assert epoch_files(run.run_dir) == []


# ── reproducibility (gate 006) ──────────────────────────────────────────────


def test_other_seed_gives_another_optimizer_state(ds_run, ds_other_seed):
    assert ds_run.returncode == 0, ds_run.tail()
    assert ds_other_seed.returncode == 4, ds_other_seed.tail()
    assert ds_run.metrics()[0]["train_loss"] != ds_other_seed.metrics()[0]["train_loss"]  # another init
    for epoch in range(EPOCHS):
        assert ds_run.metadata(epoch)["optimizer_state_sha"] != ds_other_seed.metadata(epoch)["optimizer_state_sha"]


# ── torchrun ────────────────────────────────────────────────────────────────


def test_torchrun_matches_deepspeed(ds_run, torchrun_run):
    assert torchrun_run.returncode == 0, torchrun_run.tail()
    assert ds_run.returncode == 0, ds_run.tail()
    a, b = ds_run.metrics(), torchrun_run.metrics()
    assert [r["step"] for r in b] == list(range(STEPS))
    for x, y in zip(a, b, strict=True):
        for f in ("train_loss", "grad_norm", "lr"):
            assert rel_close(x[f], y[f], 1e-6) or x[f] == y[f], f"step {x['step']}: {f} {x[f]!r} vs {y[f]!r}"
    for epoch in range(EPOCHS):
        assert torchrun_run.metadata(epoch)["world_size"] == RANKS
        assert torchrun_run.metadata(epoch)["optimizer_state_sha"] == ds_run.metadata(epoch)["optimizer_state_sha"]
    assert torchrun_run.status()["exit_code"] == 0 and torchrun_run.status()["target_met"] is True
    assert torchrun_run.exit_codes() == {0: 0, 1: 0}  # torchrun reports only 0/1: the records say more


# ── the abort-together rule on harder paths ──────────────────────────────────


def test_exception_with_many_zero_buckets_still_ends_every_rank_with_14(
    albor_launch, builtin_dataset, config_default_target, work
):
    """The failing rank's zero-gradient backward must fill the same ZeRO buckets as its peers'."""
    ds = work / "small-buckets.json"
    ds.write_text(
        '{"zero_optimization": {"stage": 2, "reduce_bucket_size": 100000, "allgather_bucket_size": 100000},'
        ' "steps_per_print": 1000000000}'
    )
    args = base_args(builtin_dataset, config_default_target) + ["--ds-config", str(ds)]
    run = albor_launch("deepspeed", args, work / "raise-small-buckets", env={**DRILL_ENV, "ALBOR_FAULT": "raise:1:3"})
    assert run.returncode == 14, run.tail()
    assert run.exit_codes() == {0: 14, 1: 14}, run.tail()
    status = run.status()
    assert status["abort"]["ranks"] == [1] and [r["step"] for r in run.metrics()] == [0, 1, 2]
    # A bucket mismatch would hang the reduction until the step timeout; this was the flag path.
    assert "exception on rank(s) 1;" in status["abort"]["message"], status["abort"]["message"]
    assert_no_timeout(status["abort"]["message"])


def test_checkpoint_failure_on_rank_0_stops_every_rank_with_5(albor_launch, builtin_dataset, config_default_target, work):
    run_dir = work / "ckpt-fails"
    (run_dir / "ckpt" / "epoch-000.apr").mkdir(parents=True)  # rank 0 cannot write its .apr there
    run = albor_launch("deepspeed", base_args(builtin_dataset, config_default_target), run_dir, env=DRILL_ENV)
    assert run.returncode == 5, run.tail()
    assert run.exit_codes() == {0: 5, 1: 5}, run.tail()
    status = run.status()
    assert status["reason"] == "checkpoint_failed" and status["abort"]["epoch"] == 0
    assert "rank(s) 0" in status["abort"]["message"]
    assert_no_timeout(status["abort"]["message"])
    assert not (run_dir / "ckpt" / "epoch-000.metadata.json").exists()
    assert not (run_dir / "ckpt" / "deepspeed" / "epoch-000").exists()  # rank 1's shard of it was removed too
    assert len(run.metrics()) == PER_EPOCH


def test_gate_006_first_100_steps_identical_in_dev_mode(albor_launch, builtin_dataset, work):
    """The contract's own horizon: 100 steps, same seed, ≤ 1e-6 (here: bit-identical)."""
    cfg = work / "hundred.yaml"
    cfg.write_text("val_batches: 1\ntarget_val_loss: 100.0\n")
    args = [
        "--dataset", str(builtin_dataset), "--model", "tiny", "--config", str(cfg), "--mode", "from-scratch",
        "--total-steps", "100", "--steps-per-epoch", "100", "--batch-size", "2", "--seq-length", "64",
        "--warmup-steps", "10", "--lr-max", "1e-3",
    ]
    a = albor_launch("python", args, work / "hundred-a")
    b = albor_launch("python", args, work / "hundred-b")
    assert a.returncode == b.returncode == 0, a.tail() + b.tail()
    ma, mb = a.metrics(), b.metrics()
    assert len(ma) == len(mb) == 100
    for x, y in zip(ma, mb, strict=True):
        assert (x["train_loss"], x["grad_norm"], x["lr"]) == (y["train_loss"], y["grad_norm"], y["lr"]), x["step"]
    assert ma[-1]["train_loss"] < ma[0]["train_loss"]  # it trained: the comparison is not of constants
    assert a.metadata(0)["optimizer_state_sha"] == b.metadata(0)["optimizer_state_sha"]


def test_checkpoint_failure_inside_deepspeeds_save_on_rank_1(albor_launch, builtin_dataset, config_default_target, work):
    """Rank 1's optimizer shard cannot be written: DeepSpeed's own barriers must still line up."""
    run_dir = work / "shard-fails"
    shard = run_dir / "ckpt" / "deepspeed" / "epoch-000" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.mkdir(parents=True)  # a directory where rank 1's file must go
    run = albor_launch("deepspeed", base_args(builtin_dataset, config_default_target), run_dir, env=DRILL_ENV)
    assert run.returncode == 5, run.tail()
    assert run.exit_codes() == {0: 5, 1: 5}, run.tail()
    status = run.status()
    assert status["reason"] == "checkpoint_failed" and "rank(s) 1" in status["abort"]["message"]
    # A barrier left waiting would have ended the run at the 60 s timeout, as a rank failure (14).
    assert_no_timeout(status["abort"]["message"])
    assert_no_epoch_zero_files(run_dir)
