"""The GPU check's verdicts: what a finished run's files say about its row (pure: files in, verdict out).

Each ``*_summary`` returns (status, note, values) for one row of the table; a
made-up run directory is all a test needs (tests/test_gpu_check.py).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_check_plan import FAIL, OK, SKIPPED, Plan, Row


@dataclasses.dataclass
class Run:
    """One finished child process and what it left."""

    argv: list[str]
    run_dir: Path
    log: Path
    returncode: int | None  # None: killed at its timeout
    seconds: float
    peak_mem_gib: float | None = None

    def metrics(self) -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def status(self) -> dict[str, Any] | None:
        path = self.run_dir / "status.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def recorded(self, field: str) -> Any:
        """``field`` as the run recorded it: status.json first, then its epoch metadata; None when absent."""
        status = self.status() or {}
        if field in status:
            return status[field]
        for meta in sorted((self.run_dir / "ckpt").glob("epoch-*.metadata.json")):
            found = json.loads(meta.read_text())
            if field in found:
                return found[field]
        return None

    def exit_codes(self) -> dict[int, int]:
        out = {}
        for path in sorted((self.run_dir / "ranks").glob("rank-*.exit.json")):
            record = json.loads(path.read_text())
            out[int(record["rank"])] = int(record["exit_code"])
        return out

    def why(self) -> str:
        """How the process ended, with the last line of its log that says why."""
        if self.returncode is None:
            return f"killed at its timeout after {self.seconds:.0f} s"
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "no output")
        return f"exit {self.returncode}: {said[:160]}"


def timed_summary(run: Run, plan: Plan) -> tuple[str, str, dict[str, Any]]:
    """(status, note, values) of a timed row from its run: medians over the window, and whether it is sound."""
    rows = run.metrics()
    if run.returncode not in (0, 4) or [r["step"] for r in rows] != list(range(plan.steps)):
        return FAIL, f"the run did not finish its {plan.steps} steps ({run.why()}; {len(rows)} logged)", {}
    window = [r for r in rows if r["step"] >= plan.window_start]
    per_rank = list(zip(*(r["gpu_util_per_rank"] for r in window)))
    mfus = [r["mfu"] for r in window]
    values = {
        "step_ms": statistics.median(r["wall_ms"] for r in window),
        "tokens_per_s": statistics.median(r["tokens_per_sec"] for r in window),
        "mfu": statistics.median(mfus) if None not in mfus else None,
        "peak_mem_gib": run.peak_mem_gib,
        "util_per_rank": [statistics.median(u) for u in per_rank],
        "run_s": run.seconds,
        "final_train_loss": rows[-1]["train_loss"],
    }
    if plan.device == "cuda":
        idle = [r for r, u in enumerate(values["util_per_rank"]) if not u > 0]
        if idle:
            return FAIL, f"NVML utilisation 0 while training on rank(s) {idle}", values
    return OK, "", values


def bitwise_summary(first: Run, again: Run) -> tuple[str, str, dict[str, Any]]:
    """Same seed, same flags: every step's loss and grad norm must be identical (floats as written, exactly)."""
    a, b = first.metrics(), again.metrics()
    if not a or first.returncode not in (0, 4):
        return FAIL, f"the first run failed ({first.why()})", {}
    if again.returncode not in (0, 4):
        return FAIL, f"the rerun failed ({again.why()})", {}
    return compare_steps(a, b)


def compare_steps(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> tuple[str, str, dict[str, Any]]:
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return FAIL, f"different steps logged: {len(a)} and {len(b)}", {}
    for x, y in zip(a, b):
        for field in ("train_loss", "grad_norm"):
            if x[field] != y[field]:
                note = f"step {x['step']} differs: {field} {x[field]!r} then {y[field]!r}"
                return FAIL, note, {"first_diff": x["step"]}
    return OK, f"{len(a)} steps: loss and grad_norm identical", {"steps": len(a)}


def drill_summary(run: Run, at: int) -> tuple[str, str, dict[str, Any]]:
    """A NaN loss on rank 0 at step ``at``: exit 12, status.json aborted for that reason, at that step, on that rank."""
    status = run.status() or {}
    abort = status.get("abort") or {}
    seen = {
        "exit": run.returncode, "rank_exit_codes": run.exit_codes(), "status": status.get("status"),
        "status_exit_code": status.get("exit_code"), "reason": status.get("reason"), "abort_step": abort.get("step"),
        "abort_ranks": abort.get("ranks"), "abort_field": abort.get("field"),
        "logged_steps": [r["step"] for r in run.metrics()],
    }
    want = {
        "exit": 12, "rank_exit_codes": {0: 12}, "status": "aborted", "status_exit_code": 12,
        "reason": "numerical_instability", "abort_step": at, "abort_ranks": [0], "abort_field": "train_loss",
        "logged_steps": list(range(at)),
    }
    wrong = [f"{k} {seen[k]!r} (want {want[k]!r})" for k in want if seen[k] != want[k]]
    if wrong:
        return FAIL, "; ".join(wrong), seen
    return OK, f"exit 12; status.json: aborted, numerical_instability at step {at} on rank 0", seen


def apr_summary(result: dict[str, Any] | None, why: str, plan: Plan) -> tuple[str, str, dict[str, Any]]:
    if result is None or "error" in result:
        return FAIL, (result or {}).get("error", why), result or {}
    problems = []
    if result["different"]:
        problems.append(f"{len(result['different'])} tensor(s) differ: {', '.join(result['different'][:4])}")
    if result["missing"]:
        problems.append(f"not in zero_to_fp32: {', '.join(result['missing'][:4])}")
    if result["apr_dtypes"] != ["torch.float32"]:
        problems.append(f"the .apr holds {result['apr_dtypes']}, not float32 only")
    if plan.device == "cuda" and not result["bf16"]:
        problems.append("the run was not bf16 (ds_config.json)")
    if problems:
        return FAIL, "; ".join(problems), result
    padded = "".join(f"; {n.split('.')[-2]} {rows[0]} of {rows[1]} padded rows" for n, rows in result["padded"].items())
    kind = "bf16" if result["bf16"] else "fp32"
    return OK, f"{result['tensors']} tensors ({result['elements']:,} values) identical, {kind} run{padded}", result


def exit_code(rows: Sequence[Row]) -> int:
    """0 only when every check that was asked for passed and every run asked for finished."""
    for row in rows:
        if row.status == FAIL or (row.check and row.status == SKIPPED):
            return 1
    return 0
