"""What a resume finds in ckpt/ and what it may do with it, on checkpoint trees built by hand.

The trees follow the layout a real run writes (docs/checkpoints.md): a
checkpoint counts only through its metadata marker, and only with its
DeepSpeed state (every rank's albor-rank-R.json in it) is it resumable.
"""

from __future__ import annotations

import json
import logging
import shlex
import types
from pathlib import Path

import pytest

from albor.errors import ConfigError, DataError, ExitCode
from albor.resume_plan import (
    RUN_KEYS,
    Debris,
    find_resume_point,
    launcher_command,
    remove_debris,
    resume_command,
    run_fields,
    scan_checkpoints,
    truncate_metrics,
)

RUN = {
    "model": "tiny", "seq_length": 64, "lr_max": 0.0003, "lr_min": 1e-06, "warmup_steps": 5, "total_steps": 100,
    "steps_per_epoch": 10, "global_batch": 32, "seed": 42, "dataset_fingerprint": "f" * 64, "vocab_multiple": 64,
}


def loop_state(step: int) -> dict:
    return {
        "next_step": step, "tokens_seen": step * 2048, "val_losses": [5.0], "best": 5.0, "epochs_without_improvement": 0,
        "epoch_losses": [], "epoch_grad_norm_max": 0.0, "epoch_wall_seconds": 0.0,
    }


def checkpoint(run_dir: Path, tag: str, *, step: int, epoch: int, world_size: int = 2, deepspeed: bool = True,
               apr: bool = True, meta: dict | None = None) -> Path:
    """Write the files a complete checkpoint has; returns its metadata path."""
    ckpt = run_dir / "ckpt"
    kind = "epoch" if tag.startswith("epoch-") else "preemption"
    overrides = meta or {}
    meta = {
        "kind": kind, "tag": tag, "step": step, "epoch": epoch, "world_size": world_size,
        "optimizer_state_sha": "0" * 64, "run": dict(RUN), "resume": loop_state(step),
        **({"train_loss": 5.1, "val_loss": 5.0, "model": "tiny", "dataset_fingerprint": RUN["dataset_fingerprint"]}
           if kind == "epoch" else {}),
        **overrides,
    }
    if kind == "epoch" and apr:
        write(ckpt / f"{tag}.apr", "APR2")
    if deepspeed:
        state(run_dir, tag, world_size)
    path = ckpt / f"{tag}.metadata.json"
    write(path, json.dumps(meta))
    return path


