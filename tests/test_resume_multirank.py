"""Interrupted runs that continue as if nothing had happened: real 2-rank CPU runs under the deepspeed launcher.

Every scenario is compared with one uninterrupted reference run of the same
configuration. A run stopped and resumed on the same world size must give the
reference's per-step train_loss, grad_norm and lr bit for bit (``==`` on the
floats), log each step exactly once, and leave the same ``.apr`` bytes and
optimizer sha at every epoch; on another world size, within 1e-5.

How each run is interrupted, without depending on how fast a loaded machine is:

* SIGTERM to one rank, and to the launcher alone, once a few steps are logged;
* a save held open: a named pipe (FIFO) stands where a rank must write its
  DeepSpeed shard, so that rank's ``torch.save`` blocks in ``open()`` until the
  test acts. The rank is then SIGKILLed inside its save (a killed save), or
  SIGTERMed a second time inside the preemption save (a second signal);
  nothing in albor knows about the pipe. The killed save is also the
  epoch-boundary case: its resume starts from epoch 0's checkpoint.

Each launch costs 10-60 s on a busy 2-core box, so the runs are module-scoped
and shared; a run whose directory a resume later changes is summarised (status,
exit records, rows, listing) before the resume, and its tests read that summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import stat
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from albor.apr import read_apr
from albor.data.loader import TokenDataset, TrainLoader, index_vocab_size
from albor.model import AlborLlama, load_hf_state_dict, model_preset
from albor.stop_signal import DUPLICATE_WINDOW_S
from tests.drill_env import DRILL_ENV

pytestmark = pytest.mark.multiproc

REPO = Path(__file__).resolve().parents[1]
RANKS, BATCH, SEQ = 2, 2, 64
PER_EPOCH, EPOCHS = 6, 3
STEPS = PER_EPOCH * EPOCHS
WARMUP, LR_MAX, SEED = 3, 1e-3, 42
STEP_FIELDS = ("train_loss", "grad_norm", "lr")
#: Epoch metadata that must match the reference exactly (wall_seconds is a clock, the rest is training).
EPOCH_FIELDS = ("optimizer_state_sha", "train_loss", "val_loss", "tokens_seen", "grad_norm_max", "step")
#: Once the rank holding the pipe has written its previous file, how long before the test acts: by then it
#: is certainly blocked in open(), since nothing else is left for it to do.
SETTLE_S = 1.0


def base_args(dataset: Path, config: Path, **override: Any) -> list[str]:
    """The reference run's flags; ``override`` replaces one (batch, seq, total, warmup, lr_max, model)."""
    v = {"model": "tiny", "total": STEPS, "per_epoch": PER_EPOCH, "batch": BATCH, "seq": SEQ, "warmup": WARMUP,
         "lr_max": LR_MAX, **override}
    return [
        "--dataset", str(dataset), "--model", v["model"], "--config", str(config), "--mode", "from-scratch",
        "--total-steps", str(v["total"]), "--steps-per-epoch", str(v["per_epoch"]), "--batch-size", str(v["batch"]),
        "--seq-length", str(v["seq"]), "--warmup-steps", str(v["warmup"]), "--lr-max", str(v["lr_max"]),
    ]


# ── the processes of a live launch ─────────────────────────────────────────


def rank_processes(run_dir: Path) -> tuple[int, dict[int, psutil.Process]]:
    """(the launch's process group, {local rank: process}) of the live run writing into ``run_dir``.

    A rank is the process whose arguments hold the launcher's ``--local_rank=N`` and
    this run directory, in the process group the launch started (the runner's).
    """
    ranks: dict[int, psutil.Process] = {}
    group = None
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if str(run_dir) not in cmd:
            continue
        local = [a.split("=", 1)[1] for a in cmd if a.startswith("--local_rank=")]
        if not local:
            continue
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            continue
        if group is None:
            group = pgid
        assert pgid == group, f"ranks of {run_dir} in two process groups: {group} and {pgid}"
        ranks[int(local[0])] = proc
    assert group is not None and group > 1, f"no live rank writes into {run_dir}"
    return group, ranks


