"""Per-step output: the progress bar on a terminal, plain lines in a log, TensorBoard, and the --tensorboard config."""

from __future__ import annotations

import importlib.util
import io
import logging

import pytest
import yaml

from albor.config import resolve_config
from albor.console import BarSafeHandler, format_step
from albor.errors import ConfigError
from albor.progress import ConsoleProgress, StepOutput, TensorBoardLog, scalars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:  # tqdm asks for the terminal's width through it
        raise io.UnsupportedOperation


def record(step: int, **extra) -> dict:
    return {"step": step, "train_loss": 1.234567, "grad_norm": 0.5, "lr": 1e-4, "tokens_per_sec": 12345.6,
            "gpu_util_pct": 0.0, "wall_ms": 20.0, "epoch": 0, "tokens_seen": 256 * (step + 1), "mfu": None, **extra}


@pytest.fixture
def albor_lines():
    """What the ``albor`` logger emits at INFO, through a handler of the test's own."""
    log = logging.getLogger("albor")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: lines.append(r.getMessage())
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield lines
    log.removeHandler(handler)
    log.setLevel(old_level)


def test_a_log_file_gets_plain_lines_every_log_every_steps(albor_lines):
    stream = io.StringIO()  # not a TTY
    progress = ConsoleProgress(total_steps=10, log_every=4, stream=stream)
    for step in range(10):
        progress(record(step))
    progress.close()
    assert albor_lines == [format_step(record(s)) for s in (0, 4, 8)]
    assert stream.getvalue() == ""  # no bar, no carriage returns in a log


def test_a_terminal_gets_a_bar_with_step_loss_throughput_and_eta(albor_lines):
    stream = Terminal()
    progress = ConsoleProgress(total_steps=10, log_every=1, stream=stream)
    for step in range(5, 8):  # a resumed run: the bar starts part-way
        progress(record(step))
    progress.close()
    last = stream.getvalue().replace("\n", "\r").split("\r")[-2]  # the bar as it was left on close
    assert "8/10" in last and "loss 1.2346" in last and "12,346 tok/s" in last
    assert "<" in last  # tqdm's "elapsed<remaining": the ETA
    assert albor_lines == []  # the bar replaces the periodic lines


def test_a_log_line_lands_above_the_bar_not_inside_it():
    stream = Terminal()
    log = logging.getLogger("albor.test_progress")
    log.propagate = False
    handler = BarSafeHandler(stream)
    log.addHandler(handler)
    try:
        progress = ConsoleProgress(total_steps=10, log_every=1, stream=stream)
        progress(record(0))
        log.warning("epoch 0: val_loss 2.0")
        progress(record(1))
        progress.close()
    finally:
        log.removeHandler(handler)
    pieces = stream.getvalue().replace("\n", "\r").split("\r")
    assert "epoch 0: val_loss 2.0" in pieces  # a whole line of its own
    assert any("2/10" in p for p in pieces[pieces.index("epoch 0: val_loss 2.0"):])  # the bar drawn again below it


def test_scalars_are_the_records_numbers_with_per_rank_lists_split():
    out = scalars(record(3, gpu_util_per_rank=[10.0, 20.0], flag=True, note="x"))
    assert out["train_loss"] == 1.234567 and out["tokens_seen"] == 1024.0
    assert (out["gpu_util_per_rank/rank0"], out["gpu_util_per_rank/rank1"]) == (10.0, 20.0)
    assert not {"step", "mfu", "flag", "note", "gpu_util_per_rank"} & set(out)


def test_step_output_calls_every_sink_and_closes_them_once():
    calls = []

    class Sink:
        def __call__(self, r):
            calls.append(r["step"])

        def close(self):
            calls.append("closed")

    out = StepOutput(Sink(), Sink())
    out(record(7))
    out.close()
    out.close()
    assert calls == [7, 7, "closed", "closed"]


def test_rank_0_gets_the_console_and_tensorboard_where_asked_other_ranks_nothing(tmp_path, albor_lines):
    kinds = lambda out: [type(s).__name__ for s in out.sinks]  # noqa: E731
    common = dict(run_dir=tmp_path, total_steps=10, log_every=1)
    assert kinds(StepOutput.for_run(rank=0, tensorboard=False, **common)) == ["ConsoleProgress"]
    assert not (tmp_path / "tensorboard").exists()
    out = StepOutput.for_run(rank=0, tensorboard=True, **common)
    try:
        assert kinds(out) == ["ConsoleProgress", "TensorBoardLog"]
        assert (tmp_path / "tensorboard").is_dir()
    finally:
        out.close()
    for tensorboard in (False, True):  # no console work (not even a dropped log line), no TensorBoard file
        other = StepOutput.for_run(rank=1, tensorboard=tensorboard, **{**common, "run_dir": tmp_path / "r1"})
        assert other.sinks == ()
        other(record(0))
        other.close()
        assert albor_lines == [] and not (tmp_path / "r1").exists()


def test_tensorboard_log_writes_the_records_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLog(tmp_path)
    for step in range(3):
        tb(record(step, train_loss=float(step), gpu_util_per_rank=[1.0, 2.0]))
    tb.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert [e.value for e in events.Scalars("gpu_util_per_rank/rank1")] == [2.0, 2.0, 2.0]


# ---- the config switch ----------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "index.json").write_text("{}")
    return d


def test_tensorboard_is_off_by_default_and_a_yaml_boolean_turns_it_on(data, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # as if installed
    assert resolve_config(flags={"dataset": data, "output_dir": data.parent / "run"}).tensorboard is False
    config = resolve_config(file_values={"tensorboard": True}, flags={"dataset": data, "output_dir": data.parent / "run"})
    assert config.tensorboard is True
    assert yaml.safe_load(config.to_yaml())["tensorboard"] is True


def test_tensorboard_takes_only_a_boolean(data):
    with pytest.raises(ConfigError, match="tensorboard: 'yes' is not a valid bool"):
        resolve_config(file_values={"tensorboard": "yes"}, flags={"dataset": data, "output_dir": data.parent / "run"})


def test_tensorboard_without_the_package_is_refused_in_one_line(data, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError) as refused:
        resolve_config(file_values={"tensorboard": True}, flags={"dataset": data, "output_dir": data.parent / "run"})
    assert "the tensorboard package is not installed: pip install 'albor[tensorboard]'" in str(refused.value)
    assert "\n" not in str(refused.value)
