"""``albor report``: the figure and the summary of a finished, an aborted and a still-running run; bad input."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from albor.contract import ContractAbort, Regime, check_non_divergence
from albor.errors import ExitCode
from albor.report import main
from albor.report.figure import DPI, FIGSIZE, draw, render_png
from albor.report.run_reader import Metrics, RunData, parse_metrics, read_run
from albor.report.summary import format_summary, gate005_limits, summarize
from albor.resume_plan import CheckpointOnDisk

FIGURE_PIXELS = (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))  # (height, width)


def copy_run(launch, tmp_path: Path) -> Path:
    """The shared fixture's run directory is read-only to tests: report into a copy."""
    run_dir = tmp_path / launch.run_dir.name
    shutil.copytree(launch.run_dir, run_dir, ignore=shutil.ignore_patterns("deepspeed"))  # shards: not read, large
    return run_dir


def report(capsys, *argv: str) -> tuple[int, dict[str, str], str]:
    """(exit code, the summary as {name: value}, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    fields = {}
    for line in out.splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return code, fields, err


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def epoch_metadata(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "ckpt").glob("epoch-*.metadata.json"))]


def assert_png(path: Path) -> None:
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.shape[:2] == FIGURE_PIXELS
    assert image.std() > 0  # something was drawn


def assert_numbers_match_files(fields: dict[str, str], run_dir: Path, rows: list[dict]) -> None:
    """The summary's numbers, recomputed here from the files the run wrote."""
    meta = epoch_metadata(run_dir)
    best = min(meta, key=lambda m: m["val_loss"])
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert fields["best val loss"] == f"{best['val_loss']:.4f} (epoch {best['epoch']})"
    assert fields["tokens seen"] == f"{rows[-1]['tokens_seen']:,}"
    assert fields["median step time"] == f"{statistics.median(r['wall_ms'] for r in rows):.1f} ms"
    assert fields["median tokens/s"] == f"{statistics.median(r['tokens_per_sec'] for r in rows):,.0f}"
    assert fields["optimizer sha"] == f"{meta[-1]['optimizer_state_sha']} (epoch {meta[-1]['epoch']})"
    assert fields["steps"] == f"{len(rows)} recorded, last step {rows[-1]['step']} of {config['total_steps']}"
    # MFU and GPU utilisation as the rows hold them: a device without a known peak FLOP/s (a CPU) records
    # a null mfu, one without NVML records 0; the report then says so instead of drawing zeros.
    mfu = [r["mfu"] for r in rows if isinstance(r.get("mfu"), (int, float))]
    if mfu:
        assert fields["mfu"] == f"{statistics.median(mfu):.1%} (median)"
    else:
        assert fields["mfu"].startswith("not known (")
    readings = [v for r in rows for v in (r.get("gpu_util_per_rank") or [r.get("gpu_util_pct")]) if v is not None]
    if any(v > 0 for v in readings):
        assert fields["gpu utilisation"] == "recorded"
    else:
        assert fields["gpu utilisation"].startswith("no GPU (")


def test_finished_run(finished_dev_run, tmp_path, capsys):
    run_dir = copy_run(finished_dev_run, tmp_path)
    code, fields, err = report(capsys, str(run_dir))
    assert code == 0, err
    assert_png(run_dir / "report.png")
    assert fields["figure"] == str(run_dir / "report.png")
    status = finished_dev_run.status()
    assert fields["status"] == f"{status['status']} (exit 0)"
    assert fields["final val loss"] == f"{status['final_val_loss']:.4f}"
    target = status["target_val_loss"]
    assert fields["target val loss"] == f"{target:g} ({'met' if status['final_val_loss'] <= target else 'missed'})"
    assert_numbers_match_files(fields, run_dir, metrics_rows(run_dir))
    assert len(epoch_metadata(run_dir)) == 3


