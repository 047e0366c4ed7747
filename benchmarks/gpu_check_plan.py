"""The GPU check's plan: what each row runs (flags, sizes, order), as data; benchmarks/gpu_check.py runs it.

Two plans: the GPU check (albor-370m, bf16, 16 x 1024, 50 steps) and its CPU
smoke form (the tiny model, a few steps). A timed row is the baseline's flags
with one lever switched off; docs/gpu-check.md says why each row is what it is.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

#: The GPU-marked tests the last check runs (each file holds at least one, tests/test_gpu_check.py checks).
GPU_TESTS = ("tests/test_gpu.py", "tests/test_dist_checkpoint.py")
#: Left out for time: the baseline row already checks a real run's NVML utilisation and MFU, on albor-370m.
GPU_TESTS_LEFT_OUT = ("tests/test_gpu.py::test_dev_mode_run_on_one_gpu_records_util_and_mfu",)
SEED = 1234
MFU_GOAL = 0.5  # issue 9: a median step at or under 74 ms for albor-370m, 16 x 1024, on one H200
OVERHEAD_GOAL = 1.02  # the contract loop within 2% of a bare DeepSpeed loop


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the rows run: the GPU check, or its CPU smoke form."""

    device: str  # "cuda" or "cpu"
    model: str
    batch: int
    seq: int
    steps: int
    window_start: int  # timed rows report the median over steps window_start .. steps-1
    warmup_steps: int
    loss_chunk: int  # the "on" value of --loss-chunk-tokens (below batch x seq, or the chunked path never runs)
    vocab: int  # the runs' vocabulary (the source dataset's ids are moved into it: gpu_check_data.py)
    data_max_bytes: int  # of the built-in corpus, when no --dataset is given
    drill: tuple[str, int, int, int, int]  # the NaN drill's model, batch, seq, steps, and the step it poisons
    bare: tuple[int, int, int]  # the bare-loop worker's blocks, steps per block, warm-up steps
    run_timeout_s: float
    first_timeout_s: float  # the first run also compiles with a cold cache
    min_start_s: float  # a row does not start with less of the budget left
    jobs: int  # rows at once (1 on a GPU: the timings and the memory sampling need the device alone)


GPU_PLAN = Plan(
    device="cuda", model="albor-370m", batch=16, seq=1024, steps=50, window_start=20, warmup_steps=5,
    loss_chunk=4096, vocab=50257, data_max_bytes=4_000_000, drill=("tiny", 4, 256, 10, 5), bare=(6, 5, 3),
    run_timeout_s=150.0, first_timeout_s=240.0, min_start_s=25.0, jobs=1,
)
CPU_PLAN = Plan(
    device="cpu", model="tiny", batch=2, seq=64, steps=4, window_start=1, warmup_steps=1,
    loss_chunk=64, vocab=4099, data_max_bytes=1_000_000, drill=("tiny", 2, 64, 4, 2), bare=(2, 1, 1),
    run_timeout_s=120.0, first_timeout_s=120.0, min_start_s=5.0, jobs=2,
)


@dataclasses.dataclass(frozen=True)
class Lever:
    key: str
    on: tuple[str, ...]  # () leaves it to albor's default
    off: tuple[str, ...]
    recorded: str  # its field in status.json (or the epoch metadata)
    on_cpu: bool = True  # False: nothing to switch on a CPU


def levers(plan: Plan) -> list[Lever]:
    return [
        # Auto, not --compile: where inductor cannot run, a forced --compile ends every run with 6 and the
        # whole table with it; auto then runs eager, and the baseline's note shows what the run recorded.
        # On a CPU auto is off, so there is nothing to switch.
        Lever("compile", (), ("--no-compile",), "compile", on_cpu=False),
        Lever("vocab", ("--vocab-multiple", "64"), ("--vocab-multiple", "1"), "vocab_multiple"),
        Lever("prefetch", ("--prefetch",), ("--no-prefetch",), "prefetch"),
        Lever("loss_chunk", ("--loss-chunk-tokens", str(plan.loss_chunk)), ("--loss-chunk-tokens", "0"),
              "loss_chunk_tokens"),
        Lever("deterministic", ("--deterministic",), ("--no-deterministic",), "deterministic"),
    ]


