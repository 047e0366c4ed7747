"""Tokenize documents into token shards and an ``index.json``.

Every document is followed by the tokenizer's ``<|endoftext|>`` id and sent
to the train or validation split by :mod:`albor.data.split`. This is the
library under ``albor prepare-data`` (:mod:`albor.data.prepare`) and the
raw-corpus cache of a run (:mod:`albor.data.resolve`); it writes into a
fresh directory, which its callers stage and move into place.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from albor.data.corpus import Document, iter_corpus
from albor.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, build_index, dtype_code_for_vocab, write_index
from albor.data.split import DocumentSplitter, split_hash
from albor.data.tokenizer import Tokenizer
from albor.errors import ConfigError

DEFAULT_VAL_FRACTION = 0.02
BATCH_BYTES = 4 * 1024 * 1024  # text per encode_batch call: big enough to keep every core busy


def _prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``it`` in a thread so file reading overlaps the (GIL-free) tokenizer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
            return
        q.put(done)

    thread = threading.Thread(target=work, daemon=True, name="albor-corpus-reader")
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer stuck on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


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


def tokenize_documents(
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    output: Path,
    *,
    source: str,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    total_bytes: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Tokenize ``docs`` into shards under the fresh directory ``output``; returns the path of index.json.

    ``source`` names the corpus in errors (the user's paths, not ``output``).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"validation fraction {val_fraction} is outside [0, 1); use e.g. {DEFAULT_VAL_FRACTION}")
    output.mkdir(parents=True, exist_ok=True)
    dtype_code = dtype_code_for_vocab(tokenizer.vocab_size)
    writers = {split: ShardWriter(output, split, dtype_code=dtype_code, shard_tokens=shard_tokens)
               for split in ("train", "val")}
    splitter = DocumentSplitter(lambda split, tokens: writers[split].write(tokens), val_fraction, source=source)
    eos = tokenizer.eos_id
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not sys.stderr.isatty())
    try:
        for batch in _prefetch(_batches(docs, BATCH_BYTES)):
            for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
                tokens = np.empty(len(ids) + 1, dtype=np.int64)
                tokens[:-1] = ids
                tokens[-1] = eos
                splitter.add(split_hash(doc.data), tokens)
            bar.update(sum(len(d.data) for d in batch))
        splitter.finish()
        shards = writers["train"].close() + writers["val"].close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
    info = {"documents": dict(splitter.docs), "val_fraction": val_fraction, **(extra or {})}
    index = build_index(
        shards, vocab_size=tokenizer.vocab_size, eos_id=eos, tokenizer_sha=tokenizer.sha256, extra=info
    )
    return write_index(output, index)


def check_documents(files: list[Path], val_fraction: float, *, source: str) -> None:
    """Read every document once without tokenizing; raises what :func:`tokenize_documents` would about them."""
    nothing = np.empty(0, dtype=np.int64)
    splitter = DocumentSplitter(lambda split, tokens: None, val_fraction, source=source)
    for doc in iter_corpus(files):
        splitter.add(split_hash(doc.data), nothing)
    splitter.finish()


def prepare_corpus(
    files: list[Path],
    tokenizer: Tokenizer,
    output: Path,
    *,
    source: str,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Tokenize corpus ``files`` (see :func:`albor.data.corpus.find_corpus_files`) into ``output``.

    Returns the path of index.json; ``source`` names the corpus in errors.
    """
    total = sum(p.stat().st_size for p in files)
    extra = {
        "tokenizer": str(tokenizer.directory.resolve()),
        "source": {"files": len(files), "bytes": total},
        **(extra or {}),
    }
    return tokenize_documents(
        iter_corpus(files), tokenizer, output, source=source, val_fraction=val_fraction,
        shard_tokens=shard_tokens, total_bytes=total, extra=extra,
    )