def rows_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def signal_rank(run_dir: Path, rank: int, sig: signal.Signals) -> int:
    """Send ``sig`` to one live rank of the run; its pid."""
    _, ranks = rank_processes(run_dir)
    assert rank in ranks, f"rank {rank} of {run_dir} is not running (found {sorted(ranks)})"
    os.kill(ranks[rank].pid, sig)
    return ranks[rank].pid


def hold_save_open(tag_dir: Path, rank: int) -> Path:
    """A FIFO where ``rank`` writes its ZeRO shard of this tag: that rank's save blocks in open() there."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    fifo = tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    os.mkfifo(fifo)
    return fifo


# ── what a run left ────────────────────────────────────────────────────────


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256 of a file's bytes | "dir" | the mode of anything else}; never opens a FIFO."""
    out = {}
    for p in sorted(root.rglob("*")):
        mode = p.lstat().st_mode
        if stat.S_ISREG(mode):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p.relative_to(root))] = "dir" if stat.S_ISDIR(mode) else f"mode {mode:o}"
    return out


@dataclasses.dataclass
class Interrupted:
    """An interrupted run as it was before anything resumed it, and the run that resumed it (if any)."""

    run: Any  # conftest.Launch of the interrupted run
    status: dict
    exit_codes: dict[int, int]
    metrics: bytes
    ckpt: dict[str, str]  # tree(ckpt/)
    markers: dict[str, dict]  # tag -> its metadata JSON
    exit_times: dict[int, float]  # rank -> when it wrote its exit record (time.time())
    resumed: Any = None  # conftest.Launch of --resume auto in the same directory

    @property
    def rows(self) -> list[dict]:
        """metrics.jsonl's whole rows (a job killed mid-write may leave a torn last line)."""
        return [json.loads(line) for line in self.metrics.split(b"\n")[:-1]]

    @property
    def torn(self) -> bool:
        return not self.metrics.endswith(b"\n") and self.metrics != b""


def interrupted(run) -> Interrupted:
    """What ``run`` left, read now: a resume in the same directory changes it."""
    d = run.run_dir
    ckpt = d / "ckpt"
    return Interrupted(
        run=run, status=run.status(), exit_codes=run.exit_codes(),
        metrics=(d / "metrics.jsonl").read_bytes() if (d / "metrics.jsonl").is_file() else b"",
        ckpt=tree(ckpt) if ckpt.is_dir() else {},
        markers={p.name.removesuffix(".metadata.json"): json.loads(p.read_text())
                 for p in ckpt.glob("*.metadata.json")},
        exit_times={int(p.name.split(".")[0].removeprefix("rank-")): p.stat().st_mtime
                    for p in (d / "ranks").glob("rank-*.exit.json")},
    )


def assert_continues_bit_for_bit(resumed, reference) -> None:
    """The resumed run is the reference: every step once, the same numbers, .apr bytes and shas at every epoch."""
    assert resumed.returncode == 0, resumed.tail()
    assert resumed.exit_codes() == {0: 0, 1: 0}, resumed.tail()
    status = resumed.status()
    assert (status["status"], status["exit_code"], status["steps_completed"]) == ("ok", 0, STEPS), status
    rows, ref = resumed.metrics(), reference.metrics()
    assert [r["step"] for r in rows] == list(range(STEPS)), "metrics.jsonl must hold each step exactly once"
    for x, y in zip(rows, ref, strict=True):
        for f in STEP_FIELDS:
            assert x[f] == y[f], f"step {x['step']}: {f} {x[f]!r} != the reference's {y[f]!r}"
        assert x["tokens_seen"] == y["tokens_seen"], x["step"]
    ckpt, ref_ckpt = resumed.run_dir / "ckpt", reference.run_dir / "ckpt"
    for epoch in range(EPOCHS):
        got, want = resumed.metadata(epoch), reference.metadata(epoch)
        for key in EPOCH_FIELDS:
            assert got[key] == want[key], f"epoch {epoch}: {key} {got[key]!r} != the reference's {want[key]!r}"
        name = f"epoch-{epoch:03d}.apr"
        assert (ckpt / name).read_bytes() == (ref_ckpt / name).read_bytes(), f"{name} differs from the reference's"


