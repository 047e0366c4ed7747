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
WORKER_EXIT_S = 5.0  # how long a worker killed with SIGTERM may take to go before SIGKILL


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


def tokenize_unit(job: UnitJob, tokenizer: Tokenizer, unit_id: int, unit: CorpusUnit) -> dict[str, Any]:
    """Tokenize one unit into its spill files; returns its summary (:func:`albor.data.spill.unit_summary`).

    Every document is followed by EOS.
    """
    counts = ReadCounts()
    unit_split = UnitSplit(job.val_fraction)
    spill = SpillWriter(job.spill_dir, unit_id, job.dtype_code)
    eos = tokenizer.eos_id
    try:
        for batch in _batches(read_unit(unit, job.options, counts), BATCH_BYTES):
            for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
                tokens = np.empty(len(ids) + 1, dtype=spill.dtype)
                tokens[:-1] = ids
                tokens[-1] = eos
                spill.write(unit_split.add(split_hash(doc.data), tokens.size), tokens)
        spill.close()
    except BaseException:
        spill.abort()
        raise
    return unit_summary(unit_split, counts, spill.sha256())


# ---- the worker processes ----------------------------------------------------------------------------

_worker: dict[str, Any] = {}  # this worker process's job and (once loaded) tokenizer


def _start_worker(job: UnitJob) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it ends us
    os.environ["RAYON_NUM_THREADS"] = "1"  # before the first encode starts Rayon's pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker.update(job=job)


def _run_unit(unit_id: int, unit: CorpusUnit) -> dict[str, Any]:
    job = _worker["job"]
    if "tokenizer" not in _worker:  # here, not in _start_worker, so that its errors reach the user
        tokenizer = load_tokenizer(job.tokenizer_dir)
        if tokenizer.sha256 != job.tokenizer_sha256:
            raise DataError(f"tokenizer {job.tokenizer_dir} changed while prepare-data was running; run it again")
        _worker["tokenizer"] = tokenizer
    return tokenize_unit(job, _worker["tokenizer"], unit_id, unit)


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


def _end_workers(pool: ProcessPoolExecutor) -> None:
    """Stop ``pool`` now: the units waiting never start, the running ones are killed, and every worker is joined.

    Their output is unwanted (their spill files go with the scratch directory),
    so nothing is waited for: not a unit that reads a whole large file while
    its filters drop every record, not a worker the pool would otherwise join
    only at interpreter exit (a second Ctrl-C during a graceful shutdown used
    to leave the process hung there, its idle workers never told to exit).
    """
    # The executor has no public way to end its workers (Python 3.14's terminate_workers aside).
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:  # every worker signalled first: a second Ctrl-C after this loop leaves none running
        if p.is_alive():
            p.terminate()  # SIGTERM: a worker ignores only SIGINT
    for p in processes:
        p.join(WORKER_EXIT_S)
        if p.is_alive():
            p.kill()
            p.join()


def tokenize_units(job: UnitJob, tokenizer: Tokenizer, units: list[tuple[int, CorpusUnit]],
                   workers: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(unit id, summary) of each of ``units``, in their order, tokenized by ``workers`` processes.

    The caller takes each unit's spill files before asking for the next one. A
    failure in any unit raises here, and any failure or interrupt (here, or in
    the caller: closing this generator) first kills and joins the workers.
    """
    workers = max(1, min(workers, len(units)))
    if workers == 1:
        with _one_thread():
            for unit_id, unit in units:
                yield unit_id, tokenize_unit(job, tokenizer, unit_id, unit)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # imported once in the server, not in every worker
    pending: deque[tuple[int, Future]] = deque()
    todo = iter(units)
    merged = 0  # units yielded so far: units[merged] is the first whose result is still to come
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(job,))
    try:
        while True:
            while len(pending) < UNITS_PER_WORKER * workers and (item := next(todo, None)) is not None:
                pending.append((item[0], pool.submit(_run_unit, *item)))
            if not pending:
                break
            unit_id, future = pending.popleft()
            summary = future.result()
            yield unit_id, summary
            merged += 1
        pool.shutdown()  # every worker idle: they exit at once
    except BrokenProcessPool:  # a worker was killed (the OOM killer, most likely): every pending unit fails with it
        _end_workers(pool)
        raise DataError(
            f"a prepare-data worker process died (killed, or out of memory?) while tokenizing the units from "
            f"{units[merged][1].path} onwards; run again with fewer --workers"
        ) from None
    except BaseException:
        _end_workers(pool)
        raise
