"""The prepared GPU check (launcher/gpu_check.sh -> benchmarks/gpu_check.py), known to work before a GPU is at hand.

The script only runs on a machine with a GPU, which few sessions get; a renamed
flag, a changed internal or a wrong comparison would otherwise show up there,
as a wasted GPU run. So: its GPU rows' flags dry-run here, its CPU smoke form
runs here for real (a broken check must fail it), and its verdicts are checked
on made-up runs.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launcher" / "gpu_check.sh"
DRIVER = REPO / "benchmarks" / "gpu_check.py"


# The scripts import their siblings by name, as they do when run from benchmarks/.
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check_bare as gc_bare  # noqa: E402
import gpu_check_data as gc_data  # noqa: E402
import gpu_check_plan as plan_mod  # noqa: E402
import gpu_check_verdicts as verdicts  # noqa: E402


# ── the shell script ──────────────────────────────────────────────────────


def test_script_is_valid_bash_and_hands_over_to_the_driver():
    p = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = SCRIPT.read_text().replace("\\\n", " ")
    commands = [shlex.split(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == ["exec", "python", "benchmarks/gpu_check.py", "$@"]
    assert (REPO / commands[-1][2]).is_file()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine would run the whole check")
def test_script_without_a_gpu_says_so_and_exits_2():
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no NVIDIA GPU" in p.stderr and "--cpu-smoke" in p.stderr


def test_gpu_tests_it_selects_exist():
    for name in plan_mod.GPU_TESTS:
        assert re.search(r"pytest\.mark\.gpu\b|mark\.gpu\b", (REPO / name).read_text()), f"no gpu-marked test in {name}"
    for node in plan_mod.GPU_TESTS_LEFT_OUT:
        path, func = node.split("::")
        assert path in plan_mod.GPU_TESTS and f"def {func}(" in (REPO / path).read_text(), node


# ── the GPU rows, on a CPU: their flags and their dataset ─────────────────


@pytest.fixture(scope="module")
def contract_vocab_dataset(builtin_dataset, tmp_path_factory) -> Path:
    return gc_data.remap_dataset(builtin_dataset, tmp_path_factory.mktemp("gpu-check") / "data", 50257).parent


def test_the_remapped_dataset_keeps_the_token_stream_in_the_contract_vocab(builtin_dataset, contract_vocab_dataset):
    from albor.data.loader import TokenDataset

    src = TokenDataset.open(builtin_dataset / "index.json", vocab_size=4096)
    new = TokenDataset.open(contract_vocab_dataset / "index.json", vocab_size=50257)
    index = json.loads((contract_vocab_dataset / "index.json").read_text())
    assert index["vocab_size"] == 50257 and index["source"]["vocab_size"] == 4096
    for split in ("train", "val"):
        a = np.concatenate([np.asarray(t) for t in src.split(split).arrays]).astype(np.int64)
        b = np.concatenate([np.asarray(t) for t in new.split(split).arrays]).astype(np.int64)
        assert a.shape == b.shape and b.max() < 50257
        # One id each way: each source id always becomes the same new id, and no two share one.
        ids, first, where = np.unique(a, return_index=True, return_inverse=True)
        assert np.array_equal(b, b[first][where])
        assert len(np.unique(b[first])) == len(ids)
    assert b.max() > 4096  # moved, not copied


def _gpu_rows(dataset: Path, config: Path) -> dict[str, list[str]]:
    plan = plan_mod.GPU_PLAN
    rows = {"baseline": plan_mod.baseline_flags(plan, dataset, config),
            "drill": plan_mod.drill_flags(plan, dataset, config)}
    rows.update({lv.key: plan_mod.lever_off_flags(plan, lv, dataset, config) for lv in plan_mod.levers(plan)})
    return rows


def test_each_lever_row_is_the_baseline_with_that_lever_off():
    rows = _gpu_rows(Path("d"), Path("c.yaml"))
    base = rows["baseline"]
    assert "--compile" not in base and "--no-compile" not in base  # auto: compiles where inductor can
    expected = {"compile": ["--no-compile"], "vocab": ["--vocab-multiple", "1"], "prefetch": ["--no-prefetch"],
                "loss_chunk": ["--loss-chunk-tokens", "0"], "deterministic": ["--no-deterministic"]}
    on = {"vocab": ["--vocab-multiple", "64"], "prefetch": ["--prefetch"],
          "loss_chunk": ["--loss-chunk-tokens", "4096"], "deterministic": ["--deterministic"]}
    for key, off in expected.items():
        flags = rows[key]
        assert flags[-len(off):] == off
        rest = flags[:-len(off)]
        if key in on:  # the on flags gone, everything else as in the baseline
            i = base.index(on[key][0])
            assert rest == base[:i] + base[i + len(on[key]):]
        else:
            assert rest == base


def test_every_gpu_row_dry_runs_as_albor_370m_at_16_by_1024(contract_vocab_dataset, tmp_path, capsys):
    from albor.pretrain import main as pretrain_main

    config = tmp_path / "run.yaml"
    config.write_text("val_batches: 1\ntarget_val_loss: 100.0\n")
    expected = {"baseline": {}, "compile": {"compile": "false"}, "vocab": {"vocab_multiple": "1"},
                "prefetch": {"prefetch": "false"}, "loss_chunk": {"loss_chunk_tokens": "0"},
                "deterministic": {"deterministic": "false"}}
    for key, flags in _gpu_rows(contract_vocab_dataset, config).items():
        capsys.readouterr()
        code = pretrain_main([*flags, "--output-dir", str(tmp_path / key), "--dry-run"])
        out = capsys.readouterr()
        assert code == 0, (key, out.err)
        fields = dict(line.split(": ", 1) for line in out.out.splitlines() if ": " in line and not line.startswith("#"))
        if key == "drill":
            assert fields["model"] == "tiny"
            continue
        assert fields["model"] == "albor-370m" and fields["batch_size"] == "16" and fields["seq_length"] == "1024"
        assert fields["total_steps"] == "50" and fields["steps_per_epoch"] == "50"
        defaults = {"compile": "null", "vocab_multiple": "64", "prefetch": "true", "loss_chunk_tokens": "4096",
                    "deterministic": "true"}
        assert {k: fields[k] for k in defaults} == {**defaults, **expected[key]}, key
    # The bare-loop worker takes the same flags after its own.
    own, flags = gc_bare.parse_args(["--json", "x.json", "--", *_gpu_rows(contract_vocab_dataset, config)["baseline"]])
    assert own.json == Path("x.json") and flags[0] == "--dataset"


# ── the verdicts, on made-up runs ─────────────────────────────────────────


def _fake_run(tmp_path: Path, name: str, metrics: list[dict], code: int | None = 0) -> object:
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    log = tmp_path / f"{name}.log"
    log.write_text("albor pretrain: error: something broke\n")
    return verdicts.Run([], run_dir, log, code, 12.0, None)


def _metrics(n: int, util: float = 97.0, loss0: float = 10.0) -> list[dict]:
    return [{"step": s, "train_loss": loss0 - 0.01 * s, "grad_norm": 1.0 + s / 7, "wall_ms": 70.0 + (s % 5),
             "tokens_per_sec": 16384 / ((70.0 + (s % 5)) / 1e3), "mfu": 0.4 + s / 1e3,
             "gpu_util_per_rank": [util]} for s in range(n)]


def test_timed_row_reads_the_window_and_wants_utilisation_on_a_gpu(tmp_path):
    plan = plan_mod.GPU_PLAN
    status, note, values = verdicts.timed_summary(_fake_run(tmp_path, "a", _metrics(50)), plan)
    window = range(20, 50)
    assert status == plan_mod.OK, note
    assert values["step_ms"] == statistics.median(70.0 + (s % 5) for s in window) == 72.0
    assert math.isclose(values["mfu"], statistics.median(0.4 + s / 1e3 for s in window))
    assert values["util_per_rank"] == [97.0]
    status, note, _ = verdicts.timed_summary(_fake_run(tmp_path, "idle", _metrics(50, util=0.0)), plan)
    assert status == plan_mod.FAIL and "utilisation 0" in note
    status, note, _ = verdicts.timed_summary(_fake_run(tmp_path, "short", _metrics(30), code=14), plan)
    assert status == plan_mod.FAIL and "exit 14" in note and "30 logged" in note
    status, _, _ = verdicts.timed_summary(_fake_run(tmp_path, "cpu", _metrics(4, util=0.0)), plan_mod.CPU_PLAN)
    assert status == plan_mod.OK  # no GPU, no utilisation to want


def test_bit_for_bit_means_every_step_exactly(tmp_path):
    a = _metrics(10)
    assert verdicts.compare_steps(a, [dict(r) for r in a])[0] == plan_mod.OK
    b = [dict(r) for r in a]
    b[7]["grad_norm"] = math.nextafter(b[7]["grad_norm"], math.inf)  # one ulp
    status, note, values = verdicts.compare_steps(a, b)
    assert status == plan_mod.FAIL and values == {"first_diff": 7} and "grad_norm" in note
    assert verdicts.compare_steps(a, a[:9])[0] == plan_mod.FAIL
    failed = verdicts.bitwise_summary(_fake_run(tmp_path, "x", a), _fake_run(tmp_path, "y", a, code=12))
    assert failed[0] == plan_mod.FAIL and "rerun failed" in failed[1]


def test_exit_code_is_0_only_when_every_asked_check_ran_and_passed():
    def rows(*statuses):
        return [plan_mod.Row(f"r{i}", "", check, status) for i, (check, status) in enumerate(statuses)]

    assert verdicts.exit_code(rows((True, plan_mod.OK), (True, plan_mod.NA), (False, plan_mod.OK), (False, plan_mod.NOT_SELECTED))) == 0
    assert verdicts.exit_code(rows((True, plan_mod.OK), (False, plan_mod.SKIPPED))) == 0  # a measurement cut for time
    assert verdicts.exit_code(rows((True, plan_mod.SKIPPED), (False, plan_mod.OK))) == 1  # a check cut for time proves nothing
    assert verdicts.exit_code(rows((True, plan_mod.OK), (False, plan_mod.FAIL))) == 1  # a lever that breaks the run
    assert verdicts.exit_code(rows((True, plan_mod.FAIL))) == 1


def test_only_adds_the_rows_a_row_needs():
    assert plan_mod.selected("vocab") == {"vocab", "baseline"}  # its off/on ratio divides by the baseline
    assert plan_mod.selected("nan_drill,bitwise") == {"nan_drill", "bitwise", "baseline"}
    assert plan_mod.selected(None) == set(plan_mod.PRIORITY) == set(plan_mod.build_rows(plan_mod.GPU_PLAN))
    with pytest.raises(ValueError, match="unknown row"):
        plan_mod.selected("baseline,speed")


# ── the CPU smoke form, for real ──────────────────────────────────────────


def _driver(*args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    p = subprocess.run([sys.executable, str(DRIVER), "--cpu-smoke", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    report = json.loads(p.stdout.strip().splitlines()[-1])
    return p, report


def test_cpu_smoke_runs_each_kind_of_row_and_a_broken_check_fails_it(builtin_dataset, tmp_path):
    """Every kind of row for real (the lever rows are the baseline's path with other flags, dry-run above);
    the rerun gets another seed, so bit-for-bit must fail, and only it."""
    out, work = tmp_path / "out", tmp_path / "work"
    p, report = _driver("--dataset", str(builtin_dataset), "--out", str(out), "--work", str(work),
                        "--only", "bitwise,nan_drill,apr,bare", "--break", "repeat-seed")
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    assert report["failed"] == ["bitwise"], p.stdout
    rows = {r["key"]: r for r in report["rows"]}
    status = {k: r["status"] for k, r in rows.items()}
    assert status == {"baseline": "ok", "compile": "not selected", "vocab": "not selected",
                      "prefetch": "not selected", "loss_chunk": "not selected", "deterministic": "not selected",
                      "bare": "ok", "bitwise": "FAIL", "nan_drill": "ok", "apr": "ok", "gpu_tests": "not selected"}
    assert "step 0 differs: train_loss" in rows["bitwise"]["note"]  # another seed: another init

    table = p.stdout.strip().splitlines()[:-1]
    assert (out / "gpu-check.txt").read_text().splitlines() == table
    assert table[0].startswith("== albor GPU check: tiny, fp32, micro-batch 2 x 64, vocab 4099")
    assert table[-1].startswith("== FAIL: failed or not run: bitwise |")
    assert len(table) == 2 + len(rows) + 1
    for row in rows.values():
        assert sum(line.startswith(row["label"]) for line in table) == 1, row["label"]

    # The baseline row from its own metrics.jsonl, here.
    plan = plan_mod.CPU_PLAN
    logged = [json.loads(line) for line in (work / "baseline" / "metrics.jsonl").read_text().splitlines()]
    window = [r for r in logged if r["step"] >= plan.window_start]
    assert [r["step"] for r in logged] == list(range(plan.steps))
    assert rows["baseline"]["values"]["step_ms"] == statistics.median(r["wall_ms"] for r in window)
    assert rows["baseline"]["values"]["mfu"] is None  # no peak FLOP/s for a CPU
    assert rows["baseline"]["values"]["recorded"]["vocab_multiple"] == 64
    assert rows["nan_drill"]["values"]["logged_steps"] == list(range(plan.drill[4]))
    padded_rows = math.ceil(plan.vocab / 64) * 64
    assert rows["apr"]["values"]["padded"] == {"model.embed_tokens.weight": [plan.vocab, padded_rows]}
    assert rows["apr"]["values"]["different"] == [] and rows["apr"]["values"]["tensors"] > 0
    bare = rows["bare"]["values"]
    assert bare["ratio"] == statistics.median(a / b for a, b in zip(bare["albor_ms_blocks"], bare["bare_ms_blocks"]))
    assert not (work / "baseline" / "ckpt").exists()  # dropped once read
    kept = out / "runs"  # beside the table: each run's output and records
    assert sorted(d.name for d in kept.iterdir()) == ["apr", "bare", "baseline", "nan-drill", "rerun"]
    assert (kept / "baseline" / "metrics.jsonl").read_text() == (work / "baseline" / "metrics.jsonl").read_text()
    assert json.loads((kept / "nan-drill" / "status.json").read_text())["exit_code"] == 12


def test_out_of_time_rows_are_skipped_said_so_and_fail_the_check(builtin_dataset, tmp_path):
    p, report = _driver("--dataset", str(builtin_dataset), "--out", str(tmp_path), "--budget-s", "0", timeout=60)
    assert p.returncode == 1
    rows = {r["key"]: r for r in report["rows"]}
    assert all(r["status"] == ("n/a" if k in ("compile", "gpu_tests") else "skipped") for k, r in rows.items()), rows
    assert report["failed"] == ["bitwise", "nan_drill", "apr"]
    assert "out of time" in rows["baseline"]["note"] and "out of time" in p.stdout