def test_aborted_run(aborted_dev_run, tmp_path, capsys):
    run_dir = copy_run(aborted_dev_run, tmp_path)
    out = tmp_path / "elsewhere" / "fig.png"
    code, fields, err = report(capsys, str(run_dir), "--output", str(out))
    assert code == 0, err
    assert_png(out)
    assert not (run_dir / "report.png").exists()
    assert fields["status"] == "aborted (exit 12)"
    assert fields["reason"] == "numerical_instability"
    assert "step 6" in fields["message"]
    assert fields["final val loss"] == "none (the run ended aborted)"
    rows = metrics_rows(run_dir)
    assert rows[-1]["step"] == 5  # the poisoned step 6 was never recorded (gate 007)
    assert_numbers_match_files(fields, run_dir, rows)


def test_still_running_run_with_a_torn_last_line(finished_dev_run, tmp_path, capsys):
    run_dir = copy_run(finished_dev_run, tmp_path)
    (run_dir / "status.json").write_text(json.dumps({"status": "running", "world_size": 1}))
    rows = metrics_rows(run_dir)[:7]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:7]) + lines[7][:30])  # caught mid-write
    for p in (run_dir / "ckpt").glob("epoch-002.*"):
        p.unlink()
    code, fields, err = report(capsys, str(run_dir))
    assert code == 0, err
    assert_png(run_dir / "report.png")
    assert fields["status"] == "running"
    assert fields["final val loss"] == "none yet (the run is still running)"
    assert fields["unreadable lines"] == (
        "1 in metrics.jsonl skipped: the last line (8) is cut short: a live or killed run's half-written line")
    assert_numbers_match_files(fields, run_dir, rows)
    assert fields["optimizer sha"].endswith("(epoch 1)")