def state(run_dir: Path, tag: str, world_size: int = 2, ranks: range | None = None) -> Path:
    d = run_dir / "ckpt" / "deepspeed" / tag
    write(d / "mp_rank_00_model_states.pt", "pickle")
    for r in ranks if ranks is not None else range(world_size):
        write(d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", "pickle")
        write(d / f"albor-rank-{r}.json", "{}")
    return d


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def tags(checkpoints) -> list[str]:
    return [c.tag for c in checkpoints]


def debris_paths(scan, run_dir: Path) -> dict[str, str]:
    return {str(d.path.relative_to(run_dir / "ckpt")): d.reason for d in scan.debris}


# ── scan ────────────────────────────────────────────────────────────────
def test_the_newest_resumable_checkpoint_is_chosen_by_step(tmp_path):
    checkpoint(tmp_path, "epoch-000", step=10, epoch=0, deepspeed=False)  # pruned: its .apr stays a model file
    checkpoint(tmp_path, "epoch-001", step=20, epoch=1)
    checkpoint(tmp_path, "step-0000025", step=25, epoch=2)
    scan = scan_checkpoints(tmp_path)
    assert tags(scan.resumable) == ["epoch-001", "step-0000025"]
    assert tags(scan.complete_not_resumable) == ["epoch-000"] and scan.debris == []
    newest = find_resume_point(tmp_path, "auto")
    assert (newest.tag, newest.kind, newest.step, newest.epoch, newest.world_size) == ("step-0000025", "preemption", 25, 2, 2)
    assert newest.apr_path is None and newest.ds_dir == tmp_path / "ckpt" / "deepspeed" / "step-0000025"
    assert newest.universal_dir == tmp_path / "ckpt" / "deepspeed" / "step-0000025_universal"
    assert newest.loop_state["next_step"] == 25 and newest.run == RUN
    epoch1 = scan.resumable[0]
    assert epoch1.apr_path == tmp_path / "ckpt" / "epoch-001.apr"
    assert epoch1.metadata_path == tmp_path / "ckpt" / "epoch-001.metadata.json"


def test_steps_order_checkpoints_not_their_names(tmp_path):
    checkpoint(tmp_path, "epoch-999", step=9990, epoch=999)
    checkpoint(tmp_path, "epoch-1000", step=10000, epoch=1000)  # sorts before epoch-999 as text
    checkpoint(tmp_path, "step-0010000", step=10000, epoch=1000)  # the same step: the epoch one (with the .apr) wins
    assert tags(scan_checkpoints(tmp_path).resumable) == ["epoch-999", "step-0010000", "epoch-1000"]
    assert find_resume_point(tmp_path, "auto").tag == "epoch-1000"


def test_half_written_saves_are_debris_and_never_chosen(tmp_path):
    checkpoint(tmp_path, "epoch-001", step=20, epoch=1)
    ckpt = tmp_path / "ckpt"
    write(ckpt / "epoch-002.apr", "APR2")  # killed after the .apr, before the metadata
    state(tmp_path, "epoch-002")
    state(tmp_path, "step-0000025")  # a preemption save killed before its marker
    write(ckpt / ".epoch-003.apr.k2j3.tmp", "")  # an atomic write that never got renamed
    write(ckpt / "deepspeed" / "epoch-001" / ".albor-rank-0.json.x8.tmp", "")
    write(ckpt / "deepspeed" / "step-0000025" / ".albor-rank-1.json.q1.tmp", "")  # goes with its directory
    write(ckpt / "deepspeed" / "epoch-000_universal" / "zero" / "w" / "fp32.pt", "")  # conversion of a pruned tag
    write(ckpt / "deepspeed" / "epoch-001_universal" / "zero" / "w" / "fp32.pt", "")  # of a resumable one: kept
    write(ckpt / "deepspeed" / "latest", "epoch-002")  # DeepSpeed's; not albor's marker
    write(ckpt / "deepspeed" / "zero_to_fp32.py", "")  # DeepSpeed's recovery script
    write(ckpt / "notes.txt", "the user's")  # a name albor never writes
    scan = scan_checkpoints(tmp_path)
    assert tags(scan.resumable) == ["epoch-001"] and find_resume_point(tmp_path, "auto").tag == "epoch-001"
    found = debris_paths(scan, tmp_path)
    assert set(found) == {
        "epoch-002.apr", "deepspeed/epoch-002", "deepspeed/step-0000025", ".epoch-003.apr.k2j3.tmp",
        "deepspeed/epoch-001/.albor-rank-0.json.x8.tmp", "deepspeed/epoch-000_universal",
    }
    assert "without metadata" in found["epoch-002.apr"] and "without metadata" in found["deepspeed/step-0000025"]
    assert "temporary file" in found[".epoch-003.apr.k2j3.tmp"]
    assert "epoch-000, which is not resumable" in found["deepspeed/epoch-000_universal"]


def test_remove_debris_warns_a_line_per_path_then_removes_only_that(tmp_path, caplog):
    checkpoint(tmp_path, "epoch-001", step=20, epoch=1)
    ckpt = tmp_path / "ckpt"
    write(ckpt / "epoch-002.apr", "APR2")
    state(tmp_path, "epoch-002")
    write(ckpt / ".epoch-002.metadata.json.a1.tmp", "{")
    write(ckpt / "deepspeed" / "latest", "epoch-001")
    scan = scan_checkpoints(tmp_path)
    assert len(scan.debris) == 3
    log = logging.getLogger("albor.test_resume_plan")
    with caplog.at_level(logging.WARNING, logger=log.name):
        remove_debris(scan.debris, log)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    for d, line in zip(scan.debris, lines):
        assert str(d.path) in line and d.reason in line and not d.path.exists()
    after = scan_checkpoints(tmp_path)
    assert after.debris == [] and tags(after.resumable) == ["epoch-001"]
    assert (ckpt / "deepspeed" / "latest").read_text() == "epoch-001" and (ckpt / "epoch-001.apr").exists()
    assert (ckpt / "deepspeed" / "epoch-001" / "albor-rank-1.json").exists()


def test_a_debris_item_that_cannot_be_removed_stops_the_resume(tmp_path, monkeypatch):
    stuck = state(tmp_path, "epoch-002")

    def refuse(path, *a, **k):  # what a read-only directory does (root ignores chmod, so it is faked)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("albor.resume_plan.shutil.rmtree", refuse)
    with pytest.raises(ConfigError, match=r"cannot remove \S*epoch-002 \(Permission denied\): remove it by hand") as e:
        remove_debris([Debris(stuck, "a test")], logging.getLogger("albor.test"))
    assert e.value.exit_code == ExitCode.USAGE and stuck.exists()


def test_a_pruned_epoch_is_complete_but_not_resumable_a_pruned_preemption_is_debris(tmp_path):
    checkpoint(tmp_path, "epoch-000", step=10, epoch=0, deepspeed=False)
    checkpoint(tmp_path, "step-0000015", step=15, epoch=1, deepspeed=False)  # its pruning was cut short
    checkpoint(tmp_path, "epoch-001", step=20, epoch=1)
    checkpoint(tmp_path, "epoch-002", step=30, epoch=2)
    scan = scan_checkpoints(tmp_path)
    assert tags(scan.resumable) == ["epoch-001", "epoch-002"]
    assert tags(scan.complete_not_resumable) == ["epoch-000"]
    assert debris_paths(scan, tmp_path) == {
        "step-0000015.metadata.json": "preemption checkpoint step-0000015 whose DeepSpeed state is gone (pruned)",
    }
    with pytest.raises(ConfigError, match=r"--resume epoch-000: is checkpoint epoch-000, whose DeepSpeed state was pruned "
                       r"\(start a new run from its model with --init-from .*epoch-000.apr\)"):
        find_resume_point(tmp_path, "epoch-000")


def test_a_state_missing_a_ranks_file_is_not_resumable(tmp_path):
    checkpoint(tmp_path, "epoch-001", step=20, epoch=1, world_size=2, deepspeed=False)
    state(tmp_path, "epoch-001", ranks=range(1))  # albor-rank-1.json is gone: a removal was cut short
    scan = scan_checkpoints(tmp_path)
    assert scan.resumable == [] and tags(scan.complete_not_resumable) == ["epoch-001"]
    assert "without albor-rank-1.json" in debris_paths(scan, tmp_path)["deepspeed/epoch-001"]


MALFORMED = [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object (a list)"),
    (json.dumps({"kind": "epoch", "tag": "epoch-002", "step": 30}), "lacks epoch, world_size, run, resume"),
    ({"tag": "epoch-003"}, "names tag 'epoch-003', not its own 'epoch-002'"),
    ({"kind": "preemption"}, "has kind 'preemption', but a epoch-002 checkpoint is a epoch checkpoint"),
    ({"step": "30"}, "has step '30', not a whole number >= 0"),
    ({"world_size": 0}, "has world_size 0, not a whole number >= 1"),
    ({"epoch": 7}, "has epoch 7, not the 2 its tag says"),
    ({"run": {k: v for k, v in RUN.items() if k != "seed"}}, "has a run record without seed"),
    ({"resume": loop_state(29)}, "has a resume state that does not continue at its own step"),
]


@pytest.mark.parametrize("content,reason", MALFORMED)
def test_malformed_metadata_is_debris_with_its_reason(tmp_path, content, reason):
    checkpoint(tmp_path, "epoch-001", step=20, epoch=1)
    path = checkpoint(tmp_path, "epoch-002", step=30, epoch=2, meta=content if isinstance(content, dict) else None)
    if isinstance(content, str):
        path.write_text(content)
    scan = scan_checkpoints(tmp_path)
    assert tags(scan.resumable) == ["epoch-001"]
    found = debris_paths(scan, tmp_path)
    assert set(found) == {"epoch-002.metadata.json", "epoch-002.apr", "deepspeed/epoch-002"}
    assert found["epoch-002.metadata.json"].startswith(f"metadata that {reason}")
    assert reason in found["epoch-002.apr"] and reason in found["deepspeed/epoch-002"]


def test_a_preemption_step_must_match_its_tag(tmp_path):
    checkpoint(tmp_path, "step-0000025", step=26, epoch=2, meta={"resume": loop_state(26)})
    assert "has step 26, not the 25 its tag says" in debris_paths(scan_checkpoints(tmp_path), tmp_path)["step-0000025.metadata.json"]


# ── --resume auto|PATH ──────────────────────────────────────────────────
def test_auto_without_checkpoints_starts_fresh(tmp_path):
    assert find_resume_point(tmp_path / "none", "auto") is None
    (tmp_path / "ckpt").mkdir()
    assert find_resume_point(tmp_path, "auto") is None


def test_auto_refuses_a_run_that_has_only_unresumable_checkpoints(tmp_path):
    checkpoint(tmp_path, "epoch-000", step=10, epoch=0, deepspeed=False)
    with pytest.raises(ConfigError, match=r"cannot be continued: start a new run from its model with --init-from \S*epoch-000.apr"):
        find_resume_point(tmp_path, "auto")


def test_every_path_form_names_the_same_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    meta = checkpoint(run, "epoch-001", step=20, epoch=1)
    checkpoint(run, "epoch-002", step=30, epoch=2)
    ckpt = run / "ckpt"
    write(ckpt / "deepspeed" / "epoch-001_universal" / "zero" / "optimizer_state.pt", "")
    forms = [
        str(meta), str(ckpt / "epoch-001.apr"), str(ckpt / "deepspeed" / "epoch-001"), str(ckpt / "deepspeed" / "epoch-001") + "/",
        str(ckpt / "deepspeed" / "epoch-001_universal"), "epoch-001", "epoch-001.metadata.json", "epoch-001.apr",
    ]
    for form in forms:
        assert find_resume_point(run, form).tag == "epoch-001", form
    monkeypatch.chdir(tmp_path)  # relative forms, against a relative run directory
    assert find_resume_point(Path("run"), "run/ckpt/epoch-001.apr").tag == "epoch-001"
    assert find_resume_point(Path("run"), "epoch-001").tag == "epoch-001"


REFUSED = [
    ("epoch-007", "names no checkpoint epoch-007"),
    ("nowhere/epoch-001.apr", "does not exist"),
    ("{run}/config.yaml", "is not a checkpoint of the run in"),
    ("{run}/ckpt/notes.txt", "is not a checkpoint's metadata, .apr, DeepSpeed directory or tag"),
    ("{other}/ckpt/epoch-001.apr", "is a checkpoint of the run in {other}, not of {run}: pass --output-dir {other}"),
    ("{other}/ckpt/deepspeed/epoch-001", "pass --output-dir {other}"),
    ("epoch-002", "is epoch-002, not a complete checkpoint: model file of epoch-002, without metadata"),
]


@pytest.mark.parametrize("text,why", REFUSED)
def test_a_path_that_is_not_resumable_is_refused_naming_it_and_listing_the_resumable(tmp_path, text, why):
    run, other = tmp_path / "run", tmp_path / "other"
    checkpoint(run, "epoch-000", step=10, epoch=0)
    checkpoint(run, "epoch-001", step=20, epoch=1)
    write(run / "ckpt" / "epoch-002.apr", "APR2")
    write(run / "config.yaml", "")
    write(run / "ckpt" / "notes.txt", "")
    checkpoint(other, "epoch-001", step=20, epoch=1)
    text, why = text.format(run=run, other=other), why.format(run=run, other=other)
    with pytest.raises(ConfigError) as e:
        find_resume_point(run, text)
    message = str(e.value)
    assert message.startswith(f"--resume {text}: ") and why in message, message
    assert message.endswith(f"resumable checkpoints in {run / 'ckpt'}: epoch-000 (step 10), epoch-001 (step 20)")
    assert e.value.exit_code == ExitCode.USAGE and "\n" not in message


def test_a_refusal_says_when_nothing_is_resumable(tmp_path):
    state(tmp_path, "epoch-000")
    with pytest.raises(ConfigError, match=r"--resume epoch-000: is epoch-000, not a complete checkpoint: DeepSpeed state of "
                       r"epoch-000, without metadata.*; there is no resumable checkpoint in \S*ckpt$"):
        find_resume_point(tmp_path, "epoch-000")


# ── compatibility ───────────────────────────────────────────────────────
@pytest.fixture
def saved(tmp_path):
    checkpoint(tmp_path, "epoch-001", step=20, epoch=1, world_size=2)
    return scan_checkpoints(tmp_path).newest


def check(saved, world_size=2, gradient_accumulation=1, **changes):
    from albor.resume_plan import check_compatible

    check_compatible(saved, {**RUN, **changes}, world_size=world_size, gradient_accumulation=gradient_accumulation)


def test_the_same_run_on_another_world_size_is_compatible(saved):
    check(saved)
    check(saved, world_size=1)
    check(saved, world_size=4, gradient_accumulation=2)  # the global batch is what must stay


DIFFERENT = [
    ("model", "albor-370m", "model is albor-370m but the checkpoint's is tiny: pass --model tiny"),
    ("seq_length", 128, "seq_length is 128 but the checkpoint's is 64: pass --seq-length 64"),
    ("lr_max", 0.001, "lr_max is 0.001 but the checkpoint's is 0.0003: pass --lr-max 0.0003"),
    ("lr_min", 0.0, "lr_min is 0.0 but the checkpoint's is 1e-06: pass --lr-min 1e-06"),
    ("warmup_steps", 50, "warmup_steps is 50 but the checkpoint's is 5: pass --warmup-steps 5"),
    ("total_steps", 200, "total_steps is 200 but the checkpoint's is 100: pass --total-steps 100"),
    ("steps_per_epoch", 20, "steps_per_epoch is 20 but the checkpoint's is 10: pass --steps-per-epoch 10"),
    ("seed", 7, "seed is 7 but the checkpoint's is 42: pass --seed 42"),
    ("global_batch", 16, "global_batch is 16 but the checkpoint's is 32: keep micro-batch x gradient accumulation x "
                         "world size = 32: with 2 rank(s) pass --batch-size 16"),
]


@pytest.mark.parametrize("key,value,message", DIFFERENT)
def test_each_differing_value_is_refused_naming_itself_and_the_flag(saved, key, value, message):
    with pytest.raises(ConfigError) as e:
        check(saved, **{key: value})
    assert str(e.value) == f"cannot resume from epoch-001 in {saved.metadata_path.parent}: {message}"
    assert e.value.exit_code == ExitCode.USAGE


def test_every_difference_is_named_in_one_line(saved):
    with pytest.raises(ConfigError) as e:
        check(saved, lr_max=0.001, seed=1, total_steps=300, dataset_fingerprint="0" * 64)
    message = str(e.value)
    for part in ("--lr-max 0.0003", "--seed 42", "--total-steps 100", "the dataset differs"):
        assert part in message
    assert e.value.exit_code == ExitCode.USAGE and "\n" not in message  # flags to fix first: a usage error


def test_the_batch_advice_counts_ranks_and_accumulation(saved):
    with pytest.raises(ConfigError, match=r"with 4 rank\(s\) and gradient accumulation 2 pass --batch-size 4$"):
        check(saved, world_size=4, gradient_accumulation=2, global_batch=64)
    with pytest.raises(ConfigError, match=r"32 is not a multiple of 3 rank\(s\) x gradient accumulation 1: run on a world size"):
        check(saved, world_size=3, global_batch=30)


def test_another_dataset_is_a_data_error(saved, tmp_path):
    with pytest.raises(DataError) as e:
        check(saved, dataset_fingerprint="0" * 64)
    assert e.value.exit_code == ExitCode.DATA
    assert f"fingerprint {'0' * 64}, the checkpoint's {'f' * 64}" in str(e.value)
    assert f"the --dataset and --tokenizer the run started with (see {tmp_path / 'config.yaml'})" in str(e.value)


def test_run_fields_are_what_a_checkpoint_records():
    fields = {k: v for k, v in RUN.items() if k not in ("global_batch", "dataset_fingerprint")}
    config = types.SimpleNamespace(**fields, batch_size=8)
    fields = run_fields(config, global_batch=32, dataset_fingerprint="f" * 64)
    assert tuple(fields) == RUN_KEYS and fields == RUN


# ── metrics.jsonl ───────────────────────────────────────────────────────
def rows(n: int) -> list[bytes]:
    return [json.dumps({"step": s, "train_loss": 5.0 - s / 100, "lr": 1e-4}).encode() + b"\n" for s in range(n)]


def test_rows_after_the_checkpoint_are_dropped_and_kept_rows_keep_their_bytes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(rows(10)))
    assert truncate_metrics(path, keep_below_step=6) == 4
    assert path.read_bytes() == b"".join(rows(6))
    assert truncate_metrics(path, keep_below_step=6) == 0 and path.read_bytes() == b"".join(rows(6))
    assert truncate_metrics(path, keep_below_step=0) == 6 and path.read_bytes() == b""  # a fresh start
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # the atomic write left no temporary file


