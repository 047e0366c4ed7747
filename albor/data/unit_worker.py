"""Tokenizing corpus units in worker processes, each into its spill files (:mod:`albor.data.spill`).

A worker does everything that costs CPU: reading, decompressing and parsing
its unit (:func:`albor.data.corpus.read_unit`), the split hash, and the
tokenizer, a batch of about :data:`BATCH_BYTES` of text at a time, on one
core each (Rayon's pool is held to one thread), so N workers use N cores.

Workers are processes from a ``forkserver``: the tokenizers library's thread
pool does not survive ``fork``, and the server forks them before any tokenizer
has run. :func:`tokenize_units` hands out units in corpus order and yields
their summaries in that order, with at most two units per worker between
handing out and merging, so that the spill files waiting on disk stay bounded
too. One worker runs the same code in this process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from albor.data.corpus import CorpusUnit, Document, ReadCounts, ReadOptions, read_unit
from albor.data.spill import SpillWriter, unit_summary
from albor.data.split import UnitSplit, split_hash
from albor.data.tokenizer import Tokenizer, load_tokenizer
from albor.errors import DataError

BATCH_BYTES = 1 << 20  # text per encode_batch call; one worker runs it on one core, so bigger gains nothing
UNITS_PER_WORKER = 2  # handed out but not yet merged, per worker: one tokenizing, one waiting


def default_workers() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class UnitJob:
    """What every worker needs besides its units; picklable."""

    tokenizer_dir: Path
    tokenizer_sha256: str
    options: ReadOptions
    val_fraction: float
    dtype_code: int
    spill_dir: Path


class _Stopped(Exception):
    """Another unit failed: this one's result is not wanted."""


def _batches(docs: Iterable[Document], batch_bytes: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.data)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_unit(job: UnitJob, tokenizer: Tokenizer, unit_id: int, unit: CorpusUnit,
                  stop: Any = None) -> dict[str, Any]:
    """Tokenize one unit into its spill files; returns its summary (:func:`albor.data.spill.unit_summary`).

    Every document is followed by EOS. ``stop`` (an Event) ends the work early.
    """
    counts = ReadCounts()
    unit_split = UnitSplit(job.val_fraction)
    spill = SpillWriter(job.spill_dir, unit_id, job.dtype_code)
    eos = tokenizer.eos_id
    try:
        for batch in _batches(read_unit(unit, job.options, counts), BATCH_BYTES):
            if stop is not None and stop.is_set():
                raise _Stopped
            for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
                tokens = np.empty(len(ids) + 1, dtype=spill.dtype)
                tokens[:-1] = ids
                tokens[-1] = eos
                spill.write(unit_split.add(split_hash(doc.data), tokens.size), tokens)
        spill.close()
    except BaseException:
        spill.abort()
        raise
    return unit_summary(unit_split, counts)


# ---- the worker processes ----------------------------------------------------------------------------

_worker: dict[str, Any] = {}  # this worker process's job, stop event and (once loaded) tokenizer


def _start_worker(job: UnitJob, stop: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops us
    os.environ["RAYON_NUM_THREADS"] = "1"  # before the first encode starts Rayon's pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(job=job, stop=stop)


def _run_unit(unit_id: int, unit: CorpusUnit) -> dict[str, Any]:
    job = _worker["job"]
    if "tokenizer" not in _worker:  # here, not in _start_worker, so that its errors reach the user
        tokenizer = load_tokenizer(job.tokenizer_dir)
        if tokenizer.sha256 != job.tokenizer_sha256:
            raise DataError(f"tokenizer {job.tokenizer_dir} changed while prepare-data was running; run it again")
        _worker["tokenizer"] = tokenizer
    return tokenize_unit(job, _worker["tokenizer"], unit_id, unit, _worker["stop"])


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tokenize on this thread only while the block runs (one worker means one core)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def tokenize_units(job: UnitJob, tokenizer: Tokenizer, units: list[tuple[int, CorpusUnit]],
                   workers: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(unit id, summary) of each of ``units``, in their order, tokenized by ``workers`` processes.

    The caller takes each unit's spill files before asking for the next one. A
    failure in any unit raises here, once the other workers have stopped.
    """
    workers = max(1, min(workers, len(units)))
    if workers == 1:
        with _one_thread():
            for unit_id, unit in units:
                yield unit_id, tokenize_unit(job, tokenizer, unit_id, unit)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # imported once in the server, not in every worker
    stop = context.Event()
    pending: deque[tuple[int, Future]] = deque()
    todo = iter(units)
    paths = {unit_id: unit.path for unit_id, unit in units}
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(job, stop)) as pool:
        try:
            while True:
                while len(pending) < UNITS_PER_WORKER * workers and (item := next(todo, None)) is not None:
                    pending.append((item[0], pool.submit(_run_unit, *item)))
                if not pending:
                    return
                unit_id, future = pending.popleft()
                try:
                    summary = future.result()
                except BrokenProcessPool:  # killed: the OOM killer, most likely
                    raise DataError(
                        f"a prepare-data worker process died while tokenizing {paths[unit_id]} (killed, or out of "
                        "memory?); run again with fewer --workers"
                    ) from None
                yield unit_id, summary
        except BaseException:
            stop.set()  # the running units end at their next batch; the waiting ones never start
            for _, future in pending:
                future.cancel()
            raise