def resumed_from(run) -> dict:
    return run.status()["resumed_from"]


def interrupt(albor_launch, dataset: Path, config: Path, run_dir: Path, observe, *, resume: bool = True) -> Interrupted:
    """A 2-rank run that ``observe`` interrupts, summarised; then, with ``resume``, ``--resume auto`` in its directory."""
    first = interrupted(albor_launch("deepspeed", base_args(dataset, config), run_dir, env=DRILL_ENV, observe=observe))
    if resume:
        first.resumed = albor_launch("deepspeed", [*base_args(dataset, config), "--resume", "auto"], run_dir,
                                     env=DRILL_ENV)
    return first


# ── runs ───────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume-multirank")


@pytest.fixture(scope="module")
def config(dev_run_config) -> Path:
    """conftest's: 1 validation batch a rank (speed) and a target the tiny run certainly meets."""
    return dev_run_config


@pytest.fixture(scope="module")
def reference(albor_launch, builtin_dataset, config, work):
    """The uninterrupted run every scenario is compared with."""
    run = albor_launch("deepspeed", base_args(builtin_dataset, config), work / "reference")
    assert run.returncode == 0, run.tail()
    assert [r["step"] for r in run.metrics()] == list(range(STEPS))
    return run


@pytest.fixture(scope="module")
def sigterm_rank_1(albor_launch, builtin_dataset, config, work) -> Interrupted:
    """SIGTERM to rank 1 alone once step PER_EPOCH + 1 is logged; then the run's own resume command."""
    run_dir = work / "sigterm-rank-1"

    def stop_rank_1(d: Path):
        if rows_logged(d) >= PER_EPOCH + 2:
            return {"rows": rows_logged(d), "pid": signal_rank(d, 1, signal.SIGTERM)}
        return None

    first = interrupt(albor_launch, builtin_dataset, config, run_dir, stop_rank_1, resume=False)
    command = first.status.get("resume_command", "")
    prefix = f"cd {shlex.quote(str(REPO))} && deepspeed --num_gpus {RANKS} --module albor.pretrain "
    assert command.startswith(prefix), (command, first.run.tail())
    args = shlex.split(command[len(prefix):])
    at = args.index("--output-dir")  # launch() passes it itself: the same directory
    assert Path(args[at + 1]) == run_dir, command
    first.resumed = albor_launch("deepspeed", args[:at] + args[at + 2:], run_dir, env=DRILL_ENV)
    return first


@pytest.fixture(scope="module")
def sigterm_launcher(albor_launch, builtin_dataset, config, work) -> Interrupted:
    """SIGTERM to the top ``deepspeed`` process only (what a scheduler sends); its ranks are never signalled."""
    run_dir = work / "sigterm-launcher"

    def stop_the_runner(d: Path):
        if rows_logged(d) >= PER_EPOCH + 1:
            group, ranks = rank_processes(d)
            runner = psutil.Process(group)  # start_new_session: the runner leads the launch's process group
            assert any("deepspeed" in a for a in runner.cmdline()), runner.cmdline()
            assert all(r.parent().parent().pid == group for r in ranks.values())  # rank <- launch.py <- runner
            runner.send_signal(signal.SIGTERM)
            return {"rows": rows_logged(d), "runner": group, "ranks": {r: p.pid for r, p in ranks.items()}}
        return None

    return interrupt(albor_launch, builtin_dataset, config, run_dir, stop_the_runner, resume=False)