@pytest.mark.parametrize("tail", [b'{"step": 10, "train_lo', b'{"step": 10}', b"\x00\x00\x00\n", b'{"step": 1\n'])
def test_a_torn_last_line_is_dropped(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(rows(10)) + tail)
    assert truncate_metrics(path, keep_below_step=8) == 3
    assert path.read_bytes() == b"".join(rows(8))


def test_a_torn_line_goes_even_when_every_row_is_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(rows(3)) + b'{"step"')
    assert truncate_metrics(path, keep_below_step=100) == 1 and path.read_bytes() == b"".join(rows(3))


def test_a_damaged_row_in_the_middle_is_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    before = b"".join(rows(2)) + b"garbage\n" + b"".join(rows(5)[2:])
    path.write_bytes(before)
    with pytest.raises(ConfigError, match=r"metrics.jsonl line 3 is not a metrics row"):
        truncate_metrics(path, keep_below_step=1)
    assert path.read_bytes() == before


def test_no_metrics_file_is_nothing_to_drop(tmp_path):
    assert truncate_metrics(tmp_path / "metrics.jsonl", keep_below_step=5) == 0
    assert not (tmp_path / "metrics.jsonl").exists()


# ── the resume command ──────────────────────────────────────────────────
def test_the_resume_command_reuses_the_arguments_with_resume_auto(tmp_path):
    argv = ["--dataset", "data/x", "--resume", "ckpt/epoch-001.apr", "--output-dir", "runs/a b", "--init-from=m.apr",
            "--dry-run", "--local_rank=1", "--resume=epoch-002", "--local-rank", "0", "--lr-max", "0.0003"]
    cmd = resume_command(tmp_path / "run", argv=argv, cwd=Path("/home/u/my proj"), launcher="albor pretrain")
    assert cmd == "cd '/home/u/my proj' && albor pretrain --dataset data/x --output-dir 'runs/a b' --lr-max 0.0003 --resume auto"
    assert shlex.split(cmd.split(" && ", 1)[1])[-2:] == ["--resume", "auto"]


