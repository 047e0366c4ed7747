"""Real multi-process runs: 2 CPU ranks (gloo) of the tiny model on the builtin corpus.

Each launch costs ~10-15 s, so runs are module-scoped and shared between the
tests that read them: one deepspeed happy-path run serves the contract,
checkpoint, single-process parity, reproducibility and torchrun tests.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from albor.schedule import lr_at

pytestmark = pytest.mark.multiproc

RANKS, BATCH, SEQ = 2, 4, 256
STEPS, PER_EPOCH = 20, 10
EPOCHS = STEPS // PER_EPOCH
TOKENS_PER_STEP = RANKS * BATCH * SEQ  # the global batch
LR_MAX, LR_MIN, WARMUP = 1e-3, 1e-6, 5  # lr_min: the config default
STEP_FIELDS = ("step", "train_loss", "grad_norm", "lr", "tokens_per_sec", "gpu_util_pct", "wall_ms")
METADATA_FIELDS = (
    "epoch", "train_loss", "val_loss", "train_ppl", "val_ppl", "optimizer_state_sha",
    "wall_seconds", "tokens_seen", "grad_norm_max",
)
FAST_FAILURE_S = 60.0  # a dead or failing rank must end the job this fast, startup included


def base_args(dataset: Path, config: Path, *, batch: int = BATCH, seed: int | None = None) -> list[str]:
    args = [
        "--dataset", str(dataset), "--model", "tiny", "--config", str(config), "--mode", "from-scratch",
        "--total-steps", str(STEPS), "--steps-per-epoch", str(PER_EPOCH), "--batch-size", str(batch),
        "--seq-length", str(SEQ), "--warmup-steps", str(WARMUP), "--lr-max", str(LR_MAX),
    ]
    if seed is not None:
        args += ["--seed", str(seed)]
    return args


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


@pytest.fixture(scope="module")
def ds_run(albor_launch, builtin_dataset, config_target_met, work):
    return albor_launch("deepspeed", base_args(builtin_dataset, config_target_met), work / "ds")


@pytest.fixture(scope="module")
def ds_rerun(albor_launch, builtin_dataset, config_target_met, work):
    return albor_launch("deepspeed", base_args(builtin_dataset, config_target_met), work / "ds-rerun")


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
    return albor_launch("deepspeed", base_args(dataset, config), work / name, env={"ALBOR_FAULT": fault})


def rel_close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def aborted_ranks(output: str) -> dict[int, int]:
    """{rank: exit code} from each rank's own 'ABORTED (exit N)' line."""
    return {int(r): int(c) for r, c in re.findall(r"\[albor r(\d+)\] ABORTED \(exit (\d+)\)", output)}


def launcher_codes(output: str) -> list[int]:
    """Every rank exit code the deepspeed launcher reported."""
    return [int(c) for c in re.findall(r"exits with return code = (-?\d+)", output)]


def assert_no_epoch_zero_files(run_dir: Path) -> None:
    left = sorted(p.name for p in (run_dir / "ckpt").glob("epoch-000.*")) if (run_dir / "ckpt").exists() else []
    assert left == [], f"an aborted epoch left files behind: {left}"


# ── 1. happy path ──────────────────────────────────────────────────────────


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


def test_happy_path_exits_4_when_a_short_run_misses_the_target(ds_other_seed):
    # 20 steps of a 1.8M-parameter model end near val_loss 7.4, far above the from-scratch
    # target 3.0: "finished, target missed" is the truthful outcome, and it is exit 4.
    assert ds_other_seed.returncode == 4, ds_other_seed.tail()
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
        assert r["lr"] == lr_at(r["step"], lr_max=LR_MAX, lr_min=LR_MIN, warmup_steps=WARMUP, total_steps=STEPS)
        assert r["tokens_per_sec"] > 0 and r["wall_ms"] > 0
        assert rel_close(r["tokens_per_sec"] * r["wall_ms"] / 1000, TOKENS_PER_STEP, 1e-9)
        assert 0 <= r["gpu_util_pct"] <= 100
        assert len(r["gpu_util_per_rank"]) == RANKS
        assert r["tokens_seen"] == (r["step"] + 1) * TOKENS_PER_STEP
        assert r["epoch"] == r["step"] // PER_EPOCH


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
        assert meta["optimizer_state_sha_source"] == "optimizer"
        assert meta["world_size"] == RANKS
        assert meta["tokens_seen"] == (epoch + 1) * PER_EPOCH * TOKENS_PER_STEP
        losses = [r["train_loss"] for r in rows if r["epoch"] == epoch]
        assert rel_close(meta["train_loss"], sum(losses) / len(losses), 1e-9)
        assert meta["grad_norm_max"] == max(r["grad_norm"] for r in rows if r["epoch"] == epoch)
        assert math.isfinite(meta["val_loss"]) and rel_close(meta["val_ppl"], math.exp(meta["val_loss"]), 1e-6)
        apr = ckpt / f"epoch-{epoch:03d}.apr"
        assert apr.is_file() and apr.read_bytes()[:4] == b"APR\x00"
    assert ds_run.metadata(0)["optimizer_state_sha"] != ds_run.metadata(1)["optimizer_state_sha"]


