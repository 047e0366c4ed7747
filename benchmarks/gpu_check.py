"""The prepared GPU check: one table of albor-370m's speed, each lever on and off, and the checks only a GPU can make.

``bash launcher/gpu_check.sh`` runs it on one GPU; docs/gpu-check.md says what
each row means and how to read it. Every row is a real ``python -m albor.pretrain``
run in dev mode (one process, NCCL on a GPU), or a small worker beside it:

  timed    albor-370m, bf16, micro-batch 16 x 1024, 50 steps: the median step over
           steps 20-49 (metrics.jsonl's wall_ms), tokens/s, MFU (albor's own, from
           metrics.jsonl), the peak device memory (NVML, sampled here), the NVML
           utilisation each rank recorded; with every lever on, then each one off
  bare     the same engine driven by a bare DeepSpeed loop (gpu_check_bare.py)
  checks   a rerun of the first run compared bit for bit; a NaN drill that must end
           with 12 and a truthful status.json; the first run's .apr against
           zero_to_fp32 (gpu_check_apr.py); the GPU-marked tests

Rows run in order of importance under one deadline (--budget-s): a row that
would start too late is skipped and the table says so. Exit 0: every check
passed and every run finished; 1: a check failed or did not run, or a run broke;
2: no GPU (without --cpu-smoke) or bad usage.

The plan (flags, sizes, order) is in gpu_check_plan.py, what a run's files say
about its row in gpu_check_verdicts.py; this file runs them and draws the table.

``--cpu-smoke`` runs the same rows in a reduced form on a CPU (the tiny model, a
few steps; rows that cannot apply there say "n/a on CPU"): tests/test_gpu_check.py
runs it, so the script is known to work before a GPU is at hand.

    python benchmarks/gpu_check.py [--out DIR] [--budget-s 470]
    python benchmarks/gpu_check.py --cpu-smoke --dataset DIR [--out DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, this directory is on sys.path: its sibling modules import by name.
from gpu_check_plan import (
    CPU_PLAN, FAIL, GPU_PLAN, GPU_TESTS, GPU_TESTS_LEFT_OUT, MFU_GOAL, NA, OK, OVERHEAD_GOAL, PRIORITY, SEED, SKIPPED,
    Lever, Plan, Row, baseline_flags, build_rows, drill_flags, lever_off_flags, levers, selected,
)
from gpu_check_verdicts import Run, apr_summary, bitwise_summary, drill_summary, exit_code, timed_summary

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
#: A launcher around this script may have set these; a dev-mode child must not inherit them.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "ALBOR_FAULT")


# ── running the rows ──────────────────────────────────────────────────────


class MemorySampler:
    """The device's used memory (NVML) sampled every 0.1 s while a row runs; the peak above what was used before."""

    def __init__(self) -> None:
        self._nvml = self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
            # NVML ignores CUDA_VISIBLE_DEVICES: the first visible device, by UUID or index.
            self._handle = (pynvml.nvmlDeviceGetHandleByUUID(visible) if visible.startswith(("GPU-", "MIG-"))
                            else pynvml.nvmlDeviceGetHandleByIndex(int(visible)))
            self._nvml = pynvml
            self.name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = self.name.decode() if isinstance(self.name, bytes) else self.name
        except Exception as e:
            self.reason = f"NVML unavailable ({type(e).__name__}: {e})"
            self.name = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def around(self, fn: Callable[[], Any]) -> tuple[Any, float | None]:
        """(fn(), the peak GiB used above the level before it; None without NVML)."""
        if not self.available:
            return fn(), None
        base, peak, done = self._used(), [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                peak[0] = max(peak[0], self._used())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            out = fn()
        finally:
            done.set()
            thread.join()
        return out, max(peak[0] - base, 0) / 2**30


class Runner:
    """Starts child processes under the deadline, each in its own process group (a timeout kills it whole)."""

    def __init__(self, plan: Plan, work: Path, deadline: float, env: dict[str, str], sampler: MemorySampler | None):
        self.plan, self.work, self.deadline, self.env, self.sampler = plan, work, deadline, env, sampler

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def process(self, name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> Run:
        run_dir, log = self.work / name, self.work / f"{name}.log"
        timeout = min(timeout, max(self.left(), 1.0))
        print(f"[gpu-check] {name}: starting (timeout {timeout:.0f} s)", file=sys.stderr, flush=True)
        t0 = time.monotonic()

        def go() -> int | None:
            with open(log, "w") as out:
                proc = subprocess.Popen(argv, cwd=REPO, env={**self.env, **(env or {})}, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    return proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    return None
                finally:  # the group: stragglers of a finished run, or the whole run at its timeout
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()

        code, peak = self.sampler.around(go) if self.sampler is not None else (go(), None)
        seconds = time.monotonic() - t0
        print(f"[gpu-check] {name}: exit {code} after {seconds:.1f} s", file=sys.stderr, flush=True)
        return Run(argv, run_dir, log, code, seconds, peak)

    def pretrain(self, name: str, flags: list[str], timeout: float, env: dict[str, str] | None = None) -> Run:
        argv = [sys.executable, "-m", "albor.pretrain", *flags, "--output-dir", str(self.work / name)]
        return self.process(name, argv, timeout, env)


def drop_checkpoints(run: Run, keep: bool) -> None:
    """An albor-370m checkpoint is ~6 GB: gone once read, or a dozen runs would fill the device's disk."""
    if not keep:
        shutil.rmtree(run.run_dir / "ckpt", ignore_errors=True)


def run_rows(args: argparse.Namespace, plan: Plan, rows: dict[str, Row], runner: Runner, dataset: Path,
             config: Path) -> None:
    gpu = plan.device == "cuda"
    wanted = selected(args.only)
    runs: dict[str, concurrent.futures.Future] = {}

    def fill(key: str, result: tuple[str, str, dict[str, Any]]) -> None:
        rows[key].status, rows[key].note, rows[key].values = result

    def startable(key: str) -> bool:
        left = runner.left()
        if left < plan.min_start_s:
            fill(key, (SKIPPED, f"out of time: {max(left, 0):.0f} s of the budget left", {}))
            return False
        return True

    def baseline() -> Run | None:
        if not startable("baseline"):
            return None
        run = runner.pretrain("baseline", baseline_flags(plan, dataset, config), plan.first_timeout_s)
        fill("baseline", timed_summary(run, plan))
        rows["baseline"].values["recorded"] = {lv.recorded: run.recorded(lv.recorded) for lv in levers(plan)}
        return run

    def bitwise() -> None:
        if not startable("bitwise"):
            return
        flags = baseline_flags(plan, dataset, config)
        if args.break_check == "repeat-seed":  # the drill of this check: a rerun that cannot match
            flags[flags.index("--seed") + 1] = str(SEED + 1)
            rows["bitwise"].label += " *"
        again = runner.pretrain("rerun", flags, plan.first_timeout_s)
        first = runs["baseline"].result()  # run at the same time as the rerun when jobs > 1
        if first is None:
            fill("bitwise", (SKIPPED if rows["baseline"].status == SKIPPED else FAIL,
                             "no first run to compare with (its row says why)", {}))
        else:
            fill("bitwise", bitwise_summary(first, again))
            if args.break_check == "repeat-seed":
                rows["bitwise"].note = f"(* broken on purpose: --break repeat-seed) {rows['bitwise'].note}"
        drop_checkpoints(again, args.keep)

    def nan_drill() -> None:
        if not startable("nan_drill"):
            return
        at = plan.drill[4]
        env = {} if args.break_check == "nan-drill" else {"ALBOR_FAULT": f"nan:0:{at}"}
        if args.break_check == "nan-drill":
            rows["nan_drill"].label += " *"
        run = runner.pretrain("nan-drill", drill_flags(plan, dataset, config), plan.run_timeout_s, env=env)
        fill("nan_drill", drill_summary(run, at))
        if args.break_check == "nan-drill":
            rows["nan_drill"].note = f"(* broken on purpose: --break nan-drill) {rows['nan_drill'].note}"

    def apr() -> None:
        first = runs["baseline"].result()
        if first is None or first.returncode not in (0, 4):
            return fill("apr", (SKIPPED if rows["baseline"].status == SKIPPED else FAIL,
                                "no finished first run to read (its row says why)", {}))
        if not startable("apr"):
            return
        run = runner.process("apr", [sys.executable, str(BENCH / "gpu_check_apr.py"), str(first.run_dir)],
                             plan.run_timeout_s)
        lines = [line for line in run.log.read_text(errors="replace").splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else None
        fill("apr", apr_summary(result, run.why(), plan))
        drop_checkpoints(first, args.keep)

    def gpu_tests() -> None:
        if not gpu:
            return fill("gpu_tests", (NA, "n/a on CPU (they are skipped without CUDA)", {}))
        if not startable("gpu_tests"):
            return
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TESTS,
                *(f"--deselect={t}" for t in GPU_TESTS_LEFT_OUT)]
        run = runner.process("gpu-tests", argv, plan.run_timeout_s)
        lines = [line for line in run.log.read_text(errors="replace").splitlines() if line.strip()]
        said = lines[-1].strip("= ") if lines else "no output"
        good = run.returncode == 0 and "passed" in said and "skipped" not in said
        fill("gpu_tests", (OK if good else FAIL, said if run.returncode is not None else run.why(), {}))

    def bare() -> None:
        if not startable("bare"):
            return
        blocks, block_steps, warmup = plan.bare
        out = runner.work / "bare.json"
        argv = [sys.executable, str(BENCH / "gpu_check_bare.py"), "--json", str(out), "--blocks", str(blocks),
                "--block-steps", str(block_steps), "--warmup", str(warmup), "--",
                *baseline_flags(plan, dataset, config), "--output-dir", str(runner.work / "bare")]
        run = runner.process("bare", argv, plan.run_timeout_s)
        if run.returncode != 0 or not out.is_file():
            return fill("bare", (FAIL, run.why(), {}))
        r = json.loads(out.read_text())
        goal = "met" if r["ratio"] <= OVERHEAD_GOAL else "NOT met"
        said = (f"albor {r['albor_ms']:.1f} ms, bare {r['bare_ms']:.1f} ms a step ({blocks} ABBA blocks of "
                f"{block_steps}): ratio albor/bare {r['ratio']:.3f} (goal <= {OVERHEAD_GOAL}: {goal})")
        fill("bare", (OK, said, r))

    def lever_row(lever: Lever) -> Callable[[], None]:
        def go() -> None:
            if not gpu and not lever.on_cpu:
                return fill(lever.key, (NA, "n/a on CPU: compile is off there whatever the flag (auto)", {}))
            if not startable(lever.key):
                return
            run = runner.pretrain(f"off-{lever.key}", lever_off_flags(plan, lever, dataset, config),
                                  plan.run_timeout_s)
            status, note, values = timed_summary(run, plan)
            recorded = run.recorded(lever.recorded)
            values["recorded"] = recorded
            if status == OK:
                note = f"recorded {lever.recorded}: {json.dumps(recorded)}" if recorded is not None \
                    else f"{lever.recorded} not recorded in status.json or the epoch metadata"
            fill(lever.key, (status, note, values))
            drop_checkpoints(run, args.keep)
        return go

    tasks: dict[str, Callable[[], Any]] = {
        "baseline": baseline, "bitwise": bitwise, "nan_drill": nan_drill, "apr": apr, "gpu_tests": gpu_tests,
        "bare": bare, **{lv.key: lever_row(lv) for lv in levers(plan)},
    }
    # Submitted in PRIORITY order, each task after the ones it needs: a task waiting on another's future
    # never waits on one that is queued behind it.
    def guarded(key: str) -> Any:
        """The task; a bug or a file it cannot read fails its row, never the table."""
        try:
            return tasks[key]()
        except Exception as e:
            fill(key, (FAIL, f"gpu_check.py itself failed here: {type(e).__name__}: {e}", {}))
            return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=plan.jobs) as pool:
        for key in PRIORITY:
            if key in wanted:
                runs[key] = pool.submit(guarded, key)
        for future in runs.values():
            future.result()
    if "baseline" in runs and runs["baseline"].result() is not None and "apr" not in runs:
        drop_checkpoints(runs["baseline"].result(), args.keep)


# ── the table ─────────────────────────────────────────────────────────────


def render(rows: dict[str, Row], plan: Plan, header: str, footer: str) -> str:
    base = rows["baseline"].values.get("step_ms")
    cpu = plan.device == "cpu"

    def num(row: Row, key: str, fmt: str, na_on_cpu: bool = False) -> str:
        v = row.values.get(key)
        if v is None:
            return "n/a" if (na_on_cpu and cpu and row.status == OK) else "-"
        return fmt.format(v)

    lines = [f"== {header} ==",
             f"{'row':<36} {'step ms':>8} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>8} {'util %/rank':>12} "
             f"{'off/on':>6} {'run s':>6}  result"]
    for row in rows.values():
        if row.key in ("baseline", *(lv.key for lv in levers(plan))) and row.status in (OK, FAIL) and row.values:
            util = ("n/a" if cpu else ",".join(f"{u:.0f}" for u in row.values["util_per_rank"]))
            ratio = f"{row.values['step_ms'] / base:.3f}" if base and row.key != "baseline" else "1" if base else "-"
            lines.append(
                f"{row.label:<36} {num(row, 'step_ms', '{:.1f}'):>8} {num(row, 'tokens_per_s', '{:,.0f}'):>10} "
                f"{num(row, 'mfu', '{:.1%}', True):>6} {num(row, 'peak_mem_gib', '{:.1f}', True):>8} {util:>12} "
                f"{ratio:>6} {num(row, 'run_s', '{:.0f}'):>6}  {row.status}{': ' + row.note if row.note else ''}")
        else:
            result = "PASS" if (row.check and row.status == OK) else row.status
            text = row.note if row.status == NA else f"{result}{': ' + row.note if row.note else ''}"
            lines.append(f"{row.label:<36} {text}")
    lines.append(f"== {footer} ==")
    return "\n".join(lines)


def baseline_note(rows: dict[str, Row], plan: Plan) -> None:
    """The levers as the first run recorded them, and the issue's speed goal (a measurement: it never fails)."""
    row = rows["baseline"]
    if row.status == OK:
        mfu = row.values.get("mfu")
        goal = (f"MFU goal {MFU_GOAL:.0%}: {'met' if mfu >= MFU_GOAL else 'NOT met'}" if mfu is not None
                else "MFU n/a on CPU" if plan.device == "cpu" else "MFU unknown: no peak FLOP/s for this device")
        recorded = ", ".join(f"{k} {json.dumps(v)}" for k, v in row.values.get("recorded", {}).items())
        row.note = f"{goal}; recorded: {recorded}"


# ── main ──────────────────────────────────────────────────────────────────


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="the reduced form on a CPU (tiny model, a few steps)")
    ap.add_argument("--out", type=Path, help="where gpu-check.txt, gpu-check.json and each run's log and "
                    "metrics go (default $OUT, else runs/gpu-check)")
    ap.add_argument("--work", type=Path, help="where the runs go (default a temporary directory, removed after)")
    ap.add_argument("--dataset", type=Path, help="a prepared albor dataset to take tokens from (default: the "
                    "built-in corpus, prepared here); its ids are moved into the plan's vocabulary")
    ap.add_argument("--budget-s", type=float, help="the whole check's deadline (default 470 on a GPU, 600 on a CPU)")
    ap.add_argument("--jobs", type=int, help="rows at once (default 1 on a GPU, 2 for --cpu-smoke)")
    ap.add_argument("--only", help=f"comma-separated rows to run (and what they need): {', '.join(PRIORITY)}")
    ap.add_argument("--break", dest="break_check", choices=("repeat-seed", "nan-drill"),
                    help="break one check on purpose, to see the script fail: the rerun gets another seed, or the "
                    "drill runs without its fault")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and every checkpoint")
    return ap.parse_args(argv)


def keep_records(work: Path, dest: Path) -> None:
    """Each run's log, metrics.jsonl and status.json beside the table: a failed row's cause outlives the work dir."""
    for log in sorted(work.glob("*.log")):
        run = dest / log.stem
        run.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, run / "output.log")
        for name in ("metrics.jsonl", "status.json"):
            if (work / log.stem / name).is_file():
                shutil.copy2(work / log.stem / name, run / name)