@pytest.fixture(scope="module")
def killed_in_save(albor_launch, builtin_dataset, config, work) -> Interrupted:
    """SIGKILL of rank 0 inside epoch 1's save (its shard held open by a FIFO), after it wrote epoch 1's .apr."""
    run_dir = work / "killed-in-save"
    tag_dir = run_dir / "ckpt" / "deepspeed" / "epoch-001"
    hold_save_open(tag_dir, rank=0)
    seen: dict[str, float] = {}

    def kill_rank_0_in_its_save(d: Path):
        # rank 0 writes the .apr, then DeepSpeed's model states, then its shard: the FIFO.
        if "t" not in seen and (tag_dir / "mp_rank_00_model_states.pt").is_file():
            seen["t"] = time.monotonic()
        if "t" in seen and time.monotonic() - seen["t"] >= SETTLE_S:
            left = tree(d / "ckpt")
            signal_rank(d, 0, signal.SIGKILL)
            return {"ckpt": left}
        return None

    return interrupt(albor_launch, builtin_dataset, config, run_dir, kill_rank_0_in_its_save)


@pytest.fixture(scope="module")
def second_sigterm(albor_launch, builtin_dataset, config, work) -> Interrupted:
    """SIGTERM to rank 0, then a second one while its preemption save is held open by a FIFO.

    The second comes DUPLICATE_WINDOW_S + 1 s after the first: albor.stop_signal takes a
    signal within that window for the same stop delivered twice (a process-group SIGTERM
    reaches a rank directly and again through launch.py), not for a second one.
    """
    run_dir = work / "second-sigterm"
    for step in range(1, STEPS + 1):  # wherever the first signal lands, rank 0's shard of that step is a FIFO
        hold_save_open(run_dir / "ckpt" / "deepspeed" / f"step-{step:07d}", rank=0)
    seen: dict[str, Any] = {}

    def signal_rank_0_twice(d: Path):
        if "first" not in seen:
            if rows_logged(d) >= PER_EPOCH + 2:
                seen["first"], seen["t1"] = signal_rank(d, 0, signal.SIGTERM), time.monotonic()
            return None
        if "tag" not in seen:
            saves = (d / "ckpt" / "deepspeed").glob("step-*/mp_rank_00_model_states.pt")
            started = sorted(p.parent.name for p in saves)
            if started:
                seen["tag"], seen["t"] = started[0], time.monotonic()
            return None
        now = time.monotonic()
        if now - seen["t"] < SETTLE_S or now - seen["t1"] < DUPLICATE_WINDOW_S + 1.0:
            return None
        at = time.time()
        assert signal_rank(d, 0, signal.SIGTERM) == seen["first"]  # the same process, signalled twice
        return {"tag": seen["tag"], "at": at, "apart": now - seen["t1"]}

    return interrupt(albor_launch, builtin_dataset, config, run_dir, signal_rank_0_twice)


@pytest.fixture(scope="module")
def on_one_rank(albor_launch, builtin_dataset, config, work, sigterm_launcher):
    """The launcher-preempted 2-rank run (a copy), resumed by one process with the micro-batch doubled."""
    assert sigterm_launcher.status["status"] == "preempted", sigterm_launcher.run.tail()
    run_dir = work / "one-rank"
    shutil.copytree(sigterm_launcher.run.run_dir, run_dir)
    args = [*base_args(builtin_dataset, config, batch=RANKS * BATCH), "--resume", "auto"]
    return albor_launch("python", args, run_dir, env=DRILL_ENV)


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory) -> Path:
    """The same corpus cut shorter: another dataset fingerprint, the same tokenizer."""
    from albor.data.prepare import main as prepare

    out = tmp_path_factory.mktemp("other-data") / "data"
    # a fifth of the documents held out: enough validation tokens for a batch of 4 x 65
    args = ["--builtin", "python-stdlib", "--output", str(out), "--max-bytes", "1000000", "--val-fraction", "0.2"]
    assert prepare(args) == 0
    return out


@pytest.fixture(scope="module")
def finished_copy(reference, work) -> Path:
    """A copy of the reference run, for resumes that must be refused (the reference itself stays untouched)."""
    run_dir = work / "refused"
    shutil.copytree(reference.run_dir, run_dir)
    return run_dir


