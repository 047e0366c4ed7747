"""Where each step's record goes besides metrics.jsonl: the console, and TensorBoard when asked.

On a terminal, rank 0 draws a tqdm bar (step, loss, tokens/s, ETA). Into a
log file (stderr not a TTY) it writes a plain line every ``log_every`` steps
instead, since a bar's carriage returns would fill a log with half-lines.
Other ranks have no per-step sink at all (:meth:`StepOutput.for_run`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from albor.console import format_step

log = logging.getLogger("albor")

TENSORBOARD_DIR = "tensorboard"


class ConsoleProgress:
    """Rank 0's per-step callback: a progress bar on a terminal, periodic log lines otherwise."""

    def __init__(self, *, total_steps: int, log_every: int, stream: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self.log_every = log_every
        self.stream = stream if stream is not None else sys.stderr
        self.use_bar = self.stream.isatty()
        self._bar: tqdm | None = None

    def __call__(self, record: Mapping[str, Any]) -> None:
        if not self.use_bar:
            if record["step"] % self.log_every == 0:
                log.info(format_step(record))
            return
        if self._bar is None:  # opened at the first step this process runs: a resumed run starts part-way
            self._bar = tqdm(total=self.total_steps, initial=record["step"], unit="step", desc="train",
                             file=self.stream, dynamic_ncols=True, smoothing=0.1)
        self._bar.set_postfix_str(f"loss {record['train_loss']:.4f}, {record['tokens_per_sec']:,.0f} tok/s", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TensorBoardLog:
    """Each step's record as TensorBoard scalars under ``{run_dir}/tensorboard``, one tag per field.

    The tags are metrics.jsonl's field names, so the two never disagree on
    what a number is; a per-rank list becomes ``field/rank{R}``.
    """

    def __init__(self, run_dir: Path) -> None:
        # torch's writer needs the tensorboard package; config validation refuses --tensorboard without it.
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def __call__(self, record: Mapping[str, Any]) -> None:
        step = record["step"]
        for name, value in scalars(record).items():
            self._writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self._writer.close()


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a step record as {tag: value}: nulls and the step itself left out."""
    out: dict[str, float] = {}
    for name, value in record.items():
        if name == "step" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = float(value)
        elif isinstance(value, (list, tuple)):
            out.update({f"{name}/rank{r}": float(v) for r, v in enumerate(value) if isinstance(v, (int, float))})
    return out


class StepOutput:
    """Every per-step sink of a run, called in turn; ``close`` them all when the loop is done."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    @classmethod
    def for_run(cls, *, rank: int, run_dir: Path, total_steps: int, log_every: int, tensorboard: bool) -> StepOutput:
        """Rank 0 (the rank that writes the run's files): the console, plus TensorBoard when ``tensorboard``.

        Every other rank gets no sink: nothing of theirs would be shown or written.
        """
        if rank != 0:
            return cls()
        sinks: list[Any] = [ConsoleProgress(total_steps=total_steps, log_every=log_every)]
        if tensorboard:
            sinks.append(TensorBoardLog(run_dir))
        return cls(*sinks)

    def __call__(self, record: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink(record)

    def close(self) -> None:
        """Close every sink once; later calls do nothing."""
        sinks, self.sinks = self.sinks, ()
        for sink in sinks:
            sink.close()