# ── 2-4, 6. faults and divergence ───────────────────────────────────────────


def test_nan_on_one_rank_aborts_every_rank_with_12(albor_launch, builtin_dataset, config_default_target, work):
    run = fault_run(albor_launch, builtin_dataset, config_default_target, work, "nan:1:3")
    assert run.returncode == 12, run.tail()
    assert aborted_ranks(run.output) == {0: 12, 1: 12}, run.tail()
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


def test_exception_on_one_rank_ends_the_job_fast_with_14(albor_launch, builtin_dataset, config_default_target, work):
    run = fault_run(albor_launch, builtin_dataset, config_default_target, work, "raise:1:3")
    assert run.returncode == 14, run.tail()
    assert run.elapsed < FAST_FAILURE_S, run.tail()
    assert aborted_ranks(run.output) == {0: 14, 1: 14}, run.tail()
    assert "InjectedFault" in run.output  # the failing rank's own traceback reached the log
    assert [r["step"] for r in run.metrics()] == [0, 1, 2]
    assert_no_epoch_zero_files(run.run_dir)
    status = run.status()
    assert status["exit_code"] == 14
    assert status["reason"] == "rank_failure"
    assert status["abort"]["ranks"] == [1]
    assert status["abort"]["step"] == 3
    assert "rank(s) 1" in status["abort"]["message"]


@pytest.mark.parametrize(
    "lr_max",
    [
        pytest.param("1e4", id="lr1e4"),  # measured: grad_norm inf at step 1 -> 12 (gate 007)
        pytest.param("1.0", id="lr1"),  # measured: epoch-0 val_loss ~69 > 2 ln(4096) -> 11 (gate 005)
    ],
)
def test_absurd_learning_rate_diverges_and_aborts_every_rank(
    albor_launch, builtin_dataset, config_default_target, work, lr_max
):
    # No fault drill: a real blow-up, caught by whichever gate sees it first.
    args = [*base_args(builtin_dataset, config_default_target), "--lr-max", lr_max, "--warmup-steps", "0"]
    run = albor_launch("deepspeed", args, work / f"diverge-{lr_max}")
    assert "FAULT DRILL" not in run.output
    assert run.returncode in (10, 11, 12), run.tail()
    assert aborted_ranks(run.output) == {0: run.returncode, 1: run.returncode}, run.tail()
    assert launcher_codes(run.output) and set(launcher_codes(run.output)) == {run.returncode}, run.tail()
    status = run.status()
    assert status["status"] == "aborted"
    assert status["exit_code"] == run.returncode
    expected = {10: "divergence", 11: "divergence_at_epoch_zero", 12: "numerical_instability"}[run.returncode]
    assert status["reason"] == expected
    rows = run.metrics()
    assert [r["step"] for r in rows] == list(range(len(rows))) and len(rows) < STEPS
    for r in rows:  # gate 007: nothing non-finite was ever logged
        assert all(math.isfinite(r[f]) for f in STEP_FIELDS), r
    abort = status["abort"]
    if run.returncode == 12:  # a step-level abort names its step
        failed_epoch = abort["step"] // PER_EPOCH
        assert len(rows) == abort["step"]
    else:  # gate 005 names its epoch, after the whole epoch trained
        failed_epoch = abort["epoch"]
        assert (failed_epoch == 0) == (run.returncode == 11)
        assert len(rows) == (failed_epoch + 1) * PER_EPOCH
    # Gate 002: no checkpoint or metadata for the epoch that failed, nor any later one.
    ckpt = run.run_dir / "ckpt"
    written = sorted(p.name for p in ckpt.glob("epoch-*.*")) if ckpt.exists() else []
    assert [n for n in written if int(n[len("epoch-"):][:3]) >= failed_epoch] == [], written