# ── 1. the reference ───────────────────────────────────────────────────────


def test_the_reference_run_trains_and_checkpoints_every_epoch(reference):
    assert reference.exit_codes() == {0: 0, 1: 0}
    rows = reference.metrics()
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it trained: the comparisons are not of constants
    assert len({r["grad_norm"] for r in rows}) == STEPS
    for epoch in range(EPOCHS):
        assert reference.metadata(epoch)["step"] == (epoch + 1) * PER_EPOCH
    assert len({reference.metadata(e)["optimizer_state_sha"] for e in range(EPOCHS)}) == EPOCHS
    assert reference.status()["resumed_from"] is None


# ── 3. SIGTERM to one rank, mid-epoch ──────────────────────────────────────


def test_sigterm_to_one_rank_preempts_every_rank_with_15(sigterm_rank_1):
    first = sigterm_rank_1
    assert first.run.observed is not None, first.run.tail()
    assert first.run.returncode == 15, first.run.tail()
    assert first.exit_codes == {0: 15, 1: 15}, first.run.tail()
    status = first.status
    step = status["steps_completed"]
    tag = f"step-{step:07d}"
    assert (status["status"], status["exit_code"], status["reason"]) == ("preempted", 15, "preempted"), status
    assert status["checkpoint"] == tag
    assert status["abort"]["ranks"] == [1]
    assert first.run.observed["rows"] < step < 2 * PER_EPOCH, f"not a stop in the middle of epoch 1: {tag}"
    assert [r["step"] for r in first.rows] == list(range(step))  # every step up to the stop, logged once
    marker = first.markers[tag]
    assert (marker["kind"], marker["step"], marker["epoch"], marker["world_size"]) == ("preemption", step, 1, RANKS)
    assert marker["resume"]["next_step"] == step
    assert len(marker["resume"]["epoch_losses"]) == step - PER_EPOCH  # the partial epoch's losses so far
    for name in ("mp_rank_00_model_states.pt", "albor-rank-0.json", "albor-rank-1.json",
                 "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        assert f"deepspeed/{tag}/{name}" in first.ckpt, name
    assert f"{tag}.apr" not in first.ckpt, "a preemption checkpoint has no .apr"
    assert status["resume_command"].endswith("--resume auto")


def test_resume_after_sigterm_mid_epoch_is_bit_identical(sigterm_rank_1, reference):
    first, resumed = sigterm_rank_1, sigterm_rank_1.resumed
    assert_continues_bit_for_bit(resumed, reference)
    step = first.status["steps_completed"]
    tag = f"step-{step:07d}"
    loaded = resumed_from(resumed)
    assert (loaded["tag"], loaded["step"], loaded["saved_world_size"]) == (tag, step, RANKS)
    # The sha of the state the resumed run loaded, before its first step, is the one the stopped run saved.
    assert loaded["optimizer_state_sha"] == first.markers[tag]["optimizer_state_sha"]


# ── 4. SIGTERM to the launcher only ───────────────────────────────────────


def test_sigterm_to_the_launcher_preempts_every_rank_with_15(sigterm_launcher):
    first = sigterm_launcher
    assert first.run.observed is not None, first.run.tail()
    assert first.run.returncode == -signal.SIGTERM, first.run.tail()  # the runner died at once, as it does
    # ...and yet its ranks did not train on, orphaned: each noticed, and they stopped together.
    assert first.exit_codes == {0: 15, 1: 15}, first.run.tail()
    runner = first.run.observed["runner"]
    assert f"the deepspeed runner (pid {runner}) is gone" in first.run.output, first.run.tail()
    status = first.status
    step = status["steps_completed"]
    tag = f"step-{step:07d}"
    assert (status["status"], status["exit_code"], status["checkpoint"]) == ("preempted", 15, tag), status
    assert status["abort"]["ranks"] and set(status["abort"]["ranks"]) <= {0, 1}
    assert first.run.observed["rows"] <= step < STEPS
    assert [r["step"] for r in first.rows] == list(range(step))
    assert first.markers[tag]["kind"] == "preemption" and first.markers[tag]["world_size"] == RANKS
    assert f"deepspeed/{tag}/albor-rank-1.json" in first.ckpt
    for pid in first.run.observed["ranks"].values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# ── 5. SIGKILL of a rank during a save ────────────────────────────────────


def test_sigkill_inside_a_save_leaves_a_half_written_checkpoint(killed_in_save):
    first = killed_in_save
    assert first.run.observed is not None, first.run.tail()
    at_kill = first.run.observed["ckpt"]
    assert "epoch-001.apr" in at_kill and "deepspeed/epoch-001/mp_rank_00_model_states.pt" in at_kill, at_kill
    assert "epoch-001.metadata.json" not in first.ckpt
    # Rank 0 died outright (no record); rank 1 lost its peer inside the save: 14, and did not undo rank 0's files.
    assert first.exit_codes == {1: 14}, first.run.tail()
    assert first.status["status"] == "running"
    assert "epoch-001.apr" in first.ckpt and "deepspeed/epoch-001" in first.ckpt
    assert list(first.markers) == ["epoch-000"]
    assert [r["step"] for r in first.rows] == list(range(2 * PER_EPOCH))  # epoch 1 trained whole, then the save


def test_resume_after_a_killed_save_removes_its_debris_and_is_bit_identical(killed_in_save, reference):
    first, resumed = killed_in_save, killed_in_save.resumed
    ckpt = resumed.run_dir / "ckpt"
    for debris in ("epoch-001.apr", "deepspeed/epoch-001"):
        assert debris in first.ckpt  # left by the killed save...
        assert f"removing {ckpt / debris}: " in resumed.output, resumed.tail()  # ...named in a warning, removed
    assert resumed.output.count("removing ") == 2, resumed.tail()
    assert_continues_bit_for_bit(resumed, reference)  # the FIFO is gone too: epoch 1's save went through
    assert resumed_from(resumed)["tag"] == "epoch-000"
    assert f"dropped {PER_EPOCH} metrics.jsonl row(s)" in resumed.output


# ── 6. a second SIGTERM ────────────────────────────────────────────────────


def test_a_second_sigterm_during_the_preemption_save_ends_the_job_at_once(second_sigterm):
    first = second_sigterm
    assert first.run.observed is not None, first.run.tail()
    tag = first.run.observed["tag"]
    # Rank 0 exits 128 + 15 at once, without a checkpoint; rank 1 loses its peer in the save: 14.
    assert first.exit_codes == {0: 128 + signal.SIGTERM, 1: 14}, first.run.tail()
    # At once, not when a timeout or the launcher's own clean-up ends the wait (each 30 s or more; loose
    # bounds below that, for a loaded machine).
    after = {rank: when - first.run.observed["at"] for rank, when in first.exit_times.items()}
    assert after[0] < 10.0 and after[1] < 20.0, f"seconds from the second SIGTERM to each rank's exit: {after}"
    status = first.status
    assert (status["status"], status["exit_code"], status["reason"]) == ("killed", 143, "killed_by_second_signal")
    assert f"{tag}.metadata.json" not in first.ckpt
    assert {m["kind"] for m in first.markers.values()} == {"epoch"}, first.markers  # no preemption checkpoint
    assert [r["step"] for r in first.rows] == list(range(int(tag.removeprefix("step-"))))


def test_the_last_complete_checkpoint_survives_a_second_sigterm(second_sigterm, reference):
    first, resumed = second_sigterm, second_sigterm.resumed
    assert_continues_bit_for_bit(resumed, reference)
    newest = max(first.markers.values(), key=lambda m: m["step"])  # the last complete checkpoint
    assert resumed_from(resumed)["tag"] == newest["tag"]
    assert resumed_from(resumed)["optimizer_state_sha"] == newest["optimizer_state_sha"]
    tag_dir = resumed.run_dir / "ckpt" / "deepspeed" / first.run.observed["tag"]
    assert f"removing {tag_dir}: " in resumed.output, resumed.tail()  # the half-written preemption state


# ── 7. another world size ──────────────────────────────────────────────────


def test_resume_on_one_rank_continues_within_1e5(on_one_rank, sigterm_launcher, reference):
    run = on_one_rank
    assert run.returncode == 0, run.tail()
    assert run.status()["status"] == "ok", run.status()
    step = sigterm_launcher.status["steps_completed"]
    tag = f"step-{step:07d}"
    loaded = resumed_from(run)
    assert (loaded["tag"], loaded["step"], loaded["saved_world_size"]) == (tag, step, RANKS)
    # The sha does not depend on the world size: the state one rank loaded is the state two ranks saved.
    assert loaded["optimizer_state_sha"] == sigterm_launcher.markers[tag]["optimizer_state_sha"]
    assert "for a new world size" in run.output, run.tail()  # through DeepSpeed's universal checkpoint
    rows, ref = run.metrics(), reference.metrics()
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert rows[:step] == sigterm_launcher.rows  # the 2-rank rows before the checkpoint, as they were
    for x, y in zip(rows[step:], ref[step:], strict=True):
        assert x["lr"] == y["lr"], x["step"]
        for f in ("train_loss", "grad_norm"):
            assert math.isclose(x[f], y[f], rel_tol=1e-5, abs_tol=0.0), f"step {x['step']}: {f} {x[f]} vs {y[f]}"
    for epoch in range(step // PER_EPOCH, EPOCHS):
        assert run.metadata(epoch)["world_size"] == 1
        assert math.isclose(run.metadata(epoch)["val_loss"], reference.metadata(epoch)["val_loss"], rel_tol=1e-5)


def test_a_run_resumed_on_fewer_ranks_leaves_no_exit_record_of_a_rank_it_did_not_have(on_one_rank):
    assert on_one_rank.returncode == 0, on_one_rank.tail()
    assert on_one_rank.exit_codes() == {0: 0}


# ── 8. refusals ────────────────────────────────────────────────────────────


def refusal(run, finished: Path) -> list[str]:
    """The problems of the one error line a refused resume prints."""
    errors = [line for line in run.output.splitlines() if line.startswith("albor pretrain: error: ")]
    assert len(errors) == 1, run.tail()  # one line
    prefix = f"albor pretrain: error: cannot resume from epoch-002 in {finished / 'ckpt'}: "
    assert errors[0].startswith(prefix), errors[0]
    return errors[0].removeprefix(prefix).split("; ")


def test_a_resume_that_does_not_fit_the_checkpoint_names_each_value_and_its_fix(
    albor_launch, builtin_dataset, config, finished_copy
):
    """One rank (dev mode): every run value differs from the 2-rank checkpoint's, and each is named once."""
    before = tree(finished_copy)
    flags = {"lr_max": 2e-3, "seq": 32, "total": 24, "warmup": 2, "model": "albor-370m", "batch": BATCH}
    run = albor_launch("python", [*base_args(builtin_dataset, config, **flags), "--resume", "auto"], finished_copy)
    assert run.returncode == 2, run.tail()
    assert refusal(run, finished_copy) == [
        "model is albor-370m but the checkpoint's is tiny: pass --model tiny",
        "seq_length is 32 but the checkpoint's is 64: pass --seq-length 64",
        "lr_max is 0.002 but the checkpoint's is 0.001: pass --lr-max 0.001",
        "warmup_steps is 2 but the checkpoint's is 3: pass --warmup-steps 3",
        "total_steps is 24 but the checkpoint's is 18: pass --total-steps 18",
        "global_batch is 2 but the checkpoint's is 4: keep micro-batch x gradient accumulation x world size = 4: "
        "with 1 rank(s) pass --batch-size 4",
    ]
    assert tree(finished_copy) == before, "a refused resume changed the run directory"


def test_a_resume_on_another_dataset_is_refused_with_3(albor_launch, other_dataset, config, finished_copy):
    before = tree(finished_copy)
    args = [*base_args(other_dataset, config, batch=RANKS * BATCH), "--resume", "auto"]
    run = albor_launch("python", args, finished_copy)
    assert run.returncode == 3, run.tail()
    (problem,) = refusal(run, finished_copy)
    assert problem.startswith("the dataset differs (fingerprint "), problem
    assert "pass the --dataset and --tokenizer the run started with" in problem, problem
    assert tree(finished_copy) == before, "a refused resume changed the run directory"


# ── 9. --init-from ─────────────────────────────────────────────────────────


def expected_losses(apr: Path, dataset: Path, steps: int) -> list[float]:
    """The loss of ``apr``'s weights on the run's first ``steps`` global batches, computed here in one process."""
    import torch.nn.functional as F

    meta, tensors = read_apr(apr)
    vocab = index_vocab_size(dataset / "index.json")
    model = AlborLlama(model_preset("tiny", vocab_size=vocab))
    load_hf_state_dict(model, tensors)
    split = TokenDataset.open(dataset / "index.json", vocab_size=vocab).split("train")
    loader = TrainLoader(split, micro_batch=RANKS * BATCH, seq_length=SEQ, rank=0, world_size=1, seed=SEED)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            inputs, targets = loader.next_batch()
            logits = model.eval()(inputs)
            out.append(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)).item())
    return out


