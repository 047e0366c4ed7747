"""A run's report figure, drawn with matplotlib's Agg canvas into PNG bytes.

No pyplot: pyplot picks a GUI backend and keeps global figures, neither of
which a command that runs on a headless training node wants. Every number
drawn comes from :mod:`albor.report.summary` or straight from the run's rows.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from albor.report.run_reader import RunData
from albor.run_files import finite_number
from albor.report.summary import FINISHED, Summary, format_summary, gate005_limits, per_rank, regime_of

#: Size of report.png: FIGSIZE inches at DPI dots per inch (the tests check the pixels).
FIGSIZE = (18.0, 8.0)
DPI = 100
GRID = (2, 4)
#: The per-rank step time a row may carry (ms, in rank order); drawn when present.
STEP_TIME_PER_RANK = "wall_ms_per_rank"


def render_png(run: RunData, summary: Summary) -> bytes:
    """The whole report figure as PNG bytes."""
    buf = io.BytesIO()
    draw(run, summary).savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def draw(run: RunData, summary: Summary) -> Figure:
    """The report figure: eight panels on a 2 x 4 grid, in reading order (see the README)."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(*GRID).ravel()
    fig.suptitle(f"{run.run_dir.name}: {summary.status}" + (f" ({summary.reason})" if summary.reason else ""))
    steps = [r["step"] for r in run.rows]
    last_step = max(steps[-1], (summary.total_steps or 0) - 1)

    def step_panel(ax: Axes, key: str, title: str) -> None:
        ax.plot(steps, [r[key] for r in run.rows], lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    step_panel(axes[0], "train_loss", "training loss")
    _epoch_boundaries(axes[0], run.rows)
    _abort_step(axes[0], run.status)
    _val_panel(axes[1], run, summary)
    step_panel(axes[2], "lr", "learning rate")
    step_panel(axes[3], "grad_norm", "gradient norm (before clipping)")
    if finite_number(run.config.get("grad_clip")):
        axes[3].axhline(run.config["grad_clip"], color="gray", ls="--", lw=1, label="clip")
        axes[3].legend(loc="upper right", fontsize=8)
    step_panel(axes[4], "tokens_per_sec", "tokens/s (global)")
    _per_rank_panel(axes[5], run.rows, "gpu_util_per_rank", "gpu_util_pct", "GPU utilisation per rank (%)",
                    empty="no GPU" if not summary.gpu_measured else None)
    _per_rank_panel(axes[6], run.rows, STEP_TIME_PER_RANK, "wall_ms", "step time (ms)",
                    note=None if any(STEP_TIME_PER_RANK in r for r in run.rows) else "per-rank step time not recorded")
    _text_panel(axes[7], format_summary(summary))
    for i in (0, 2, 3, 4, 5, 6):  # every panel over steps spans the whole run: a live or stopped one shows how far it got
        axes[i].set_xlim(0, max(last_step, 1))
    return fig


def _val_panel(ax: Axes, run: RunData, summary: Summary) -> None:
    """Validation loss per epoch, with gate 005's limit for each epoch and the target."""
    ax.set_title("validation loss per epoch")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    epochs = [m["epoch"] for m in run.epochs if finite_number(m.get("val_loss"))]
    losses = [m["val_loss"] for m in run.epochs if finite_number(m.get("val_loss"))]
    if losses:
        ax.plot(epochs, losses, "o-", label="val loss")
    limits = gate005_limits(losses, regime_of(run), run.vocab_size, next_epoch=summary.status not in FINISHED)
    if limits:
        ax.plot(*zip(*limits), "v", color="tab:red", ls="none", label="gate 005 limit")
    if summary.target_val_loss is not None:
        ax.axhline(summary.target_val_loss, color="tab:green", ls="--", lw=1, label="target")
    abort = run.status.get("abort") if isinstance(run.status.get("abort"), dict) else {}
    if abort.get("field") == "val_loss" and isinstance(abort.get("epoch"), int) and finite_number(abort.get("value")):
        ax.plot([abort["epoch"]], [abort["value"]], "X", color="black", ms=10, label=f"aborted: {abort.get('reason')}")
    if not (losses or limits):
        _say(ax, "no epoch validated yet")
    ax.legend(loc="best", fontsize=8)


def _per_rank_panel(ax: Axes, rows: Sequence[dict[str, Any]], key: str, mean_key: str, title: str,
                    *, empty: str | None = None, note: str | None = None) -> None:
    """One line per rank of ``key`` (``mean_key`` as one line when a row has no per-rank values)."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if empty:  # never draw made-up numbers: a CPU run records 0 or nothing here
        _say(ax, empty)
        return
    series: dict[int, tuple[list[int], list[float]]] = {}
    for r in rows:
        for rank, value in enumerate(per_rank(r, key, mean_key) or []):
            xs, ys = series.setdefault(rank, ([], []))
            xs.append(r["step"])
            ys.append(value)
    for rank, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, lw=1, label=f"rank {rank}")
    if len(series) > 1:
        ax.legend(loc="best", fontsize=8, ncol=2)
    if note:
        ax.text(0.02, 0.96, note, transform=ax.transAxes, va="top", fontsize=8, color="gray")


def _epoch_boundaries(ax: Axes, rows: Sequence[dict[str, Any]]) -> None:
    """A dotted line where each epoch after the first starts."""
    for prev, row in zip(rows, rows[1:]):
        if row.get("epoch") != prev.get("epoch"):
            ax.axvline(row["step"] - 0.5, color="gray", ls=":", lw=1)


def _abort_step(ax: Axes, status: dict[str, Any]) -> None:
    """Where a run stopped at a step (the stopped step itself is never recorded when a gate fired)."""
    abort = status.get("abort") if isinstance(status.get("abort"), dict) else {}
    if isinstance(abort.get("step"), int):
        ax.axvline(abort["step"], color="tab:red", lw=1, label=f"{status.get('status')}: {abort.get('reason')}")
        ax.legend(loc="upper right", fontsize=8)


def _text_panel(ax: Axes, text: str) -> None:
    ax.axis("off")
    wrapped = "\n".join(textwrap.fill(line, 62, subsequent_indent="    ") for line in text.splitlines())
    ax.text(0, 1, wrapped, va="top", ha="left", family="monospace", fontsize=7, transform=ax.transAxes)


def _say(ax: Axes, words: str) -> None:
    ax.text(0.5, 0.5, words, ha="center", va="center", fontsize=14, color="gray", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
