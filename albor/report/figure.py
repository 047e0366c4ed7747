"""A run's report figure, drawn with matplotlib's Agg canvas into PNG bytes.

No pyplot: pyplot picks a GUI backend and keeps global figures, neither of
which a command that runs on a headless training node wants. This module only
draws: every derived number and verdict (limits, abort, axis span, whether a
GPU was measured) comes from :class:`albor.report.summary.Summary`; the
per-step lines are the run's rows as recorded.
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
from albor.report.summary import Abort, Summary, format_summary, per_rank

#: Size of report.png: FIGSIZE inches at DPI dots per inch (the tests check the pixels).
FIGSIZE = (18.0, 8.0)
DPI = 100
GRID = (2, 4)


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

    def step_panel(ax: Axes, key: str, title: str) -> None:
        ax.plot(steps, [r[key] for r in run.rows], lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    step_panel(axes[0], "train_loss", "training loss")
    _epoch_boundaries(axes[0], run.rows)
    _abort_step(axes[0], summary.status, summary.abort)
    _val_panel(axes[1], summary)
    step_panel(axes[2], "lr", "learning rate")
    step_panel(axes[3], "grad_norm", "gradient norm (before clipping)")
    if summary.grad_clip is not None:
        axes[3].axhline(summary.grad_clip, color="gray", ls="--", lw=1, label="clip")
        axes[3].legend(loc="upper right", fontsize=8)
    step_panel(axes[4], "tokens_per_sec", "tokens/s (global)")
    _gpu_panel(axes[5], run.rows, measured=summary.gpu_measured)
    step_panel(axes[6], "wall_ms", "step time (ms)")
    _text_panel(axes[7], format_summary(summary))
    for i in (0, 2, 3, 4, 5, 6):  # every panel over steps spans the whole run: a live or stopped one shows how far it got
        axes[i].set_xlim(0, summary.step_axis_end)
    return fig


def _val_panel(ax: Axes, summary: Summary) -> None:
    """Validation loss per epoch, with gate 005's limit for each epoch and the target."""
    ax.set_title("validation loss per epoch")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if summary.val_losses:
        ax.plot(*zip(*summary.val_losses), "o-", label="val loss")
    if summary.gate005_limits:
        ax.plot(*zip(*summary.gate005_limits), "v", color="tab:red", ls="none", label="gate 005 limit")
    if summary.target_val_loss is not None:
        ax.axhline(summary.target_val_loss, color="tab:green", ls="--", lw=1, label="target")
    abort = summary.abort
    if abort and abort.val_loss is not None:
        ax.plot([abort.epoch], [abort.val_loss], "X", color="black", ms=10, label=f"aborted: {abort.reason}")
    if not (summary.val_losses or summary.gate005_limits):
        _say(ax, "no epoch validated yet")
    ax.legend(loc="best", fontsize=8)


def _gpu_panel(ax: Axes, rows: Sequence[dict[str, Any]], *, measured: bool) -> None:
    """One line per rank of the GPU utilisation (the mean as one line when a row has no per-rank values)."""
    ax.set_title("GPU utilisation per rank (%)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if not measured:  # never draw made-up numbers: a CPU run records 0 or nothing here
        _say(ax, "no GPU")
        return
    series: dict[int, tuple[list[int], list[float]]] = {}
    for r in rows:
        for rank, value in enumerate(per_rank(r, "gpu_util_per_rank", "gpu_util_pct") or []):
            xs, ys = series.setdefault(rank, ([], []))
            xs.append(r["step"])
            ys.append(value)
    for rank, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, lw=1, label=f"rank {rank}")
    if len(series) > 1:
        ax.legend(loc="best", fontsize=8, ncol=2)


def _epoch_boundaries(ax: Axes, rows: Sequence[dict[str, Any]]) -> None:
    """A dotted line where each epoch after the first starts."""
    for prev, row in zip(rows, rows[1:]):
        if row.get("epoch") != prev.get("epoch"):
            ax.axvline(row["step"] - 0.5, color="gray", ls=":", lw=1)


def _abort_step(ax: Axes, status: str, abort: Abort | None) -> None:
    """Where a run stopped at a step (the stopped step itself is never recorded when a gate fired)."""
    if abort and abort.step is not None:
        ax.axvline(abort.step, color="tab:red", lw=1, label=f"{status}: {abort.reason}")
        ax.legend(loc="upper right", fontsize=8)


def _text_panel(ax: Axes, text: str) -> None:
    ax.axis("off")
    wrapped = "\n".join(textwrap.fill(line, 62, subsequent_indent="    ") for line in text.splitlines())
    ax.text(0, 1, wrapped, va="top", ha="left", family="monospace", fontsize=7, transform=ax.transAxes)


def _say(ax: Axes, words: str) -> None:
    ax.text(0.5, 0.5, words, ha="center", va="center", fontsize=14, color="gray", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
