"""Tokenize a corpus into token shards and an ``index.json``, on every core, in bounded memory.

Every document is followed by the tokenizer's ``<|endoftext|>`` id and sent
to the train or validation split by :mod:`albor.data.split`. The corpus is cut
into units (:func:`albor.data.corpus.plan_units`); worker processes tokenize
them into spill files (:mod:`albor.data.unit_worker`); this process merges
the units in corpus order into the shards, applying the split rule as one
pass over the documents would, and deletes each unit's spill files once
merged. So the output is byte-identical whatever the number of workers (and
whatever the cut into units), and memory is bounded by the workers and the
batch size, never by the corpus. ``--part``/``--combine``
(:mod:`albor.data.parts`) run the same two halves on different machines.

This is the library under ``albor prepare-data`` (:mod:`albor.data.prepare`)
and the raw-corpus cache of a run (:mod:`albor.data.resolve`); it writes into
a fresh directory, which its callers stage and move into place.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from contextlib import closing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from albor.data.corpus import CorpusUnit, ReadCounts, ReadOptions, iter_corpus, plan_units
from albor.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, build_index, dtype_code_for_vocab, write_index
from albor.data.spill import SpillReader, summary_counts
from albor.data.split import DocumentSplitter, UnitSplit, UnitSplitter, split_hash
from albor.data.tokenizer import Tokenizer
from albor.data.unit_worker import UnitJob, default_workers, tokenize_units
from albor.errors import ConfigError, DataError

DEFAULT_VAL_FRACTION = 0.02
# Units of about 1/1024 of the corpus, within [256 KiB, 64 MiB]: enough of them to keep every core of a
# machine busy to the end (a worker's last unit is a small share of its work), few enough to keep the
# per-unit costs (two spill files, a summary) negligible. A function of the files only, so that every
# machine preparing a part of the corpus plans the same units.
MIN_UNIT_BYTES, MAX_UNIT_BYTES, UNITS_PER_CORPUS = 256 << 10, 64 << 20, 1024


@dataclass(frozen=True)
class Recipe:
    """Everything besides the corpus that fixes a dataset's bytes (a part's manifest records it)."""

    vocab_size: int
    eos_id: int
    tokenizer_sha256: str
    val_fraction: float
    options: dict[str, Any]  # read_options_json(...)

    @property
    def dtype_code(self) -> int:
        return dtype_code_for_vocab(self.vocab_size)


def read_options_json(options: ReadOptions) -> dict[str, Any]:
    """The read options as index.json records them."""
    return {
        "text_field": options.text_field, "min_doc_bytes": options.min_doc_bytes,
        "max_doc_bytes": options.max_doc_bytes,
        "languages": None if options.languages is None else sorted(options.languages),
        "extensions": None if options.extensions is None else sorted(options.extensions),
        "skip_bad_records": options.skip_bad_records,
    }


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"validation fraction {val_fraction} is outside [0, 1); use e.g. {DEFAULT_VAL_FRACTION}")


def check_workers(workers: int | None) -> int:
    """``workers``, or the default (every core this process may use); ConfigError below 1."""
    if workers is None:
        return default_workers()
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1")
    return workers


def corpus_units(files: list[Path]) -> list[CorpusUnit]:
    """The units ``files`` are tokenized in; the same on every machine for the same files."""
    total = sum(p.stat().st_size for p in files)
    return plan_units(files, target_bytes=min(MAX_UNIT_BYTES, max(MIN_UNIT_BYTES, total // UNITS_PER_CORPUS)))


def corpus_extra(files: list[Path], tokenizer: Tokenizer) -> dict[str, Any]:
    """What index.json says of a corpus's source."""
    return {
        "tokenizer": str(tokenizer.directory.resolve()),
        "source": {"files": len(files), "bytes": sum(p.stat().st_size for p in files)},
    }


def make_job(tokenizer: Tokenizer, recipe: Recipe, options: ReadOptions, spill_dir: Path) -> UnitJob:
    return UnitJob(tokenizer.directory, tokenizer.sha256, options, recipe.val_fraction, recipe.dtype_code, spill_dir)


def recipe_for(tokenizer: Tokenizer, val_fraction: float, options: ReadOptions) -> Recipe:
    return Recipe(tokenizer.vocab_size, tokenizer.eos_id, tokenizer.sha256, val_fraction, read_options_json(options))