def gpu_present() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def child_env(plan: Plan) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    if plan.device == "cpu":  # the smoke form stays on the CPU even on a machine with a GPU
        env.update({"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    return env


def prepare_dataset(args: argparse.Namespace, plan: Plan, work: Path, runner: Runner) -> Path:
    """The runs' dataset: ``--dataset`` (or the built-in corpus) with its ids moved into ``plan.vocab``."""
    source = args.dataset
    if source is None:
        source = work / "source"
        argv = [sys.executable, "-m", "albor.cli", "prepare-data", "--builtin", "python-stdlib", "--output",
                str(source), "--max-bytes", str(plan.data_max_bytes)]
        run = runner.process("prepare-data", argv, 300.0)
        if run.returncode != 0:
            raise SystemExit(f"gpu_check.py: preparing the built-in corpus failed ({run.why()}); log: {run.log}")
    from gpu_check_data import remap_dataset  # numpy and albor's shard format: only once the plan is sound

    return remap_dataset(source, work / "data", plan.vocab).parent


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    try:
        selected(args.only)
    except ValueError as e:
        print(f"gpu_check.py: {e}", file=sys.stderr)
        return 2
    plan = CPU_PLAN if args.cpu_smoke else GPU_PLAN
    plan = dataclasses.replace(plan, jobs=args.jobs or plan.jobs)
    budget = args.budget_s if args.budget_s is not None else 600.0 if args.cpu_smoke else 470.0
    if not args.cpu_smoke and not gpu_present():
        print("gpu_check.py: no NVIDIA GPU here (nvidia-smi -L lists none); the CPU form is --cpu-smoke",
              file=sys.stderr)
        return 2
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "runs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="albor-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    sampler = MemorySampler() if plan.device == "cuda" and plan.jobs == 1 else None
    runner = Runner(plan, work, t0 + budget, child_env(plan), sampler)
    rows = build_rows(plan)
    try:
        dataset = prepare_dataset(args, plan, work, runner)
        config = work / "run.yaml"  # one validation batch; a target every run meets (exit 0, not 4)
        config.write_text("val_batches: 1\ntarget_val_loss: 100.0\n")
        run_rows(args, plan, rows, runner, dataset, config)
    finally:
        keep_records(work, out / "runs")
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    baseline_note(rows, plan)
    elapsed = time.monotonic() - t0
    code = exit_code(list(rows.values()))
    where = (f"{sampler.name if sampler and sampler.name else 'one GPU'} (dev mode, NCCL)" if plan.device == "cuda"
             else "CPU smoke form (dev mode, gloo; timings say nothing)")
    header = (f"albor GPU check: {plan.model}, {'bf16' if plan.device == 'cuda' else 'fp32'}, micro-batch "
              f"{plan.batch} x {plan.seq}, vocab {plan.vocab}, {plan.steps} steps a run, on {where}")
    failed = [r.key for r in rows.values() if r.status == FAIL or (r.check and r.status == SKIPPED)]
    footer = (f"{'PASS' if code == 0 else 'FAIL'}: " + ("every check passed" if code == 0 else
              f"failed or not run: {', '.join(failed)}") + f" | {elapsed:.0f} s of the {budget:.0f} s budget")
    table = render(rows, plan, header, footer)
    report = {
        "plan": dataclasses.asdict(plan), "device": where, "exit_code": code, "failed": failed,
        "skipped": [r.key for r in rows.values() if r.status == SKIPPED], "elapsed_s": elapsed, "budget_s": budget,
        "rows": [dataclasses.asdict(r) for r in rows.values()],
    }
    (out / "gpu-check.txt").write_text(table + "\n")
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table)
    print(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main())