def test_killed_rank_ends_the_job_fast(albor_launch, builtin_dataset, config_default_target, work):
    run = fault_run(albor_launch, builtin_dataset, config_default_target, work, "kill:1:3")
    assert run.returncode != 0, run.tail()
    assert run.elapsed < FAST_FAILURE_S, run.tail()
    # The launcher reports the first dead rank it polls: rank 1's SIGKILL, or rank 0's RANK_FAILURE.
    assert launcher_codes(run.output) and set(launcher_codes(run.output)) <= {-9, 14}, run.tail()
    assert [r["step"] for r in run.metrics()] == [0, 1, 2]
    assert_no_epoch_zero_files(run.run_dir)
    # Whether rank 0 writes its RANK_FAILURE status before the launcher kills it is a race:
    # check status.json only when it got past "running".
    status = run.status()
    if status["status"] != "running":
        assert status["exit_code"] == 14 and status["reason"] == "rank_failure"


# ── 5. reproducibility (gate 006) ───────────────────────────────────────────


def test_same_seed_is_bit_identical(ds_run, ds_rerun):
    assert ds_run.returncode == 0, ds_run.tail()
    assert ds_rerun.returncode == 0, ds_rerun.tail()
    a, b = ds_run.metrics(), ds_rerun.metrics()
    assert len(a) == len(b) == STEPS
    for x, y in zip(a, b, strict=True):
        for f in ("train_loss", "grad_norm", "lr"):
            assert x[f] == y[f], f"step {x['step']}: {f} {x[f]!r} != {y[f]!r}"
    for epoch in range(EPOCHS):
        assert ds_run.metadata(epoch)["optimizer_state_sha"] == ds_rerun.metadata(epoch)["optimizer_state_sha"]
        assert ds_run.metadata(epoch)["val_loss"] == ds_rerun.metadata(epoch)["val_loss"]


def test_other_seed_gives_another_optimizer_state(ds_run, ds_other_seed):
    assert ds_run.returncode == 0, ds_run.tail()
    assert ds_other_seed.returncode == 4, ds_other_seed.tail()
    assert ds_run.metrics()[0]["train_loss"] != ds_other_seed.metrics()[0]["train_loss"]  # another init
    for epoch in range(EPOCHS):
        assert ds_run.metadata(epoch)["optimizer_state_sha"] != ds_other_seed.metadata(epoch)["optimizer_state_sha"]


# ── 7. torchrun ─────────────────────────────────────────────────────────────


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


# ── the abort-together rule on harder paths ──────────────────────────────────


def test_exception_with_many_zero_buckets_still_ends_fast(albor_launch, builtin_dataset, config_default_target, work):
    """The failing rank's zero-gradient backward must fill the same ZeRO buckets as its peers'."""
    ds = work / "small-buckets.json"
    ds.write_text(
        '{"zero_optimization": {"stage": 2, "reduce_bucket_size": 100000, "allgather_bucket_size": 100000},'
        ' "steps_per_print": 1000000000}'
    )
    args = base_args(builtin_dataset, config_default_target) + ["--ds-config", str(ds)]
    run = albor_launch("deepspeed", args, work / "raise-small-buckets", env={"ALBOR_FAULT": "raise:1:3"})
    assert run.returncode == 14, run.tail()
    assert run.elapsed < FAST_FAILURE_S, run.tail()
    assert aborted_ranks(run.output) == {0: 14, 1: 14}, run.tail()
    assert run.status()["abort"]["ranks"] == [1] and [r["step"] for r in run.metrics()] == [0, 1, 2]


def test_checkpoint_failure_on_rank_0_stops_every_rank_with_5(albor_launch, builtin_dataset, config_default_target, work):
    run_dir = work / "ckpt-fails"
    (run_dir / "ckpt" / "epoch-000.apr").mkdir(parents=True)  # rank 0 cannot write its .apr there
    run = albor_launch("deepspeed", base_args(builtin_dataset, config_default_target), run_dir)
    assert run.returncode == 5, run.tail()
    assert aborted_ranks(run.output) == {0: 5, 1: 5}, run.tail()
    status = run.status()
    assert status["reason"] == "checkpoint_failed" and status["abort"]["epoch"] == 0
    assert "rank(s) 0" in status["abort"]["message"]
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
    run = albor_launch("deepspeed", base_args(builtin_dataset, config_default_target), run_dir)
    assert run.returncode == 5, run.tail()
    assert run.elapsed < FAST_FAILURE_S, run.tail()
    assert aborted_ranks(run.output) == {0: 5, 1: 5}, run.tail()
    status = run.status()
    assert status["reason"] == "checkpoint_failed" and "rank(s) 1" in status["abort"]["message"]
    assert_no_epoch_zero_files(run_dir)
    assert not (run_dir / "ckpt" / "deepspeed" / "epoch-000").exists()
