"""prepare-data's workers end at once on any failure or interrupt, and a signal ends the command in one line.

The workers run stand-ins for the tokenizing (tests/worker_stubs.py) that
sleep far longer than any test waits, as a unit does while it reads a huge
file whose records the filters drop: a worker still alive afterwards, or a
test that takes that long, means the workers were waited for, not ended.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import worker_stubs
from albor.data import unit_worker
from albor.data.corpus import CorpusUnit, ReadOptions
from albor.data.unit_worker import UnitJob, tokenize_units
from albor.errors import DataError, Interrupted, run_command
from test_data_parallel import make_tokenizer

TESTS = Path(__file__).resolve().parent


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def all_gone(pids: list[int], within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not any(map(alive, pids))


def wait_for(predicate, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def units_named(directory: Path, *names: str) -> list[tuple[int, CorpusUnit]]:
    out = []
    for i, name in enumerate(names):
        (directory / name).touch()
        out.append((i, CorpusUnit(directory / name, "text", 1, paths=(directory / name,))))
    return out


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> UnitJob:
    monkeypatch.setattr(unit_worker, "_run_unit", worker_stubs.run_unit)
    return UnitJob(tmp_path, "0" * 64, ReadOptions(), 0.0, 0, tmp_path)


def test_a_failed_unit_ends_the_running_workers_at_once(tmp_path: Path, stubbed: UnitJob) -> None:
    # Unit 0 fails while unit 1's worker is busy for SLEEP_S: it was only stopped at its next batch, or
    # the pool waited for it, before.
    units = units_named(tmp_path, "fail-0", "sleep-1")
    started = time.monotonic()
    with pytest.raises(DataError, match="fail-0:1: not a JSON object"):
        for _ in tokenize_units(stubbed, None, units, workers=2):
            pass
    assert time.monotonic() - started < worker_stubs.SLEEP_S / 3
    pids = worker_stubs.pids(tmp_path)
    assert len(pids) == 2 and all_gone(pids)


def test_a_worker_killed_between_two_units_is_one_data_error_naming_where(tmp_path: Path, stubbed: UnitJob) -> None:
    # 5 units on 2 workers: 4 handed out at once, so taking unit 0 hands out unit 4 to a broken pool.
    units = units_named(tmp_path, *(f"ok-{i}" for i in range(5)))
    tokenized = tokenize_units(stubbed, None, units, workers=2)
    assert next(tokenized)[0] == 0
    victim = worker_stubs.pids(tmp_path)[0]
    os.kill(victim, signal.SIGKILL)  # the OOM killer, while the caller merges unit 0
    assert all_gone([victim])
    pool = tokenized.gi_frame.f_locals["pool"]
    wait_for(lambda: pool._broken, within_s=10)  # the pool noticed: pool.submit now raises BrokenProcessPool itself
    with pytest.raises(DataError, match=r"worker process died .* the units from \S*ok-1 onwards; run again with "
                                        "fewer --workers"):
        next(tokenized)
    assert all_gone(worker_stubs.pids(tmp_path))


def test_run_command_ends_an_interrupt_in_one_line_with_the_signals_code(capsys) -> None:
    def interrupted(signum: int | None):
        def body() -> int:
            raise KeyboardInterrupt if signum is None else Interrupted(signum)
        return body

    assert run_command("albor x", interrupted(None)) == 130
    assert capsys.readouterr().err == "albor x: interrupted by SIGINT\n"
    assert run_command("albor x", interrupted(signal.SIGTERM), interrupted="nothing written") == 143
    assert capsys.readouterr().err == "albor x: interrupted by SIGTERM; nothing written\n"


def test_prepare_data_turns_sigterm_into_an_interrupt_only_while_it_runs(tmp_path: Path, monkeypatch) -> None:
    from albor.data import prepare

    seen = []

    def run(args) -> Path:
        seen.append(signal.getsignal(signal.SIGTERM))
        raise Interrupted(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(prepare, "run", run)
    assert prepare.main(["--output", str(tmp_path / "o")]) == 143
    assert seen and seen[0] not in (before, signal.SIG_DFL)  # while it ran: SIGTERM unwinds like Ctrl-C
    with pytest.raises(Interrupted):
        seen[0](signal.SIGTERM, None)
    assert signal.getsignal(signal.SIGTERM) is before  # and restored after


# A prepare-data process whose workers run the stand-in.
SCRIPT = """
import sys
import worker_stubs
from albor.data import prepare, unit_worker
unit_worker._run_unit = worker_stubs.run_unit
sys.exit(prepare.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signals,code", [
    ((signal.SIGINT, signal.SIGINT), 130),  # Ctrl-C, then Ctrl-C again: it once hung for good
    ((signal.SIGTERM,), 143),  # a Slurm time limit, `timeout`: it once left .OUT.staging-* behind
])
def test_prepare_data_stopped_by_signals_ends_in_one_line_and_leaves_nothing(
    tmp_path: Path, signals: tuple[int, ...], code: int,
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("sleep-a", "sleep-b"):  # a compressed file is one unit: two units, both busy for SLEEP_S
        (corpus / f"{name}.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n'))
    tok = make_tokenizer(tmp_path / "tok")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(corpus), "--tokenizer", str(tok), "--output", str(out), "--workers", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        wait_for(lambda: len(worker_stubs.pids(corpus)) == 2 or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()
        for i, signum in enumerate(signals):  # to the process group, as a terminal or a scheduler sends it
            if i:
                time.sleep(0.3)
            os.killpg(proc.pid, signum)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    name = signal.Signals(signals[0]).name
    assert proc.returncode == code, err
    assert err.splitlines() == [f"albor prepare-data: interrupted by {name}; --output was left as it was "
                                "(nothing of this run remains)"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tok"]  # no .out.staging-*, no out
    assert all_gone(worker_stubs.pids(corpus))