def merge_units(
    units: Iterable[tuple[Path, int, dict[str, Any]]],
    output: Path,
    recipe: Recipe,
    *,
    source: str,
    shard_tokens: int,
    extra: dict[str, Any],
    delete: bool,
    check_sha256: bool = False,
    merged: Callable[[int], None] = lambda unit_id: None,
) -> Path:
    """Write the units' tokens, in the order given, as shards and index.json under ``output``.

    ``units`` yields each unit's spill directory, id and summary; with
    ``delete`` its spill files go once merged. With ``check_sha256`` each spill
    file is hashed as it is copied and must match its summary's sha256 (a part
    that came from another machine); a one-machine merge skips it, since its
    spill files were written moments ago by this run's own workers, into its
    own scratch directory, and are deleted once merged: nothing copied them.
    ``merged(unit_id)`` is called after each unit. Returns the path of index.json.
    """
    dtype_code = recipe.dtype_code
    writers = {split: ShardWriter(output, split, dtype_code=dtype_code, shard_tokens=shard_tokens)
               for split in ("train", "val")}
    splitter = UnitSplitter(lambda split, tokens: writers[split].write(tokens), recipe.val_fraction, source=source)
    counts = ReadCounts()
    try:
        for directory, unit_id, summary in units:
            reader = SpillReader(directory, unit_id, dtype_code, lambda split, tokens: writers[split].write(tokens),
                                 sha256=summary["sha256"] if check_sha256 else None)
            splitter.add_unit(UnitSplit.from_json(summary["split"], recipe.val_fraction), reader)
            reader.check_sha256(f"part {directory}")
            counts.add(summary_counts(summary))
            if delete:
                reader.delete()
            merged(unit_id)
        if (why := counts.nothing_kept(source)) is not None:
            raise DataError(why)
        splitter.finish()
        shards = writers["train"].close() + writers["val"].close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    info = {"documents": dict(splitter.docs), "val_fraction": recipe.val_fraction, "read": counts.to_json(),
            "options": recipe.options, **extra}
    index = build_index(shards, vocab_size=recipe.vocab_size, eos_id=recipe.eos_id,
                        tokenizer_sha=recipe.tokenizer_sha256, extra=info)
    return write_index(output, index)


def tokenize_corpus(
    files: list[Path],
    tokenizer: Tokenizer,
    output: Path,
    *,
    source: str,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    extra: dict[str, Any] | None = None,
    workers: int | None = None,
    options: ReadOptions | None = None,
) -> Path:
    """Tokenize corpus ``files`` into shards under the fresh directory ``output``; returns the path of index.json.

    ``extra`` goes into index.json as is; ``source`` names the corpus in errors
    (the user's paths, not ``output``). Spill files live in a scratch directory
    inside ``output`` while this runs, and are gone when it returns or raises.
    """
    check_val_fraction(val_fraction)
    workers = check_workers(workers)
    options = ReadOptions() if options is None else options
    recipe = recipe_for(tokenizer, val_fraction, options)
    units = list(enumerate(corpus_units(files)))
    output.mkdir(parents=True, exist_ok=True)
    spill_dir = Path(tempfile.mkdtemp(prefix=".spill-", dir=output))
    sizes = {i: unit.size_bytes for i, unit in units}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="tokenizing",
               disable=not sys.stderr.isatty())
    try:
        job = make_job(tokenizer, recipe, options, spill_dir)
        # Closed before the scratch directory goes: a failure stops the workers first.
        with closing(tokenize_units(job, tokenizer, units, workers)) as tokenized:
            done = ((spill_dir, i, summary) for i, summary in tokenized)
            return merge_units(done, output, recipe, source=source, shard_tokens=shard_tokens, extra=extra or {},
                               delete=True, merged=lambda i: bar.update(sizes[i]))
    finally:
        bar.close()
        shutil.rmtree(spill_dir, ignore_errors=True)


def prepare_corpus(files: list[Path], tokenizer: Tokenizer, output: Path, *, extra: dict[str, Any] | None = None,
                   **kwargs: Any) -> Path:
    """:func:`tokenize_corpus` of a user's corpus: index.json also records its files, bytes and tokenizer path."""
    return tokenize_corpus(files, tokenizer, output, extra={**corpus_extra(files, tokenizer), **(extra or {})}, **kwargs)


def check_documents(files: list[Path], val_fraction: float, *, source: str, options: ReadOptions | None = None) -> None:
    """Read every document once without tokenizing; raises what :func:`prepare_corpus` would about them."""
    nothing = np.empty(0, dtype=np.int64)
    splitter = DocumentSplitter(lambda split, tokens: None, val_fraction, source=source)
    for doc in iter_corpus(files, ReadOptions() if options is None else options):
        splitter.add(split_hash(doc.data), nothing)
    splitter.finish()
