"""Turn a ``--dataset`` argument into the path of an ``index.json``.

Accepted: an ``index.json`` (any ``.json`` file is taken as an index); a
directory holding one; or a raw corpus (files or directories in the formats albor.data.corpus
reads), which is tokenized once into ``{run_dir}/data-cache/`` and reused
while the corpus and tokenizer are unchanged.

Every rank may call this. An exclusive lock on ``{run_dir}/.data-cache.lock``
makes the first caller build the cache and the others wait for it (at most
``lock_timeout_s``, a run's start-up timeout) and reuse it. The cache is built
beside its final place and moved there when complete; when tokenizing fails,
the lock file goes too, and so does the run directory if this call created
it, so a failed run leaves the disk as it found it.

Is the cache still the corpus? Only the rank holding the lock asks, and it
first compares a stat signature of the corpus files (path, size, mtime, ctime,
inode: O(number of files)) with the one recorded in the cache. Any write to a
file changes its ctime, which user space cannot set back, so an equal
signature means unchanged content, and the ranks after the first (and every
later run on an untouched corpus) never read the corpus. Only when the
signature differs is the content hashed (O(corpus bytes), once, by that one
rank): the same content (a copy, a ``touch``) reuses the cache and records the
new signature; other content rebuilds it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from albor.data.corpus import find_corpus_files
from albor.data.shards import FORMAT_VERSION, INDEX_NAME, read_index, write_index
from albor.data.staging import build_into, make_dirs, remove_dirs
from albor.data.tokenizer import Tokenizer, load_tokenizer
from albor.data.tokenizer_match import check_tokenizer_matches
from albor.data.tokenizing import DEFAULT_VAL_FRACTION, check_documents, prepare_corpus
from albor.errors import ConfigError, DataError

CACHE_DIR = "data-cache"
LOCK_NAME = f".{CACHE_DIR}.lock"
_LOCK_POLL_S = 0.2  # how often a waiting rank tries the lock again


def corpus_fingerprint(files: list[Path], tokenizer_sha: str, val_fraction: float) -> str:
    """Content hash of the corpus files in order, plus everything else that shapes the shards."""
    h = hashlib.sha256(f"albor-corpus v{FORMAT_VERSION}\n{tokenizer_sha}\n{val_fraction!r}\n".encode())
    for p in files:
        fh = hashlib.sha256()
        try:
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    fh.update(chunk)
        except OSError as e:
            raise DataError(f"corpus file {p} cannot be read ({e.strerror or e}); check it exists and is readable") from None
        h.update(f"{p.suffix} {fh.hexdigest()}\n".encode())
    return h.hexdigest()


def corpus_signature(files: list[Path], tokenizer_sha: str, val_fraction: float) -> str:
    """Cheap identity of the corpus files as they are on disk now (no byte read), plus what shapes the shards.

    Each file is opened, then fstat'ed: an NFS client may answer a plain stat from its
    attribute cache (up to acregmax, 60 s by default), while an open revalidates it.
    """
    h = hashlib.sha256(f"albor-corpus-stat v{FORMAT_VERSION}\n{tokenizer_sha}\n{val_fraction!r}\n".encode())
    for p in files:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise DataError(f"corpus file {p} cannot be read ({e.strerror or e}); check it exists and is readable") from None
        h.update(f"{p.resolve()} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_dev} {st.st_ino}\n".encode())
    return h.hexdigest()


@contextmanager
def cache_lock(run_dir: Path, timeout_s: float = math.inf) -> Iterator[None]:
    """Hold the run directory's cache lock; on leaving, remove the lock file and what was created for it.

    Both go while the lock is still held, so a waiter may wake up holding a file
    that is gone: it then starts over on a fresh one (compared by inode), in a
    run directory it makes again if need be, and cleans up after itself in turn.
    A waiter gives up after ``timeout_s`` with a DataError (exit 3).
    """
    deadline = time.monotonic() + timeout_s
    created: list[Path] = []
    path = run_dir / LOCK_NAME
    f = None
    held = False
    try:
        while not held:
            try:
                created += make_dirs(run_dir)
                f = open(path, "a+")
            except FileNotFoundError:
                continue  # a rank that failed removed the run directory just now: make it again
            except OSError as e:
                raise ConfigError(
                    f"--output-dir {run_dir} cannot be written ({e.strerror or e}); choose a directory you can write"
                ) from None
            _wait_for_lock(f, path, deadline, timeout_s)
            held = _is_file_at(f, path)
            if not held:
                f.close()
                f = None
        yield
    finally:
        if held:
            path.unlink(missing_ok=True)
        remove_dirs(created)  # only where empty: a finished cache keeps the run directory
        if f is not None:
            f.close()


def _wait_for_lock(f, path: Path, deadline: float, timeout_s: float) -> None:
    """flock without blocking, polled: a blocking flock could not give up at the start-up timeout."""
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise DataError(
                    f"waited {timeout_s:g} s for another rank to tokenize the raw corpus into {path.parent / CACHE_DIR} "
                    f"(it holds {path}); tokenize it once beforehand with `albor prepare-data` and pass its output to "
                    "--dataset, or raise ALBOR_STARTUP_TIMEOUT_S"
                ) from None
            time.sleep(_LOCK_POLL_S)


def _is_file_at(f, path: Path) -> bool:
    try:
        held, there = os.fstat(f.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


def _cached_source(index_path: Path) -> dict | None:
    """The cache's ``source`` record (corpus, fingerprint, signature), or None when there is no usable cache."""
    try:
        source = json.loads(index_path.read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source if isinstance(source, dict) else None


class RunIndex(NamedTuple):
    """Where the index.json a run trains on is."""

    path: Path  # for a raw corpus, it may not be there yet: the run tokenizes it first
    cached: bool  # True: a raw corpus, tokenized by the run itself into path.parent ({run_dir}/data-cache)


def run_index(dataset: Path, run_dir: Path) -> RunIndex:
    """The index.json of a run's ``--dataset``, by the rule training uses (:func:`resolve_dataset`), exporting too.

    A prepared dataset's own: ``dataset`` itself when it is a .json file (an
    index, maybe renamed; opening it validates it), or the index.json of a
    directory holding one. Anything else is a raw corpus, tokenized into
    ``{run_dir}/data-cache/`` (or not there at all).
    """
    dataset = Path(dataset)
    if dataset.is_file() and dataset.suffix == ".json":
        return RunIndex(dataset, cached=False)
    if dataset.is_dir() and (dataset / INDEX_NAME).is_file():
        return RunIndex(dataset / INDEX_NAME, cached=False)
    return RunIndex(Path(run_dir) / CACHE_DIR / INDEX_NAME, cached=True)


def resolve_dataset(
    dataset: Path, tokenizer_dir: Path | None, run_dir: Path, *, log: Callable[[str], None],
    lock_timeout_s: float = math.inf,
) -> Path:
    """Path of the index.json to train on; tokenizes a raw corpus into the run's cache first.

    With a prepared dataset, a ``tokenizer_dir`` must be the tokenizer the dataset was made with.
    A rank waits at most ``lock_timeout_s`` for another that is tokenizing.
    """
    dataset, run_dir = Path(dataset), Path(run_dir)
    index_path, cached = run_index(dataset, run_dir)
    if not cached:
        if tokenizer_dir is not None:
            check_tokenizer_matches(load_tokenizer(tokenizer_dir), index_path, read_index(index_path))
        return index_path
    if not dataset.exists():
        raise ConfigError(
            f"--dataset {dataset} does not exist; pass an index.json, a directory made by `albor prepare-data`, "
            "or a corpus (README, \"Preparing a corpus\": .txt/.py, JSON Lines, parquet, save_to_disk)"
        )
    if dataset.is_dir() and run_dir.resolve().is_relative_to(dataset.resolve()):
        raise ConfigError(
            f"--output-dir {run_dir} lies inside the raw corpus --dataset {dataset}: the run's own metrics.jsonl "
            "would be read as training text; choose an --output-dir outside the corpus"
        )
    files = find_corpus_files([dataset])  # exit 3 if there is nothing to tokenize
    if tokenizer_dir is None:
        raise ConfigError(
            f"--dataset {dataset} is a raw corpus and needs --tokenizer DIR (vocab.json + merges.txt) to "
            "tokenize it; or run `albor prepare-data` first and pass its index.json"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    with cache_lock(run_dir, lock_timeout_s):
        return _tokenized_cache(dataset, files, tokenizer, index_path.parent, log)


def _tokenized_cache(
    dataset: Path, files: list[Path], tokenizer: Tokenizer, cache: Path, log: Callable[[str], None]
) -> Path:
    index_path = cache / INDEX_NAME
    # What a rank killed while building left (see albor.data.staging): no one else holds the lock.
    for leftover in [*cache.parent.glob(f".{cache.name}.staging-*"), *cache.parent.glob(f".{cache.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    signature = corpus_signature(files, tokenizer.sha256, DEFAULT_VAL_FRACTION)
    source = _cached_source(index_path)
    if source is not None and source.get("signature") == signature:
        log(f"dataset: reusing tokenized cache {index_path} for corpus {dataset} (its files are unchanged)")
        return index_path
    fingerprint = corpus_fingerprint(files, tokenizer.sha256, DEFAULT_VAL_FRACTION)  # reads the whole corpus, once
    if source is not None and source.get("fingerprint") == fingerprint:
        log(f"dataset: reusing tokenized cache {index_path} for corpus {dataset} (same content, new file times)")
        index = json.loads(index_path.read_text())
        index["source"] = {**source, "signature": signature}
        write_index(cache, index)  # the next rank, and the next run, need only the stat signature
        return index_path
    if cache.exists():
        log(f"dataset: {cache} was built from another corpus or tokenizer; rebuilding it")
    # Every rank that finds no cache tries in turn: a corpus that cannot be tokenized
    # must fail in one cheap pass each, not in one full tokenization each.
    check_documents(files, DEFAULT_VAL_FRACTION, source=str(dataset))
    log(f"dataset: tokenizing raw corpus {dataset} ({len(files)} files) once into {cache}")
    extra = {"source": {"corpus": str(dataset.resolve()), "files": len(files), "fingerprint": fingerprint,
                        "signature": signature}}
    build_into(cache, lambda out: prepare_corpus(
        files, tokenizer, out, source=str(dataset), val_fraction=DEFAULT_VAL_FRACTION, extra=extra,
    ))
    log(f"dataset: wrote {index_path}")
    return index_path