def test_report_does_not_import_torch(finished_dev_run, tmp_path):
    """`albor report` starts in a second or two, on a machine with or without torch."""
    run_dir = copy_run(finished_dev_run, tmp_path)
    strip_metadata(run_dir, "vocab_size")  # the longest way: the vocabulary from the dataset index, as for an older run
    code = ("import sys; from albor.report import main; code = main([sys.argv[1]]); "
            "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')], 'torch imported'; "
            "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _not_a_run(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "x").mkdir()
    return tmp_path / "x", " is not a run directory"


def _no_step_yet(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "status.json").write_text('{"status": "running"}')
    return tmp_path / "run", " has no metrics.jsonl yet"


def _only_a_torn_line(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 0, "train_lo')
    return tmp_path / "run", "/metrics.jsonl holds no complete step yet"


def _a_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "f").write_text("")
    return tmp_path / "f", " is a file"


@pytest.mark.parametrize("make", [_not_a_run, _no_step_yet, _only_a_torn_line, _a_file,
                                  lambda tmp: (tmp / "missing", " does not exist")])
def test_bad_input_is_one_line_and_exit_2(make, tmp_path, capsys):
    path, problem = make(tmp_path)
    code, fields, err = report(capsys, str(path))
    assert code == ExitCode.USAGE
    assert fields == {}
    assert err.count("\n") == 1 and err.startswith(f"albor report: error: {path}{problem}"), err
    assert not (path / "report.png").exists()


def test_an_unwritable_figure_is_one_line_and_exit_2(finished_dev_run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    code, _, err = report(capsys, str(finished_dev_run.run_dir), "--output", str(tmp_path / "file" / "fig.png"))
    assert code == ExitCode.USAGE
    assert err.startswith("albor report: error: cannot write") and "--output" in err and err.count("\n") == 1


def test_usage_error_is_one_line():
    assert main([]) == ExitCode.USAGE


# ---- pure parts ---------------------------------------------------------------------------------------


def row(step: int, **extra) -> dict:
    return {"step": step, "train_loss": 2.0, "grad_norm": 1.0, "lr": 1e-4, "tokens_per_sec": 100.0,
            "gpu_util_pct": 0.0, "wall_ms": 10.0, "epoch": 0, "tokens_seen": step + 1, **extra}


def test_parse_metrics_keeps_rows_in_order_and_tells_a_torn_last_line_from_damage():
    text = "\n".join([json.dumps(row(0)), "garbage", json.dumps(row(1)), json.dumps({"step": 2}), "",
                      json.dumps(row(2)), '{"step": 3, "tr'])
    metrics = parse_metrics(text)
    assert [r["step"] for r in metrics.rows] == [0, 1, 2]
    assert metrics.damaged_lines == (2, 4)  # not a row, before the last line: damage, by line number
    assert metrics.torn_line == 7  # only the last line may be a live run's half-write
    whole = parse_metrics("\n".join([json.dumps(row(0)), "garbage", json.dumps(row(1))]) + "\n")
    assert (whole.damaged_lines, whole.torn_line) == ((2,), None)
    twice = parse_metrics("\n".join([json.dumps(row(0)), json.dumps(row(1, train_loss=9.0)), json.dumps(row(1))]))
    assert [r["train_loss"] for r in twice.rows] == [2.0, 9.0, 2.0]  # as written: no row silently replaced


def test_the_unreadable_lines_say_which_lines_and_why():
    run = synthetic_run(Path("run"), [row(0)], metrics=Metrics([row(0)], tuple(range(2, 9)), 12))
    line = next(v for k, _, v in (x.partition(": ") for x in format_summary(summarize(run)).splitlines())
                if k == "unreadable lines")
    assert line.strip() == ("8 in metrics.jsonl skipped: lines 2, 3, 4, 5, 6 and 2 more are not a metrics row: "
                            "metrics.jsonl is damaged there; the last line (12) is cut short: a live or killed "
                            "run's half-written line")


@pytest.mark.parametrize("regime,vocab", [(Regime.FINETUNE, None), (Regime.FROM_SCRATCH, 50257)])
def test_gate005_limits_are_the_gate_itself(regime, vocab):
    """Each drawn limit passes gate 005 exactly, and anything above it is an abort."""
    val = [4.0, 3.0, 5.9]
    limits = gate005_limits(list(enumerate(val)), regime, vocab, next_epoch=True)
    assert [n for n, _ in limits] == [0, 1, 2, 3]
    for n, limit in limits:
        check_non_divergence(n, [*val[:n], limit], regime, vocab or 2)
        with pytest.raises(ContractAbort):
            check_non_divergence(n, [*val[:n], math.nextafter(limit, math.inf)], regime, vocab or 2)
    assert gate005_limits(list(enumerate(val)), regime, vocab, next_epoch=False)[-1][0] == 2


def test_gate005_limits_follow_the_recorded_epoch_numbers():
    assert gate005_limits([(0, 4.0)], Regime.FROM_SCRATCH, None, next_epoch=False) == []
    assert gate005_limits([(0, 4.0)], None, None, next_epoch=True) == [(1, 8.0)]
    # Epoch 1's checkpoint is missing: no limit drawn for it, and epoch 2's is unknown (not 2 x epoch 0's val_loss).
    assert gate005_limits([(0, 4.0), (2, 3.0), (3, 2.5)], None, None, next_epoch=True) == [(3, 6.0), (4, 5.0)]


def epoch(n: int, val_loss: float, **extra) -> CheckpointOnDisk:
    tag = f"epoch-{n:03d}"
    meta = {"kind": "epoch", "tag": tag, "epoch": n, "val_loss": val_loss, "optimizer_state_sha": f"sha{n}", **extra}
    return CheckpointOnDisk(tag, "epoch", 4 * (n + 1), n, Path(f"ckpt/{tag}.metadata.json"), Path(f"ckpt/deepspeed/{tag}"), meta)


def synthetic_run(tmp_path: Path, rows: list[dict], *, epochs=(), status=None, metrics=None) -> RunData:
    return RunData(tmp_path, metrics or Metrics(rows), list(epochs), status or {"status": "running"},
                   {"regime": "finetune"})


def panel_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_gpu_utilisation_is_drawn_only_when_some_rank_measured_it(tmp_path):
    measured = [row(s, gpu_util_per_rank=[0.0, 55.0]) for s in range(3)]
    none = [row(s, gpu_util_pct=None) for s in range(3)]
    zeros = [row(s, gpu_util_per_rank=[0.0, 0.0]) for s in range(3)]
    assert summarize(synthetic_run(tmp_path, measured)).gpu_measured
    assert not summarize(synthetic_run(tmp_path, none)).gpu_measured
    assert not summarize(synthetic_run(tmp_path, zeros)).gpu_measured

    run = synthetic_run(tmp_path, measured)
    gpu, step_time = draw(run, summarize(run)).axes[5:7]
    assert [list(line.get_ydata()) for line in gpu.lines] == [[0.0] * 3, [55.0] * 3]  # one line per rank
    assert [list(line.get_ydata()) for line in step_time.lines] == [[10.0] * 3]  # wall_ms, like every step panel
    for rows in (zeros, none):  # a CPU run: the panel says so, and no zeros are drawn as if measured
        run = synthetic_run(tmp_path, rows)
        gpu = draw(run, summarize(run)).axes[5]
        assert len(gpu.lines) == 0 and panel_texts(gpu) == ["no GPU"]
    assert render_png(run, summarize(run)).startswith(b"\x89PNG")  # null readings, no epoch yet: drawn, not raised


def test_the_validation_panel_draws_the_gate005_limits_the_target_and_the_abort(tmp_path):
    abort = {"reason": "divergence", "step": 11, "epoch": 2, "field": "val_loss", "value": 5.5, "message": "m"}
    run = synthetic_run(tmp_path, [row(0)], epochs=[epoch(0, 3.0), epoch(1, 2.5)],
                        status={"status": "aborted", "target_val_loss": 2.2, "abort": abort})
    fig = draw(run, summarize(run))
    val = fig.axes[1]
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in val.lines}
    assert drawn["val loss"] == ([0, 1], [3.0, 2.5])
    assert drawn["gate 005 limit"] == ([0, 1, 2], [10.0, 6.0, 5.0])  # a stopped run: the limit it went over too
    assert drawn["target"][1] == [2.2, 2.2]
    assert drawn["aborted: divergence"] == ([2], [5.5])
    assert [list(line.get_xdata()) for line in fig.axes[0].lines if line.get_label() == "aborted: divergence"] == [[11, 11]]


def test_read_run_reads_the_vocabulary_and_regime_from_the_epoch_metadata(finished_dev_run, builtin_dataset):
    run = read_run(finished_dev_run.run_dir)
    vocab = json.loads((builtin_dataset / "index.json").read_text())["vocab_size"]
    assert (run.vocab_size, run.vocab_source) == (vocab, "epoch 2's metadata")
    assert finished_dev_run.metadata(2)["regime"] == "from-scratch"
    summary = summarize(run)
    assert summary.regime is Regime.FROM_SCRATCH
    assert summary.gate005_limits[0] == (0, Regime.FROM_SCRATCH.epoch_zero_cap(vocab))


def strip_metadata(run_dir: Path, *keys: str) -> None:
    """The epoch metadata as an albor that did not record ``keys`` wrote it."""
    for p in (run_dir / "ckpt").glob("epoch-*.metadata.json"):
        meta = json.loads(p.read_text())
        p.write_text(json.dumps({k: v for k, v in meta.items() if k not in keys}))


def test_an_older_run_gets_the_vocabulary_from_its_dataset_index(finished_dev_run, builtin_dataset, tmp_path):
    run_dir = copy_run(finished_dev_run, tmp_path)
    strip_metadata(run_dir, "vocab_size", "regime")
    run = read_run(run_dir)
    assert run.vocab_size == json.loads((builtin_dataset / "index.json").read_text())["vocab_size"]
    assert run.vocab_source == f"the dataset index {builtin_dataset / 'index.json'}"
    assert summarize(run).regime is Regime.FROM_SCRATCH  # from config.yaml


def test_without_its_dataset_an_older_run_draws_no_epoch_zero_limit_and_says_why(finished_dev_run, tmp_path, capsys):
    run_dir = copy_run(finished_dev_run, tmp_path)
    strip_metadata(run_dir, "vocab_size")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "dataset": str(tmp_path / "gone")}))
    assert list((run_dir / "ckpt").glob("epoch-*.apr"))  # the model files are there: the report does not parse them
    run = read_run(run_dir)
    summary = summarize(run)
    assert run.vocab_size is None and 0 not in [n for n, _ in summary.gate005_limits]
    code, fields, err = report(capsys, str(run_dir))
    assert code == 0, err
    assert fields["epoch 0 limit"].startswith("not drawn (the vocabulary size is unknown: no epoch's metadata")
