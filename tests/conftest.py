"""Shared fixtures: the small builtin dataset, and a launcher for real multi-process runs.

Every launch runs in its own process group with a hard timeout, so a hung
collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT_S = 300.0  # a last resort: collective timeouts end a hung run well before it
#: How often a watched launch calls its observer (see :func:`launch`).
OBSERVE_EVERY_S = 0.2
# Variables a surrounding launcher may have set; a child run must not inherit them.
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ALBOR_FAULT")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return  # no torch import for a run without gpu tests
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def builtin_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small python-stdlib corpus, tokenized once per session: a directory holding index.json."""
    from albor.data.prepare import main as prepare

    out = tmp_path_factory.mktemp("builtin") / "data"
    code = prepare(["--builtin", "python-stdlib", "--output", str(out), "--max-bytes", "2000000"])
    assert code == 0, f"albor prepare-data exited {code}"
    assert (out / "index.json").is_file()
    return out


def clean_environment() -> dict[str, str]:
    """This process's environment without the variables of a launcher around the test run."""
    return {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}


@pytest.fixture
def child_environment() -> dict[str, str]:
    """:func:`clean_environment`, for a test that starts a command of its own (its own copy to change)."""
    return clean_environment()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Launch:
    """One finished run: the launcher's exit code, its wall time, its run directory and its output.

    ``observed`` is what the launch's observer returned while the run was live (None without one).
    """

    returncode: int
    elapsed: float
    run_dir: Path
    output: str
    argv: list[str]
    observed: Any = None

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def status(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "status.json").read_text())

    def metadata(self, epoch: int) -> dict[str, Any]:
        return json.loads((self.run_dir / "ckpt" / f"epoch-{epoch:03d}.metadata.json").read_text())

    def exit_records(self) -> dict[int, dict[str, Any]]:
        """{rank: that rank's own ``ranks/rank-R.exit.json``}; a rank killed outright has none."""
        records = {}
        for path in sorted((self.run_dir / "ranks").glob("rank-*.exit.json")):
            record = json.loads(path.read_text())
            assert path.name == f"rank-{record['rank']}.exit.json", (path, record)
            records[record["rank"]] = record
        return records

    def exit_codes(self) -> dict[int, int]:
        """{rank: the exit code that rank recorded for itself}."""
        return {rank: record["exit_code"] for rank, record in self.exit_records().items()}

    def tail(self, n: int = 4000) -> str:
        return f"$ {' '.join(self.argv)}\n(exit {self.returncode}, {self.elapsed:.1f} s)\n{self.output[-n:]}"


def launch(
    how: str,
    args: Sequence[str],
    run_dir: Path,
    *,
    nproc: int = 2,
    env: Mapping[str, str] | None = None,
    timeout: float = LAUNCH_TIMEOUT_S,
    observe: Callable[[Path], Any] | None = None,
) -> Launch:
    """Run ``albor.pretrain`` under ``deepspeed``, ``torchrun`` or plain ``python`` into ``run_dir``.

    A fresh master port per launch; the whole process tree is killed on timeout
    and the test fails with the output so far. With ``observe``, the run
    directory is handed to it every :data:`OBSERVE_EVERY_S` while the run is
    live, until it returns something other than None: that value becomes
    ``Launch.observed`` (e.g. status.json read as soon as the first step is logged).
    """
    if how == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--quiet", "--num_gpus", str(nproc), "--master_port", str(free_port()),
               "--module", "albor.pretrain"]
    elif how == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
               "-m", "albor.pretrain"]
    elif how == "python":
        cmd = [sys.executable, "-m", "albor.pretrain"]
    else:
        raise ValueError(f"unknown launcher {how!r}")
    cmd += [*args, "--output-dir", str(run_dir)]
    child_env = clean_environment()
    # One thread a rank: 2 ranks on 2 cores, and a loaded machine does not oversubscribe
    # (a dev-mode run with default threads was measured 6x slower on a busy 2-core box).
    child_env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    child_env.update(env or {})
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: a timeout kills the ranks too
    )
    try:
        out, observed = _wait(proc, start + timeout, run_dir, observe)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        elapsed = time.monotonic() - start
        pytest.fail(f"run hung: killed after {elapsed:.0f} s\n$ {' '.join(cmd)}\n{(out or '')[-4000:]}")
    finally:  # stragglers (a rank the launcher forgot, a run an observer error left) must not outlive the test
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - start
    return Launch(proc.returncode, elapsed, run_dir, out, cmd, observed)


def _wait(proc: subprocess.Popen, deadline: float, run_dir: Path, observe) -> tuple[str, Any]:
    """(the run's whole output, what ``observe`` returned while it was live, or None)."""
    while observe is not None:
        try:  # a retried communicate() loses no output (subprocess docs)
            return proc.communicate(timeout=OBSERVE_EVERY_S)[0], None
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                raise
        if (value := observe(run_dir)) is not None:
            return proc.communicate(timeout=max(deadline - time.monotonic(), 0.0))[0], value
    return proc.communicate(timeout=max(deadline - time.monotonic(), 0.0))[0], None


@pytest.fixture(scope="session")
def albor_launch():
    """``launch`` itself (see :func:`launch`)."""
    return launch


#: A short one-process (dev-mode) run of the tiny preset: 3 epochs of 4 steps, micro-batch 4 x 64 tokens.
DEV_RUN_ARGS = [
    "--model", "tiny", "--mode", "from-scratch", "--total-steps", "12", "--steps-per-epoch", "4",
    "--batch-size", "4", "--seq-length", "64", "--warmup-steps", "2", "--lr-max", "1e-3",
]


@pytest.fixture(scope="session")
def dev_run_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 validation batch (speed) and a target the tiny run certainly meets."""
    p = tmp_path_factory.mktemp("dev-run-config") / "run.yaml"
    p.write_text("val_batches: 1\ntarget_val_loss: 100.0\n")
    return p


@pytest.fixture(scope="session")
def finished_dev_run(builtin_dataset: Path, dev_run_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """A real finished run (exit 0) for tests that read a run directory: reports, exports. Shared: do not change it."""
    run_dir = tmp_path_factory.mktemp("dev-run") / "finished"
    run = launch("python", ["--dataset", str(builtin_dataset), "--config", str(dev_run_config), *DEV_RUN_ARGS], run_dir)
    assert run.returncode == 0, run.tail()
    return run


@pytest.fixture(scope="session")
def aborted_dev_run(builtin_dataset: Path, dev_run_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """The same run aborted by a NaN loss at step 6 (exit 12), after epoch 0's checkpoint. Shared: do not change it."""
    run_dir = tmp_path_factory.mktemp("dev-run") / "aborted"
    run = launch("python", ["--dataset", str(builtin_dataset), "--config", str(dev_run_config), *DEV_RUN_ARGS],
                 run_dir, env={"ALBOR_FAULT": "nan:0:6"})
    assert run.returncode == 12, run.tail()
    return run
