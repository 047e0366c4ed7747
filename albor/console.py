"""Console output: everything through the ``albor`` logger, rank 0 only.

Other ranks keep their errors (a rank's own traceback must reach the
operator) and drop the rest, so eight ranks never print eight copies.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm


class BarSafeHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write``: a log line lands above a live progress bar, not inside it.

    Without a bar on the stream, ``tqdm.write`` is a plain write.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


class RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.ERROR


def setup_logging(rank: int, world_size: int) -> logging.Logger:
    log = logging.getLogger("albor")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = BarSafeHandler(sys.stderr)
    prefix = f"[albor r{rank}]" if world_size > 1 else "[albor]"
    handler.setFormatter(logging.Formatter(f"{prefix} %(message)s"))
    handler.addFilter(RankFilter(rank))
    log.addHandler(handler)
    return log


def format_step(record: dict) -> str:
    mfu = record.get("mfu")
    return (
        f"step {record['step']:>6} | loss {record['train_loss']:.4f} | grad_norm {record['grad_norm']:.3f} | "
        f"lr {record['lr']:.2e} | {record['tokens_per_sec']:,.0f} tok/s | {record['wall_ms']:.0f} ms"
        + (f" | mfu {mfu:.1%}" if mfu is not None else "")
    )
