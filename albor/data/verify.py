"""The full check of a prepared dataset: every shard's sha256 and largest token id against index.json.

Opening a dataset (``TokenDataset.open``) reads only headers and sizes, so a
run starts in O(number of shards). This module reads every byte, once: by
``albor verify-data DIR`` on demand, and in a run by one rank per node in the
background during the first steps (:class:`BackgroundVerification`; how the
ranks then agree: albor.distributed.data_verdict, docs/data-verification.md).

Shards are checked on threads, one shard per thread at a time: hashlib and
numpy's max release the GIL on large buffers, so threads scale with the cores
without the cost of sending shards to processes (benchmarks/bench_startup.py
measures it).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from albor.data.shards import REGENERATE, ShardInfo, dataset_fingerprint, index_path, read_header, read_index, scan_shard
from albor.errors import DataError


class Cancelled(Exception):
    """The verification was cancelled (:meth:`BackgroundVerification.cancel`) before it finished."""


@dataclasses.dataclass(frozen=True)
class ShardProblem:
    """One shard that does not hold what index.json says; ``message`` is one line with the fix."""

    position: int  # the shard's place in index.json's list of shards
    name: str
    message: str


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """What a verification checked and what it found."""

    index_path: Path
    shards: int
    bytes: int
    seconds: float
    workers: int
    problems: tuple[ShardProblem, ...]  # in index order

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> ShardProblem | None:
        return self.problems[0] if self.problems else None


def default_workers() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_shard(
    directory: Path, position: int, entry: dict[str, Any], vocab_size: int,
    on_bytes: Callable[[int], None] | None = None,
) -> ShardProblem | None:
    """None when the shard is exactly what its index entry says and every id is below ``vocab_size``."""
    name = entry["name"]
    path = directory / name

    def problem(what: str) -> ShardProblem:
        return ShardProblem(position, name, f"shard {path}: {what}")

    try:
        header = read_header(path)  # missing, truncated, foreign: its own one-line DataError
        if header.count != entry["tokens"]:
            return problem(f"holds {header.count} tokens but index.json lists {entry['tokens']}; {REGENERATE}")
        sha, max_id = scan_shard(path, header, on_bytes)
    except DataError as e:
        return ShardProblem(position, name, str(e))
    except OSError as e:
        return problem(f"cannot be read ({e.strerror or e}); check its permissions and the disk")
    if sha != entry["sha256"]:
        return problem(
            f"sha256 is {sha} but index.json says {entry['sha256']}: the file changed after prepare-data wrote it; "
            f"copy it again from a good copy of the dataset, or {REGENERATE}"
        )
    if max_id >= vocab_size:
        return problem(
            f"holds token id {max_id}, not below the vocab_size {vocab_size}: it was made with another tokenizer "
            f"or is corrupt; {REGENERATE} with the model's tokenizer"
        )
    return None


def verify_dataset(
    dataset: str | Path, *, vocab_size: int | None = None, workers: int | None = None, progress: bool = False,
    cancel: threading.Event | None = None,
) -> VerifyReport:
    """Check every shard of ``dataset`` (an index.json or its directory) in full, on ``workers`` threads.

    ``vocab_size`` defaults to the index's own. Problems with the index itself (not JSON, a
    fingerprint that does not match its shard list) raise DataError; problems with shards are
    collected, one per shard, so one pass names every bad shard. ``progress`` shows a byte
    bar on a terminal (tqdm stays silent when stderr is not one). Once ``cancel`` is set,
    every thread stops at its next chunk (and no shard starts): :class:`Cancelled` is raised.
    """
    path = index_path(dataset)
    index = read_index(path)
    infos = [ShardInfo(e["name"], e["split"], e["tokens"], e["sha256"]) for e in index["shards"]]
    if dataset_fingerprint(infos, index["tokenizer_sha256"], index["format_version"]) != index["fingerprint"]:
        raise DataError(f"index {path} has a fingerprint that does not match its shards; {REGENERATE}")
    vocab = int(index["vocab_size"] if vocab_size is None else vocab_size)
    entries = index["shards"]
    total = sum(_size(path.parent / e["name"]) for e in entries)
    workers = max(1, min(workers or default_workers(), len(entries) or 1))
    started = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="verify-data", disable=None if progress else True,
              leave=False) as bar:
        lock = threading.Lock()

        stop = threading.Event() if cancel is None else cancel

        def advance(n: int) -> None:
            if stop.is_set():
                raise Cancelled
            if progress:
                with lock:
                    bar.update(n)

        def check(item: tuple[int, dict[str, Any]]) -> ShardProblem | None:
            if stop.is_set():
                raise Cancelled
            return check_shard(path.parent, item[0], item[1], vocab, advance)

        # The pool's threads are joined (on leaving the block, and at interpreter exit) only after every
        # shard queued: stopping must empty the queue and end the shards being read.
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="albor-verify") as pool:
            try:
                found = list(pool.map(check, enumerate(entries)))
            except BaseException:  # Ctrl-C in verify-data, or a bug: not after reading every other shard
                stop.set()
                raise
    problems = tuple(p for p in found if p is not None)
    return VerifyReport(path, len(entries), total, time.perf_counter() - started, workers, problems)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # check_shard names the missing file


class BackgroundVerification:
    """One rank's :func:`verify_dataset` of a run's dataset, on a daemon thread.

    The training loop never waits for it, except before the first checkpoint
    (albor.distributed.data_verdict). Any failure of the verification itself
    (the index gone, a bug) counts as a problem: unverified data is never trusted.
    A run that ends calls :meth:`cancel`: its reader threads would otherwise keep
    the process alive (they are joined at exit) until every shard was hashed.
    """

    def __init__(self, dataset: Path, *, vocab_size: int, workers: int,
                 on_done: Callable[[VerifyReport | None, ShardProblem | None], None] | None = None) -> None:
        self.dataset, self.vocab_size, self.workers = Path(dataset), vocab_size, workers
        self.report: VerifyReport | None = None
        self._problem: ShardProblem | None = None
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, name="albor-verify-data", daemon=True)

    def start(self) -> BackgroundVerification:
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Stop the verification: each thread at its next chunk; no shard starts. Does not wait.

        A cancelled verification reports a problem (its data stays unverified) and calls no ``on_done``.
        """
        self._cancel.set()

    def _run(self) -> None:
        try:
            self.report = verify_dataset(self.dataset, vocab_size=self.vocab_size, workers=self.workers,
                                         cancel=self._cancel)
            self._problem = self.report.first_problem
        except Cancelled:
            self._problem = ShardProblem(-1, index_path(self.dataset).name, "the dataset verification was cancelled")
            return  # done (the finally), with no on_done: the run that wanted its verdict has ended
        except Exception as e:  # DataError from the index, or anything else: the data stays unverified
            detail = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
            self._problem = ShardProblem(-1, index_path(self.dataset).name, f"verifying the dataset failed: {detail}")
        finally:
            self._done.set()
        if self._on_done is not None:
            self._on_done(self.report, self._problem)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def problem(self) -> ShardProblem | None:
        """The first problem found (by index order); None while running or when the data is good."""
        return self._problem if self._done.is_set() else None

    def wait(self) -> ShardProblem | None:
        """Block until the verification has finished; its first problem, or None."""
        self._done.wait()
        return self._problem
