"""``albor status`` and the reconciliation behind it, on run directories built by hand.

The ranks are real processes this test starts (and kills): a start record names
a pid and its create time exactly as a rank's own does.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from albor.errors import ExitCode
from albor.rank_failure import OOM_ADVICE
from albor.reconcile import ALIVE, EXITED, KILLED, UNKNOWN, finalise, judge, last_logged_step, reconcile, reconcile_before_resume
from albor.run_files import clear_rank_records, read_rank_records, write_exit_record, write_start_record
from albor.status_cmd import main as status_main

HOST = socket.gethostname()
RUNNING = {"status": "running", "world_size": 2, "resume_command": "cd /x && deepspeed --num_gpus 2 --module "
           "albor.pretrain --resume auto", "resumed_from": None}


@pytest.fixture
def rank_process():
    """Start a stand-in for a rank (a sleeping Python); every one is killed and reaped at the end."""
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def kill(proc: subprocess.Popen, *, reap: bool = True) -> None:
    proc.send_signal(signal.SIGKILL)
    if reap:
        proc.wait()
    else:  # stays a zombie: dead, but its parent (this test) has not reaped it
        deadline = time.monotonic() + 10
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the killed process never became a zombie"
            time.sleep(0.01)


def start_record(run_dir: Path, rank: int, pid: int, *, world_size: int = 2, host: str = HOST,
                 create_time: float | None = None) -> None:
    record = {"rank": rank, "world_size": world_size, "pid": pid, "host": host,
              "create_time": psutil.Process(pid).create_time() if create_time is None else create_time}
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (run_dir / "ranks" / f"rank-{rank}.start.json").write_text(json.dumps(record))


def exit_record(run_dir: Path, rank: int, code: int, error: dict | None = None, host: str = HOST) -> None:
    record = {"rank": rank, "exit_code": code, "pid": 1, "host": host, **({"error": error} if error else {})}
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (run_dir / "ranks" / f"rank-{rank}.exit.json").write_text(json.dumps(record))


def run_dir_with(tmp_path: Path, status: dict | None = None, *, metrics_steps: int = 0) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text(json.dumps(RUNNING if status is None else status))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train_loss": 1.0}) + "\n"
                                                   for s in range(metrics_steps)))
    return run_dir


def status_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def albor_status(capsys, *args) -> tuple[int, str]:
    code = status_main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out + out.err


# ── the command on whole run directories ─────────────────────────────────────


def test_a_run_whose_ranks_are_alive_stays_running(tmp_path, rank_process, capsys):
    run_dir = run_dir_with(tmp_path)
    for rank in range(2):
        start_record(run_dir, rank, rank_process().pid)
    before = (run_dir / "status.json").read_bytes()
    code, out = albor_status(capsys, run_dir)
    assert code == 0, out
    assert (run_dir / "status.json").read_bytes() == before
    assert "status:   running (world size 2): rank(s) 0, 1 still alive" in out
    assert "rank 0:   alive (pid" in out and "rank 1:   alive (pid" in out


def test_one_live_rank_keeps_the_run_running(tmp_path, rank_process, capsys):
    run_dir = run_dir_with(tmp_path)
    dead, live = rank_process(), rank_process()
    start_record(run_dir, 0, dead.pid)
    start_record(run_dir, 1, live.pid)
    kill(dead)
    code, out = albor_status(capsys, run_dir)
    assert code == 0 and status_of(run_dir) == RUNNING, out
    assert "rank(s) 1 still alive" in out and "killed outright" in out  # rank 0's line says what became of it


def test_a_run_killed_outright_is_finalised_as_lost(tmp_path, rank_process, capsys):
    run_dir = run_dir_with(tmp_path, metrics_steps=3)
    (run_dir / "ckpt").mkdir()
    (run_dir / "ckpt" / "epoch-000.metadata.json").write_text("{}")
    r0, r1 = rank_process(), rank_process()
    start_record(run_dir, 0, r0.pid)
    start_record(run_dir, 1, r1.pid)
    kill(r0)  # SIGKILL: no exit record
    oom = {"type": "OutOfMemoryError", "message": "CUDA out of memory.", "advice": OOM_ADVICE}
    exit_record(run_dir, 1, 14, oom)
    kill(r1)
    code, out = albor_status(capsys, run_dir)
    assert code == 0, out
    status = status_of(run_dir)
    assert status["status"] == "lost" and status["exit_code"] == ExitCode.RANKS_LOST == 17
    assert status["reason"] == status["abort"]["reason"] == "ranks_lost"
    assert status["abort"]["ranks"] == [0]  # killed outright; rank 1 said how it ended
    assert status["ranks"] == [
        {"rank": 0, "ended": "killed outright"},
        {"rank": 1, "ended": "exit record", "exit_code": 14, "error": oom, "pid": 1, "host": HOST},
    ]
    message = status["abort"]["message"]
    assert f"rank 0 killed outright: no exit record, and pid {r0.pid} on {HOST} is gone" in message
    assert "rank 1 exited 14: OutOfMemoryError: CUDA out of memory. (out of memory: lower --batch-size" in message
    assert "dmesg" in message
    assert status["steps_completed"] == status["abort"]["step"] == 3 and status["epochs_completed"] == 1
    assert status["resume_command"] == RUNNING["resume_command"] and status["world_size"] == 2  # kept
    assert status["reconciled"]["by"] == "albor status" and status["reconciled"]["host"] == HOST
    assert "status:   lost (exit 17, ranks_lost): finalised now by albor status" in out
    assert "resume:   cd /x && deepspeed" in out
    # A second look changes nothing: the run is over and says so.
    code, again = albor_status(capsys, run_dir)
    assert code == 0 and status_of(run_dir) == status and "finalised now" not in again
    assert "rank 0:   killed outright\nrank 1:   exited 14\n" in again


def test_a_zombie_or_a_reused_pid_is_not_the_rank(tmp_path, rank_process):
    run_dir = run_dir_with(tmp_path)
    zombie, other = rank_process(), rank_process()
    start_record(run_dir, 0, zombie.pid)
    kill(zombie, reap=False)
    # rank 1's pid now belongs to another process: the create time tells them apart
    start_record(run_dir, 1, other.pid, create_time=psutil.Process(other.pid).create_time() - 100.0)
    verdict = reconcile(run_dir)
    assert [v.state for v in verdict.ranks] == [KILLED, KILLED] and verdict.lost
    assert finalise(run_dir, verdict, by="test")["status"] == "lost"


def test_a_rank_on_another_host_cannot_be_checked_without_its_exit_record(tmp_path, rank_process, capsys):
    run_dir = run_dir_with(tmp_path)
    r0 = rank_process()
    start_record(run_dir, 0, r0.pid)
    start_record(run_dir, 1, 12345, host="node-b", create_time=1.0)
    kill(r0)
    code, out = albor_status(capsys, run_dir)
    assert code == 0 and status_of(run_dir) == RUNNING, out
    assert "rank 1:   runs on host node-b: cannot be checked from" in out
    assert "rank(s) 1 cannot be checked from here and left no exit record" in out
    exit_record(run_dir, 1, 14, host="node-b")  # now every rank is accounted for
    code, out = albor_status(capsys, run_dir)
    assert code == 0 and status_of(run_dir)["status"] == "lost", out
    assert status_of(run_dir)["abort"]["ranks"] == [0]


def test_a_run_without_start_records_is_left_as_it_is(tmp_path, capsys):
    # An attempt started by an albor without start records, or killed before its ranks wrote them.
    run_dir = run_dir_with(tmp_path)
    code, out = albor_status(capsys, run_dir)
    assert code == 0 and status_of(run_dir) == RUNNING
    assert "rank 0:   no start record" in out and "rank 1:   no start record" in out


def test_an_ended_run_is_only_printed(tmp_path, capsys):
    ended = {"status": "aborted", "exit_code": 14, "reason": "rank_failure",
             "abort": {"message": "rank 1 failed (exit 14): InjectedFault: boom"}, "resume_command": "cd /x && again"}
    run_dir = run_dir_with(tmp_path, ended)
    exit_record(run_dir, 0, 14)
    exit_record(run_dir, 1, 14)
    code, out = albor_status(capsys, run_dir)
    assert code == 0 and status_of(run_dir) == ended
    assert out.splitlines()[1:] == [
        "status:   aborted (exit 14, rank_failure)", "message:  rank 1 failed (exit 14): InjectedFault: boom",
        "rank 0:   exited 14", "rank 1:   exited 14", "resume:   cd /x && again",
    ]
    code, out = albor_status(capsys, "--json", run_dir)
    assert code == 0 and json.loads(out) == ended


def test_not_a_run_directory_and_a_broken_status_are_refused(tmp_path, capsys):
    code, out = albor_status(capsys, tmp_path)
    assert code == 2 and "albor status: error:" in out and "is not a run directory" in out
    (tmp_path / "status.json").write_text("{not json")
    code, out = albor_status(capsys, tmp_path)
    assert code == 3 and "is not readable JSON" in out
    code, out = albor_status(capsys)
    assert code == 2 and "(see --help)" in out


# ── the decision itself ─────────────────────────────────────────────────────


def test_judge_accounts_for_every_rank_before_calling_a_run_lost():
    starts = {0: {"rank": 0, "world_size": 2, "pid": 10, "host": HOST}, 1: {"rank": 1, "world_size": 2}}
    gone = {0: (KILLED, "gone"), 1: (KILLED, "gone")}
    assert judge(RUNNING, starts, {}, gone).lost
    assert not judge(RUNNING, starts, {}, {**gone, 1: (ALIVE, "alive")}).lost
    assert not judge(RUNNING, starts, {}, {**gone, 1: (UNKNOWN, "elsewhere")}).lost
    assert judge(RUNNING, starts, {1: {"exit_code": 14}}, {**gone, 1: (UNKNOWN, "elsewhere")}).lost
    # A live rank that already wrote its exit record is finishing: still running.
    assert not judge(RUNNING, starts, {1: {"exit_code": 0}}, {**gone, 1: (ALIVE, "alive")}).lost
    # A start record of an earlier attempt at another world size says nothing about this one.
    stale = {0: starts[0], 1: {"rank": 1, "world_size": 4}}
    verdict = judge(RUNNING, stale, {}, gone)
    assert not verdict.lost and verdict.ranks[1].state == UNKNOWN
    assert [v.state for v in judge(RUNNING, starts, {0: {"exit_code": 14}}, gone).ranks] == [EXITED, KILLED]
    for status in (None, {"status": "ok"}, {"status": "lost"}):
        assert not judge(status, starts, {}, gone).lost


def test_finalise_leaves_a_status_that_changed_since_it_was_judged(tmp_path, rank_process):
    run_dir = run_dir_with(tmp_path)
    r0 = rank_process()
    start_record(run_dir, 0, r0.pid, world_size=1)
    (run_dir / "status.json").write_text(json.dumps({**RUNNING, "world_size": 1}))
    kill(r0)
    verdict = reconcile(run_dir)
    assert verdict.lost
    resumed = {**RUNNING, "world_size": 1, "resumed_from": "epoch-000"}  # a new attempt started meanwhile
    (run_dir / "status.json").write_text(json.dumps(resumed))
    assert finalise(run_dir, verdict, by="test") is None and status_of(run_dir) == resumed


def test_the_resume_check_finalises_the_attempt_before_and_never_raises(tmp_path, rank_process, caplog):
    run_dir = run_dir_with(tmp_path)
    for rank in range(2):
        proc = rank_process()
        start_record(run_dir, rank, proc.pid)
        kill(proc)
    log = logging.getLogger("albor.test")
    with caplog.at_level(logging.WARNING, logger="albor.test"):
        assert reconcile_before_resume(run_dir, log).lost
    assert status_of(run_dir)["status"] == "lost"
    assert status_of(run_dir)["reconciled"]["by"] == "albor pretrain --resume"
    assert "the previous attempt ended without a final status: rank 0 killed outright" in caplog.text
    (run_dir / "status.json").write_text("{torn")
    assert reconcile_before_resume(run_dir, log) is None  # a check that cannot run does not stop the resume
    assert "could not check the previous attempt's ranks" in caplog.text


# ── the records themselves ─────────────────────────────────────────────────


def test_a_rank_writes_its_start_record_and_an_error_in_its_exit_record(tmp_path):
    write_start_record(tmp_path, 3, 4)
    start = read_rank_records(tmp_path, "start")[3]
    assert start == {"rank": 3, "world_size": 4, "pid": os.getpid(), "host": HOST,
                     "create_time": psutil.Process().create_time()}
    write_exit_record(tmp_path, 3, 14, error={"type": "OutOfMemoryError", "message": "m", "advice": OOM_ADVICE})
    assert read_rank_records(tmp_path, "exit")[3]["error"]["advice"] == OOM_ADVICE
    write_exit_record(tmp_path, 2, 0)
    assert "error" not in read_rank_records(tmp_path, "exit")[2]
    (tmp_path / "ranks" / "rank-5.exit.json").write_text('{"rank": 6}')  # names another rank: not trusted
    (tmp_path / "ranks" / "rank-7.exit.json").write_text("{torn")
    assert sorted(read_rank_records(tmp_path, "exit")) == [2, 3]
    assert clear_rank_records(tmp_path) == 5 and not list((tmp_path / "ranks").iterdir())


def test_last_logged_step_reads_only_the_end_of_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    assert last_logged_step(metrics) is None
    metrics.write_text("")
    assert last_logged_step(metrics) is None
    metrics.write_text(json.dumps({"step": 0}) + "\n")
    assert last_logged_step(metrics) == 1
    rows = "".join(json.dumps({"step": s, "pad": "x" * 200}) + "\n" for s in range(2000))  # > 64 KiB
    metrics.write_text(rows + '{"step": 2000, "tr')  # a torn last line from a kill
    assert last_logged_step(metrics) == 2000