@pytest.fixture(scope="module")
def init_from_run(albor_launch, builtin_dataset, config, work, reference):
    """A new one-process run (the same global batch) from the reference's epoch-1 model file.

    With ``--resume auto`` in an empty run directory, as a requeued Slurm job's first start
    has it: no checkpoint to continue, so the model file is where the weights come from. Warmup 1: step 0 runs at lr 0 and moves nothing, so step 1 trains on what the
    ZeRO fp32 master partitions were given, not on the module alone.
    """
    apr = reference.run_dir / "ckpt" / "epoch-001.apr"
    args = [*base_args(builtin_dataset, config, batch=RANKS * BATCH, total=2, per_epoch=2, warmup=1),
            "--init-from", str(apr), "--resume", "auto"]
    return albor_launch("python", args, work / "init-from")


def test_init_from_starts_a_new_run_from_the_models_weights(init_from_run, reference, builtin_dataset):
    run = init_from_run
    assert run.returncode == 0, run.tail()
    assert run.exit_codes() == {0: 0}
    assert run.status()["resumed_from"] is None
    rows = run.metrics()
    assert [r["step"] for r in rows] == [0, 1]  # a new run: step 0
    assert rows[0]["lr"] == 0.0
    want = expected_losses(reference.run_dir / "ckpt" / "epoch-001.apr", builtin_dataset, 2)
    for row, loss in zip(rows, want, strict=True):
        assert math.isclose(row["train_loss"], loss, rel_tol=1e-5), (row["step"], row["train_loss"], loss)
    # Not a fresh initialisation: the reference's step 0 trained the same batch from random weights.
    assert abs(rows[0]["train_loss"] - reference.metrics()[0]["train_loss"]) > 0.1


def test_init_from_a_model_file_of_another_model_is_refused(albor_launch, builtin_dataset, config, work, reference):
    apr = reference.run_dir / "ckpt" / "epoch-001.apr"
    run_dir = work / "init-from-mismatch"
    args = [*base_args(builtin_dataset, config, model="albor-370m", batch=RANKS * BATCH), "--init-from", str(apr)]
    run = albor_launch("python", args, run_dir)
    assert run.returncode == 2, run.tail()
    errors = [line for line in run.output.splitlines() if line.startswith("albor pretrain: error: ")]
    assert len(errors) == 1, run.tail()
    assert f"--init-from {apr} does not fit the run's model 'albor-370m'" in errors[0], errors[0]
    assert "hidden_size 128 (the run's 1024)" in errors[0] and "pass the --model preset" in errors[0], errors[0]
    assert not run_dir.exists(), "refused before anything was written"