def common_flags(plan: Plan, *, model: str, batch: int, seq: int, steps: int, dataset: Path, config: Path) -> list[str]:
    """The flags every run shares: a from-scratch run of ``steps`` steps in one epoch."""
    return [
        "--dataset", str(dataset), "--config", str(config), "--model", model, "--mode", "from-scratch",
        "--total-steps", str(steps), "--steps-per-epoch", str(steps), "--batch-size", str(batch),
        "--seq-length", str(seq), "--warmup-steps", str(min(plan.warmup_steps, steps)), "--lr-max", "3e-4",
        "--seed", str(SEED),
    ]


def baseline_flags(plan: Plan, dataset: Path, config: Path) -> list[str]:
    """Every lever on."""
    flags = common_flags(plan, model=plan.model, batch=plan.batch, seq=plan.seq, steps=plan.steps,
                         dataset=dataset, config=config)
    for lever in levers(plan):
        flags += lever.on
    return flags


def lever_off_flags(plan: Plan, lever: Lever, dataset: Path, config: Path) -> list[str]:
    """The baseline with ``lever`` switched off."""
    flags = baseline_flags(plan, dataset, config)
    if lever.on:
        i = flags.index(lever.on[0])
        del flags[i:i + len(lever.on)]
    return flags + list(lever.off)


def drill_flags(plan: Plan, dataset: Path, config: Path) -> list[str]:
    """A short run of a small model: what it rehearses (NCCL, the abort, status.json) does not need compiling."""
    model, batch, seq, steps, _ = plan.drill
    return [*common_flags(plan, model=model, batch=batch, seq=seq, steps=steps, dataset=dataset, config=config),
            "--no-compile"]


# ── the rows ──────────────────────────────────────────────────────────────

#: A row's status: NA where it cannot apply (a CPU), NOT_SELECTED outside --only.
OK, FAIL, SKIPPED, NA, NOT_SELECTED = "ok", "FAIL", "skipped", "n/a", "not selected"


@dataclasses.dataclass
class Row:
    """One line of the table, filled in as its run is read."""

    key: str
    label: str
    check: bool  # a correctness check (True) or a measurement (False)
    status: str = NOT_SELECTED
    note: str = ""
    values: dict[str, Any] = dataclasses.field(default_factory=dict)


def build_rows(plan: Plan) -> dict[str, Row]:
    """Every row, in the table's order, none run yet."""
    gpu = plan.device == "cuda"
    first, last = plan.window_start, plan.steps - 1
    rows = [Row("baseline", f"every lever on, steps {first}-{last}", False)]
    rows += [Row(lv.key, " ".join(lv.off), False) for lv in levers(plan)]
    rows += [
        Row("bare", "bare DeepSpeed loop, same engine", False),
        Row("bitwise", "rerun, same seed: bit for bit", True),
        Row("nan_drill", f"NaN drill nan:0:{plan.drill[4]} ({'NCCL' if gpu else 'gloo'})", True),
        Row("apr", ".apr vs zero_to_fp32", True),
        Row("gpu_tests", "GPU-marked tests", True),
    ]
    return {r.key: r for r in rows}


#: The order rows run in: the checks first, the levers after, so a tight budget cuts measurements, not checks.
PRIORITY = ("baseline", "bitwise", "nan_drill", "apr", "gpu_tests", "bare",
            "compile", "deterministic", "loss_chunk", "vocab", "prefetch")
#: What a row needs: the first run to compare with, to read, or (the levers) to divide by.
DEPENDS = {"bitwise": ("baseline",), "apr": ("baseline",),
           **{k: ("baseline",) for k in ("compile", "deterministic", "loss_chunk", "vocab", "prefetch")}}


def selected(only: str | None) -> set[str]:
    """The rows --only asks for, and the rows they need."""
    if only is None:
        return set(PRIORITY)
    keys = {k.strip() for k in only.split(",") if k.strip()}
    unknown = keys - set(PRIORITY)
    if unknown:
        raise ValueError(f"--only: unknown row(s) {', '.join(sorted(unknown))}; the rows: {', '.join(PRIORITY)}")
    return keys | {d for k in keys for d in DEPENDS.get(k, ())}
