"""The full dataset check (albor.data.verify), ``albor verify-data``, and how its verdict ends a run.

Expected digests are computed here with hashlib over the files' bytes, never
read from the code under test; slot rows are written by hand with the slot
constants, as in test_step_combine.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from albor.cli import main as albor_main
from albor.contract import AbortReason
from albor.data.shards import HEADER_SIZE
from albor.data.verify import BackgroundVerification, verify_dataset
from albor.distributed.data_verdict import DataVerdict, describe_data_fault
from albor.distributed.step import DATA_BAD, DATA_SHARD, FLAGS, LOCAL_ERROR, SLOTS, TOKENS, combine_rows
from albor.errors import DataError, ExitCode
from albor.loop import DataFault, PretrainLoop, RunStatus, StepResult
from albor.run_files import RunFiles
from fakes import LinearDecay, RecordingCheckpoint, ScriptedVal, loop_config
from test_data_loader import arange_dataset

NAMES = ("train-00000.bin", "train-00001.bin", "val-00000.bin")


def flip_a_token(shard: Path, at: int = 10) -> tuple[str, str]:
    """Change one token in place (same size, same header); (sha256 before, after), by hashlib."""
    raw = bytearray(shard.read_bytes())
    before = hashlib.sha256(raw).hexdigest()
    raw[HEADER_SIZE + at] ^= 0x01
    shard.write_bytes(bytes(raw))
    return before, hashlib.sha256(raw).hexdigest()


# ---- verify_dataset -----------------------------------------------------------------------------


def test_a_good_dataset_verifies_and_counts_every_byte(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    report = verify_dataset(p.parent, workers=3)
    files = sorted(p.parent.glob("*.bin"))
    assert report.ok and report.problems == ()
    assert report.shards == len(files) == 7  # 5000 train + 2000 val tokens, 1000 a shard
    assert report.bytes == sum(f.stat().st_size for f in files) == 7 * HEADER_SIZE + 2 * 7000
    assert report.workers == 3


def test_every_bad_shard_is_named_once_in_index_order_whatever_the_threads(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    d = p.parent
    expected_sha, actual_sha = flip_a_token(d / "train-00003.bin")
    (d / "train-00001.bin").write_bytes((d / "train-00001.bin").read_bytes()[:-2])  # truncated
    (d / "val-00001.bin").unlink()
    reports = [verify_dataset(p, workers=n) for n in (1, 4)]
    assert reports[0].problems == reports[1].problems
    names = [q.name for q in reports[0].problems]
    assert names == ["train-00001.bin", "train-00003.bin", "val-00001.bin"]
    truncated, changed, missing = reports[0].problems
    assert "truncated" in truncated.message
    assert expected_sha in changed.message and actual_sha in changed.message and "prepare-data" in changed.message
    assert "missing" in missing.message
    assert [q.position for q in reports[0].problems] == [1, 3, 6]  # index.json lists train 0-4, then val 0-1


def test_an_index_whose_fingerprint_does_not_match_is_refused(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    index = json.loads(p.read_text())
    index["shards"][0]["sha256"] = "0" * 64
    p.write_text(json.dumps(index))
    with pytest.raises(DataError, match="fingerprint"):
        verify_dataset(p)


# ---- albor verify-data ----------------------------------------------------------------------------


def test_verify_data_says_what_it_checked_and_exits_0(tmp_path: Path, capsys) -> None:
    p = arange_dataset(tmp_path)
    assert albor_main(["verify-data", str(p.parent), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "7 shard(s)" in out and "2 thread(s)" in out and f"ok: every shard matches {p}" in out


def test_verify_data_names_each_bad_shard_on_one_line_and_exits_3(tmp_path: Path, capsys) -> None:
    p = arange_dataset(tmp_path)
    expected_sha, actual_sha = flip_a_token(p.parent / "val-00000.bin")
    flip_a_token(p.parent / "train-00002.bin", at=100)
    assert albor_main(["verify-data", str(p)]) == ExitCode.DATA == 3
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3, err  # one line per bad shard, then the summary
    assert "train-00002.bin" in err[0]
    assert "val-00000.bin" in err[1] and expected_sha in err[1] and actual_sha in err[1]
    assert "2 of 7 shard(s) bad" in err[2]


@pytest.mark.parametrize("argv, needle", [
    (["{missing}"], "does not exist"),
    (["{ds}", "--workers", "0"], "--workers 0"),
    (["{ds}", "--vocab-size", "x"], "invalid int value"),
    ([], "required"),
])
def test_verify_data_usage_errors_exit_2(tmp_path: Path, capsys, argv: list[str], needle: str) -> None:
    ds = arange_dataset(tmp_path).parent
    args = [a.format(missing=tmp_path / "nowhere", ds=ds) for a in argv]
    assert albor_main(["verify-data", *args]) == ExitCode.USAGE == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


# ---- the background verification and the vote ---------------------------------------------------


def test_background_verification_reports_only_once_finished(tmp_path: Path, monkeypatch) -> None:
    import albor.data.verify as verify

    p = arange_dataset(tmp_path)
    flip_a_token(p.parent / "train-00004.bin")
    release = threading.Event()
    real = verify.check_shard

    def held(*args, **kwargs):
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "check_shard", held)
    job = BackgroundVerification(p, vocab_size=65536, workers=2).start()
    assert not job.done and job.problem is None  # running: nothing to report yet, and nothing waits
    release.set()
    problem = job.wait()
    assert job.done and problem is not None and problem.name == "train-00004.bin" and problem.position == 4
    assert job.problem is problem


def test_a_cancelled_verification_stops_its_threads_at_once(tmp_path: Path, monkeypatch) -> None:
    """Its reader threads are joined at interpreter exit: uncancelled, a finished run waited for every shard."""
    import albor.data.verify as verify

    p = arange_dataset(tmp_path)  # 7 shards

    def slow_scan(path, header, on_bytes=None):  # 10 s a shard, in chunks of 10 ms: slow shared storage
        for _ in range(1000):
            time.sleep(0.01)
            if on_bytes is not None:
                on_bytes(1)
        return "0" * 64, 0

    monkeypatch.setattr(verify, "scan_shard", slow_scan)
    finished: list[object] = []
    job = BackgroundVerification(p, vocab_size=65536, workers=2, on_done=lambda *a: finished.append(a)).start()
    time.sleep(0.2)
    assert not job.done
    started = time.monotonic()
    job.cancel()
    problem = job.wait()
    readers = [t for t in threading.enumerate() if t.name.startswith("albor-verify")]
    for t in readers:
        t.join(timeout=2)
    assert time.monotonic() - started < 2
    assert not any(t.is_alive() for t in readers)
    assert problem is not None and "cancelled" in problem.message  # never a good verdict
    assert finished == []  # no "verified" log line for a run that has ended


def test_ctrl_c_in_verify_data_does_not_wait_for_every_shard(tmp_path: Path, monkeypatch) -> None:
    import albor.data.verify as verify

    p = arange_dataset(tmp_path)  # 7 shards

    def slow_scan(path, header, on_bytes=None):  # 10 s a shard, in chunks of 10 ms
        for _ in range(1000):
            time.sleep(0.01)
            if on_bytes is not None:
                on_bytes(1)
        return "0" * 64, 0

    real_check = verify.check_shard

    def check(directory, position, *args):
        if position == 0:
            time.sleep(0.2)
            raise KeyboardInterrupt  # reaches the main thread from the shard's future, as Ctrl-C would there
        return real_check(directory, position, *args)

    monkeypatch.setattr(verify, "scan_shard", slow_scan)
    monkeypatch.setattr(verify, "check_shard", check)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        verify_dataset(p, workers=2)
    assert time.monotonic() - started < 3


def test_a_run_that_ends_cancels_its_verification(tmp_path: Path, monkeypatch) -> None:
    """train.train cancels the background verification however it ends (here: refused after opening the data)."""
    from types import SimpleNamespace

    import albor.train as train

    cancelled: list[bool] = []
    data = SimpleNamespace(verdict=SimpleNamespace(verification=SimpleNamespace(cancel=lambda: cancelled.append(True))))
    monkeypatch.setattr(train, "preflight", lambda config: SimpleNamespace(
        faults=None, ds_config={"gradient_accumulation_steps": 1}, ds_config_path=tmp_path / "ds.json"))
    monkeypatch.setattr(train, "StopSignals", lambda on_force: SimpleNamespace(install=lambda: None, settle=lambda: None))
    monkeypatch.setattr(train, "watch_launcher", lambda stop: None)
    monkeypatch.setattr(train, "init_distributed", lambda: SimpleNamespace(rank=0, world_size=1, is_main=True))
    monkeypatch.setattr(train, "setup_logging", lambda rank, world_size: None)
    monkeypatch.setattr(train, "open_data", lambda config, env: data)

    def unwritable(*args, **kwargs):
        raise DataError("the run directory cannot be written")

    monkeypatch.setattr(train, "RunFiles", unwritable)
    with pytest.raises(DataError, match="cannot be written"):
        train.train(SimpleNamespace(resume=None, init_from=None, output_dir=tmp_path / "run"))
    assert cancelled == [True]


def test_a_verification_that_cannot_run_counts_as_a_problem(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    p.write_text("{")  # the index is no longer JSON
    problem = BackgroundVerification(p, vocab_size=65536, workers=1).start().wait()
    assert problem is not None and problem.position == -1 and "not valid JSON" in problem.message


def test_data_fault_words_name_the_shard_and_the_ranks() -> None:
    assert describe_data_fault({}, NAMES) is None
    fault = describe_data_fault({3: 2, 1: 2}, NAMES)  # ranks 1 and 3 both found shard 1 (position + 1 = 2)
    assert fault.ranks == (1, 3)
    assert fault.message.startswith("shard train-00001.bin failed verification on rank(s) 1, 3")
    assert "verify-data" in fault.message
    unknown = describe_data_fault({2: 0}, NAMES)
    assert unknown.ranks == (2,) and "rank(s) 2 found the dataset bad" in unknown.message


def _verdict(tmp_path: Path, rank: int, others: list[float], *, corrupt: bool) -> DataVerdict:
    """Rank ``rank`` with its own verification; ``others`` = what the other ranks vote, in rank order."""
    p = arange_dataset(tmp_path)
    if corrupt:
        flip_a_token(p.parent / "train-00001.bin")
    job = BackgroundVerification(p, vocab_size=65536, workers=1).start()
    names = tuple(e["name"] for e in json.loads(p.read_text())["shards"])

    def per_rank(mine: float) -> list[float]:
        return [*others[:rank], mine, *others[rank:]]

    return DataVerdict(job, rank=rank, shard_names=names, per_rank=per_rank)


def test_settle_waits_then_every_rank_gets_the_finders_verdict(tmp_path: Path) -> None:
    # Rank 0 verified its copy and found train-00001.bin bad; rank 1 (another node's copy) voted good (-1).
    finder = _verdict(tmp_path / "a", 0, [-1.0], corrupt=True)
    fault = finder.settle()
    assert fault.ranks == (0,)
    assert fault.message.startswith("shard ") and "train-00001.bin: sha256 is" in fault.message  # its own words
    assert "found by rank 0's verification" in fault.message
    # The other rank holds the vote's words: the shard from the slot, and who found it.
    other = DataVerdict(None, rank=1, shard_names=finder.shard_names, per_rank=lambda mine: [2.0, mine])
    assert other.settle() == describe_data_fault({0: 2}, finder.shard_names)


def test_a_passed_verdict_is_settled_once(tmp_path: Path) -> None:
    calls: list[float] = []
    good = _verdict(tmp_path, 0, [-1.0], corrupt=False)
    good._per_rank = lambda mine: calls.append(mine) or [mine, -1.0]
    assert good.settle() is None and good.settle() is None
    assert calls == [-1.0]  # one collective, on the first call only


# ---- the flag in the step's all-reduce ------------------------------------------------------------


def _row(flags: int = 0, shard: int = 0) -> list[float]:
    r = [0.0] * SLOTS
    r[TOKENS], r[FLAGS], r[DATA_SHARD] = 4.0, float(flags), float(shard)
    return r


def test_the_data_flag_combines_into_one_fault_naming_shard_and_rank() -> None:
    r = combine_rows([_row(), _row(DATA_BAD, shard=3), _row(LOCAL_ERROR)], data_epoch=0, shard_names=NAMES)
    assert r.data_fault == DataFault(describe_data_fault({1: 3}, NAMES).message, (1,))
    assert "val-00000.bin" in r.data_fault.message
    assert r.rank_error is not None  # the other fault is still reported; the loop reads the data first
    assert combine_rows([_row(), _row(shard=3)], data_epoch=0, shard_names=NAMES).data_fault is None  # no flag, no fault


def test_the_flags_stay_distinct_bits() -> None:
    from albor.distributed.step import FLAG_PRIORITY, STOP_REQUESTED

    bits = [*FLAG_PRIORITY, STOP_REQUESTED, DATA_BAD]
    assert sorted(bits) == [1 << i for i in range(len(bits))]


# ---- the loop ends the run with 3 ------------------------------------------------------------------


class DataFaultAt(LinearDecay):
    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def __call__(self, step: int, lr: float) -> StepResult:
        r = super().__call__(step, lr)
        if step != self.at:
            return r
        return StepResult(r.train_loss, r.grad_norm, r.tokens, data_fault=DataFault("shard x.bin failed", (1,)))


def _loop(tmp_path: Path, step_fn, data_verified=lambda: None):
    config = loop_config(tmp_path)
    ckpt = RecordingCheckpoint()
    loop = PretrainLoop(config, step_fn, ScriptedVal((3.4, 3.0, 2.6, 2.4, 2.3)), ckpt, vocab_size=50257,
                        files=RunFiles(config.output_dir, enabled=True), data_verified=data_verified)
    return loop, ckpt, config


def test_a_data_fault_in_a_step_ends_the_run_with_3_before_the_step_is_logged(tmp_path: Path) -> None:
    loop, ckpt, config = _loop(tmp_path, DataFaultAt(2))
    result = loop.run()
    assert result.status is RunStatus.ABORTED and result.exit_code == ExitCode.DATA == 3
    assert (result.abort.reason, result.abort.step, result.abort.ranks) == (AbortReason.DATA, 2, (1,))
    assert ckpt.calls == []
    rows = [json.loads(x) for x in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    status = json.loads((config.output_dir / "status.json").read_text())
    assert (status["status"], status["exit_code"], status["reason"]) == ("aborted", 3, "data")
    assert status["abort"]["message"] == "DATA at step 2: shard x.bin failed" and status["abort"]["ranks"] == [1]


def test_the_first_checkpoint_waits_for_the_verdict_and_a_bad_one_writes_none(tmp_path: Path) -> None:
    asked: list[int] = []

    def verdict() -> DataFault | None:
        asked.append(loop.next_step)
        return DataFault("shard y.bin failed", (0,))

    loop, ckpt, config = _loop(tmp_path, LinearDecay(), verdict)
    result = loop.run()
    assert asked == [5]  # after the epoch's 5 steps, before validation and the checkpoint
    assert result.exit_code == 3 and result.abort.epoch == 0 and result.abort.step == 4
    assert result.abort.message == "DATA at the end of epoch 0: shard y.bin failed"
    assert ckpt.calls == [] and result.epochs_completed == 0


def test_a_good_verdict_lets_every_epoch_checkpoint(tmp_path: Path) -> None:
    loop, ckpt, _ = _loop(tmp_path, LinearDecay())
    assert loop.run().abort is None
    assert [e for e, _ in ckpt.calls] == [0, 1, 2, 3, 4]


def test_a_preemption_save_asks_for_the_verdict_first_and_a_bad_one_saves_nothing(tmp_path: Path) -> None:
    class StopAt1(LinearDecay):
        def __call__(self, step: int, lr: float) -> StepResult:
            r = super().__call__(step, lr)
            return StepResult(r.train_loss, r.grad_norm, r.tokens, stop_requested_ranks=(0,) if step == 1 else ())

    loop, ckpt, config = _loop(tmp_path, StopAt1(), lambda: DataFault("shard z.bin failed", (0,)))
    result = loop.run()
    assert result.status is RunStatus.ABORTED and result.exit_code == 3 and result.checkpoint is None
    assert result.abort.message == "DATA at the preemption after step 1: shard z.bin failed"
    assert ckpt.calls == [] and not (config.output_dir / "ckpt").exists()
    status = json.loads((config.output_dir / "status.json").read_text())
    assert (status["status"], status["reason"]) == ("aborted", "data")


def test_a_batch_the_model_cannot_embed_is_a_data_fault_not_a_crash() -> None:
    import torch

    from albor.distributed.process_group import DistEnv
    from albor.distributed.step import DeepSpeedStep
    from test_step_combine import FakeEngine, FakeLoader

    class BadIds(FakeLoader):
        def next_batch(self):
            raise DataError("shard train-00001.bin holds token id 70000 at token 5, not below the model's vocab_size 16")

    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    verdict = DataVerdict(None, rank=0, shard_names=NAMES, per_rank=lambda v: [v])
    engine = FakeEngine(norm=1.0)
    step = DeepSpeedStep(engine, BadIds(), env, grad_accumulation=2, gpu=type("G", (), {"read": lambda s: 0.0})(),
                         data_verdict=verdict)
    r = step(0, 1e-3)
    assert r.rank_error is None and r.flagged_ranks == ()  # not LOCAL_ERROR: not exit 14
    assert r.data_fault.ranks == (0,) and "token id 70000" in r.data_fault.message  # this rank's own words
    assert engine.backwards == 2  # the zero-loss backward still ran on every micro-step


def test_verify_data_runs_without_torch(tmp_path: Path) -> None:
    """It reads files and hashes them: importing torch would cost more than verifying a small dataset."""
    import subprocess
    import sys

    ds = arange_dataset(tmp_path).parent
    code = ("import sys; from albor.cli import main; rc = main(['verify-data', sys.argv[1]]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(ds)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "False"