def test_without_arguments_the_runs_config_stands_in(tmp_path):
    cmd = resume_command(Path("runs/a"), cwd=tmp_path, launcher="deepspeed --num_gpus 2 --module albor.pretrain")
    assert cmd == f"cd {tmp_path} && deepspeed --num_gpus 2 --module albor.pretrain --config runs/a/config.yaml --resume auto"


def test_the_launcher_for_each_world_size():
    assert launcher_command(1, 1) == "albor pretrain"
    assert launcher_command(8, 8) == "deepspeed --num_gpus 8 --module albor.pretrain"
    assert launcher_command(16, 8) == "deepspeed --hostfile HOSTFILE --module albor.pretrain"


def test_an_older_albors_epoch_files_are_never_debris(tmp_path):
    """Epochs written before checkpoints carried a resume state: complete contract files, kept, not resumable."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "deepspeed" / "epoch-000").mkdir(parents=True)
    (ckpt / "epoch-000.apr").write_bytes(b"APR\x00model")
    (ckpt / "epoch-000.metadata.json").write_text(json.dumps(
        {"epoch": 0, "train_loss": 7.0, "val_loss": 6.9, "train_ppl": 1.0, "val_ppl": 1.0, "optimizer_state_sha": "a" * 64,
         "wall_seconds": 1.0, "tokens_seen": 10, "grad_norm_max": 1.0, "world_size": 2}))
    scan = scan_checkpoints(tmp_path)
    assert scan.resumable == [] and scan.debris == []
    assert [c.tag for c in scan.complete_not_resumable] == ["epoch-000"]
    with pytest.raises(ConfigError, match="--init-from .*epoch-000.apr"):  # auto must not start over on top of them
        find_resume_point(tmp_path, "auto")


def test_best_epoch_is_the_lowest_finite_val_loss_and_the_earliest_on_a_tie(tmp_path):
    from albor.resume_plan import CheckpointOnDisk, best_epoch

    def epoch(n: int, val_loss, kind: str = "epoch") -> CheckpointOnDisk:
        return CheckpointOnDisk(tag=f"epoch-{n:03d}", kind=kind, step=n, epoch=n, metadata_path=tmp_path,
                                ds_dir=tmp_path, metadata={"val_loss": val_loss})

    runs = [epoch(0, 5.0), epoch(1, 4.0), epoch(2, float("nan")), epoch(3, 4.0), epoch(4, None), epoch(5, 1.0, "preemption")]
    assert best_epoch(runs).epoch == 1
    assert best_epoch([epoch(0, None), epoch(1, float("inf"))]) is None
