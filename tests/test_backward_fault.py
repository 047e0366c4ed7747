"""A rank that fails inside its backward, and a job killed outright: real 2-rank runs (CPU, gloo).

An exception in ``engine.backward`` cannot ride in the step's all-reduce (the
peers are inside ZeRO's gradient collectives), so the failing rank ends; its
error must still reach status.json through its exit record, and every rank
must end with 14, by the exit path rather than a timeout. A job killed
outright writes nothing at all; ``albor status`` must then finalise it.
Three launches, ~30 s each on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from albor.rank_failure import OOM_ADVICE
from albor.status_cmd import main as status_main
from tests.drill_env import DRILL_ENV

pytestmark = pytest.mark.multiproc

ARGS = [
    "--model", "tiny", "--mode", "from-scratch", "--total-steps", "20", "--steps-per-epoch", "10",
    "--batch-size", "4", "--seq-length", "256", "--warmup-steps", "5", "--lr-max", "1e-3",
]
#: The survivor's end may lag the failing rank's by its gloo error, the wait for the record and its exit path.
SURVIVOR_LAG_S = 10.0


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("backward-fault")


@pytest.fixture(scope="module")
def config(work) -> Path:
    p = work / "run.yaml"
    p.write_text("val_batches: 1\n")
    return p


def drill(albor_launch, dataset: Path, config: Path, work: Path, fault: str):
    return albor_launch("deepspeed", ["--dataset", str(dataset), "--config", str(config), *ARGS],
                        work / fault.replace(":", "-"), env={**DRILL_ENV, "ALBOR_FAULT": fault})


def assert_every_rank_ended_with_14_by_the_exit_path(run) -> dict:
    """Both records say 14, the survivor ended soon after rank 1, and status.json blames rank 1; status.json."""
    assert run.returncode == 14, run.tail()
    assert run.exit_codes() == {0: 14, 1: 14}, run.tail()
    assert [r["step"] for r in run.metrics()] == [0, 1, 2], run.tail()
    ranks = run.run_dir / "ranks"
    lag = (ranks / "rank-0.exit.json").stat().st_mtime - (ranks / "rank-1.exit.json").stat().st_mtime
    assert 0 <= lag < SURVIVOR_LAG_S, f"rank 0 ended {lag:.1f} s after rank 1\n{run.tail()}"
    status = run.status()
    assert status["status"] == "aborted" and status["exit_code"] == 14 and status["reason"] == "rank_failure"
    assert status["abort"]["ranks"] == [1] and status["abort"]["step"] == 3, status
    message = status["abort"]["message"]
    # The exit path: rank 0's collective lost rank 1 when it exited ("closed"/"reset by peer"), not by a timeout.
    assert "then lost it during a collective" in message and "by peer" in message, message
    assert "timed out" not in message.lower() and "timeout" not in message.lower(), message
    return status


def test_an_exception_in_backward_ends_every_rank_with_14_and_names_the_rank(
    albor_launch, builtin_dataset, config, work
):
    run = drill(albor_launch, builtin_dataset, config, work, "raise-backward:1:3")
    status = assert_every_rank_ended_with_14_by_the_exit_path(run)
    assert status["abort"]["message"].startswith(
        "rank 1 failed (exit 14): InjectedFault: fault drill: exception injected in backward on rank 1 at step 3. "
    ), status["abort"]
    assert "advice" not in status["abort"]
    records = run.exit_records()
    assert records[1]["error"] == {
        "type": "InjectedFault", "message": "fault drill: exception injected in backward on rank 1 at step 3"}
    assert records[0]["error"]["lost_peer"] == "exited", records[0]  # the survivor's record: only the symptom


def test_out_of_memory_in_backward_gives_the_batch_size_advice(albor_launch, builtin_dataset, config, work):
    run = drill(albor_launch, builtin_dataset, config, work, "oom-backward:1:3")
    status = assert_every_rank_ended_with_14_by_the_exit_path(run)
    assert status["abort"]["message"].startswith("rank 1 failed (exit 14): OutOfMemoryError: CUDA out of memory."), status
    assert status["abort"]["advice"] == OOM_ADVICE and OOM_ADVICE in status["abort"]["message"]
    assert run.exit_records()[1]["error"]["advice"] == OOM_ADVICE


def kill_the_job_once_it_steps(run_dir: Path):
    """SIGKILL every process of the launch (runner, launch.py, ranks) once a step is logged: no Python runs after."""
    metrics = run_dir / "metrics.jsonl"
    starts = sorted((run_dir / "ranks").glob("rank-*.start.json"))
    if not (metrics.is_file() and metrics.read_text().strip() and len(starts) == 2):
        return None
    status = json.loads((run_dir / "status.json").read_text())
    pids = [json.loads(p.read_text())["pid"] for p in starts]
    os.killpg(os.getpgid(pids[0]), signal.SIGKILL)
    return {"status": status, "pids": pids}


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has died: only its reaping is left)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_albor_status_finalises_a_job_killed_outright(albor_launch, builtin_dataset, config, work, capsys):
    run_dir = work / "killed-outright"
    run = albor_launch("deepspeed", ["--dataset", str(builtin_dataset), "--config", str(config), *ARGS], run_dir,
                       env=DRILL_ENV, observe=kill_the_job_once_it_steps)
    assert run.observed is not None, run.tail()
    assert run.observed["status"]["status"] == "running"
    assert run.status()["status"] == "running", run.tail()  # the problem: nobody said the job was over
    assert run.exit_records() == {}, run.tail()
    # The launcher's output closes while a SIGKILLed rank is still exiting (its files are closed before it
    # becomes a zombie): a process that still exists is alive to `albor status`, rightly. Ask once they are gone.
    deadline = time.monotonic() + 30
    while any(running(pid) for pid in run.observed["pids"]):
        assert time.monotonic() < deadline, "a SIGKILLed rank still runs after 30 s"
        time.sleep(0.05)

    code = status_main([str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    status = run.status()
    assert status["status"] == "lost" and status["exit_code"] == 17 and status["reason"] == "ranks_lost", status
    assert status["abort"]["ranks"] == [0, 1]
    assert [r["ended"] for r in status["ranks"]] == ["killed outright", "killed outright"]
    for rank, pid in enumerate(run.observed["pids"]):
        assert f"rank {rank} killed outright: no exit record, and pid {pid} on" in status["abort"]["message"]
    assert status["resume_command"] == run.observed["status"]["resume_command"]  # still how to continue
    assert "status:   lost (exit 17, ranks_lost): finalised now by albor status" in out
