"""``albor prepare-data``: tokenize a raw corpus into shards + ``index.json``.

A corpus is a list of files or directories (searched recursively, in sorted
order) of ``.txt`` and ``.py`` files (one document each) and ``.jsonl`` files
(one document per line, in its ``text`` field). Every document is followed by
the tokenizer's ``<|endoftext|>`` id.

Train/validation split: a document goes to validation when the first 8 bytes
of blake2b(its UTF-8 text), read as a fraction of 2**64, fall below
``val_fraction``, so the split does not depend on file order or on the rest of
the corpus. Small corpora may have no document below the threshold; then the
train document with the smallest hash goes to validation instead, so that
``val_fraction > 0`` always yields at least one validation document. To find
it in one pass, the current smallest-hash train document is held back until
a validation document appears (then it is written to train) or the corpus
ends (then it becomes the validation document).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from albor.atomic_files import current_umask
from albor.data.shards import (
    DEFAULT_SHARD_TOKENS,
    INDEX_NAME,
    ShardInfo,
    ShardWriter,
    build_index,
    dtype_code_for_vocab,
    write_index,
)
from albor.data.tokenizer import Tokenizer, load_tokenizer
from albor.errors import AlborError, ConfigError, DataError

CORPUS_SUFFIXES = (".txt", ".py", ".jsonl")
DEFAULT_VAL_FRACTION = 0.02
BATCH_BYTES = 4 * 1024 * 1024  # text per encode_batch call: big enough to keep every core busy
_SHARD_RE = re.compile(r"^(train|val)-\d{5}\.bin$")
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")


@dataclass(frozen=True)
class Document:
    text: str
    data: bytes  # the UTF-8 bytes of ``text``, which the split hash is taken over


def find_corpus_files(inputs: Iterable[Path]) -> list[Path]:
    """Every corpus file under ``inputs``, directories expanded recursively in sorted order."""
    files: list[Path] = []
    for root in inputs:
        root = Path(root)
        if root.is_file():
            if root.suffix not in CORPUS_SUFFIXES:
                raise DataError(f"corpus file {root} is not .txt, .py or .jsonl; convert it or leave it out")
            files.append(root)
        elif root.is_dir():
            found = sorted(p for p in root.rglob("*") if p.suffix in CORPUS_SUFFIXES and p.is_file())
            files.extend(found)
        else:
            raise DataError(f"corpus path {root} does not exist; pass existing files or directories")
    if not files:
        raise DataError(f"no .txt, .py or .jsonl files found in {', '.join(map(str, inputs))}; point at the corpus")
    return files


def read_documents(path: Path) -> Iterator[Document]:
    """The documents of one corpus file; DataError naming file(:line) on bad input."""
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise DataError(f"{path}:{lineno}: not a JSON object ({e}); fix or remove the line") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(
                        f'{path}:{lineno}: no string "text" field; every .jsonl line must be {{"text": "..."}}, '
                        "fix or remove the line"
                    )
                if text:
                    yield Document(text, text.encode("utf-8", "surrogatepass"))
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 ({e}); re-encode it as UTF-8 or leave it out") from None
    if text:
        yield Document(text, data)


def iter_corpus(files: list[Path]) -> Iterator[Document]:
    for path in files:
        yield from read_documents(path)


def split_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def is_validation(h: int, val_fraction: float) -> bool:
    return h < val_fraction * 2.0**64


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


@dataclass
class _Splitter:
    """Routes tokenized documents to the train/val writers (see module docstring)."""

    train: ShardWriter
    val: ShardWriter
    val_fraction: float
    docs: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    _held: tuple[int, np.ndarray] | None = None
    _val_seen: bool = False

    def add(self, h: int, tokens: np.ndarray) -> None:
        if is_validation(h, self.val_fraction):
            self._emit("val", tokens)
            self._val_seen = True
            self._release()
        elif self.val_fraction > 0 and not self._val_seen:
            if self._held is None or h < self._held[0]:
                self._release()
                self._held = (h, tokens)
            else:
                self._emit("train", tokens)
        else:
            self._emit("train", tokens)

    def finish(self) -> None:
        if self._held is not None:
            if self.docs["train"] == 0:
                raise DataError(
                    "the corpus has a single document, too few for both a train and a validation split; "
                    "add documents or pass --val-fraction 0"
                )
            self._emit("val", self._held[1])
            self._held = None

    def _release(self) -> None:
        if self._held is not None:
            self._emit("train", self._held[1])
            self._held = None

    def _emit(self, split: str, tokens: np.ndarray) -> None:
        (self.train if split == "train" else self.val).write(tokens)
        self.docs[split] += 1


def tokenize_documents(
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    output: Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    total_bytes: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Tokenize ``docs`` into shards under ``output``; returns the path of index.json."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {val_fraction} is outside [0, 1); use e.g. 0.02")
    output.mkdir(parents=True, exist_ok=True)
    # index.json is the completion marker: drop the old one before touching shards.
    (output / INDEX_NAME).unlink(missing_ok=True)
    dtype_code = dtype_code_for_vocab(tokenizer.vocab_size)
    train = ShardWriter(output, "train", dtype_code=dtype_code, shard_tokens=shard_tokens)
    val = ShardWriter(output, "val", dtype_code=dtype_code, shard_tokens=shard_tokens)
    splitter = _Splitter(train, val, val_fraction)
    eos = tokenizer.eos_id
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not sys.stderr.isatty())
    try:
        for batch in _prefetch(_batches(docs, BATCH_BYTES)):
            encodings = tokenizer.backend.encode_batch([d.text for d in batch], add_special_tokens=False)
            for doc, enc in zip(batch, encodings):
                ids = enc.ids
                tokens = np.empty(len(ids) + 1, dtype=np.int64)
                tokens[:-1] = ids
                tokens[-1] = eos
                splitter.add(split_hash(doc.data), tokens)
            bar.update(sum(len(d.data) for d in batch))
        splitter.finish()
        shards: list[ShardInfo] = train.close() + val.close()
    except BaseException:
        train.abort()
        val.abort()
        raise
    finally:
        bar.close()
    if splitter.docs["train"] == 0:
        raise DataError(f"no training documents in the corpus for {output}; add data or lower --val-fraction")
    _remove_stale(output, {s.name for s in shards})
    info = {"documents": dict(splitter.docs), "val_fraction": val_fraction, **(extra or {})}
    index = build_index(
        shards, vocab_size=tokenizer.vocab_size, eos_id=eos, tokenizer_sha=tokenizer.sha256, extra=info
    )
    return write_index(output, index)


def _remove_stale(output: Path, keep: set[str]) -> None:
    """Shards of an earlier, larger dataset in the same directory would confuse a reader."""
    for p in output.iterdir():
        if (_SHARD_RE.match(p.name) and p.name not in keep) or _TMP_RE.match(p.name):
            p.unlink(missing_ok=True)


def prepare_corpus(
    inputs: list[Path],
    tokenizer_dir: Path,
    output: Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Tokenize the raw corpus files under ``inputs``; returns the path of index.json."""
    tokenizer = load_tokenizer(tokenizer_dir)
    files = find_corpus_files(inputs)
    total = sum(p.stat().st_size for p in files)
    extra = {"tokenizer": str(Path(tokenizer_dir).resolve()), "source": {"files": len(files), "bytes": total}, **(extra or {})}
    return tokenize_documents(
        iter_corpus(files), tokenizer, output, val_fraction=val_fraction, shard_tokens=shard_tokens,
        total_bytes=total, extra=extra,
    )


def _parser() -> argparse.ArgumentParser:
    from albor.data.builtin import BUILTIN_VAL_FRACTION, BUILTINS, DEFAULT_MAX_BYTES, DEFAULT_VOCAB_SIZE

    p = argparse.ArgumentParser(
        prog="albor prepare-data",
        description="Tokenize a corpus of .txt/.py/.jsonl files (or the built-in python-stdlib corpus) "
        "into token shards and an index.json that `albor pretrain --dataset` reads.",
    )
    p.add_argument("inputs", nargs="*", type=Path, metavar="INPUT", help="corpus files or directories")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="directory with vocab.json + merges.txt")
    p.add_argument("--output", type=Path, metavar="DIR", required=True, help="dataset directory to write")
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help=f"share of documents for validation, by hash (default {DEFAULT_VAL_FRACTION}; "
                   f"{BUILTIN_VAL_FRACTION} with --builtin, whose few large files would otherwise leave "
                   "almost no validation tokens)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizer threads (default: all cores; TOKENIZERS_PARALLELISM=false also forces 1)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help="tokens per shard file at most (default %(default)s)")
    p.add_argument("--builtin", choices=sorted(BUILTINS), help="use a built-in corpus instead of INPUT files")
    p.add_argument("--vocab-size", type=int, default=None, metavar="V",
                   help=f"with --builtin: BPE vocabulary to train (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help=f"with --builtin: cap on source bytes collected (default {DEFAULT_MAX_BYTES})")
    return p


def _set_workers(workers: int | None) -> None:
    if workers is None:
        return
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1")
    # Read by tokenizers' Rayon pool when it first starts, i.e. before any encode.
    os.environ["RAYON_NUM_THREADS"] = str(workers)
    if workers == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _is_replaceable_dataset(output: Path) -> bool:
    """An empty directory, or one holding exactly what prepare-data writes, nothing of the user's."""
    for entry in output.iterdir():
        ours = entry.name == INDEX_NAME or _SHARD_RE.match(entry.name) or (entry.name == "tokenizer" and entry.is_dir())
        if not ours:
            return False
    return True


def _staged(output: Path, build: Callable[[Path], Path], *, keep_out: list[Path]) -> Path:
    """Build the dataset in a staging directory beside ``output``, then swap it in.

    A failure leaves ``output`` exactly as it was (an earlier dataset stays usable).
    Only a directory that is empty or holds nothing but an earlier dataset is ever
    replaced, and never one holding the inputs or the tokenizer of this very run.
    """
    output = Path(output)
    if output.exists():
        if not (output.is_dir() and _is_replaceable_dataset(output)):
            raise ConfigError(
                f"--output {output} exists and holds more than an albor dataset; choose a new or empty directory"
            )
        for path in keep_out:
            if path.resolve().is_relative_to(output.resolve()):
                raise ConfigError(f"{path} lies inside --output {output}, which is replaced: move it or pick another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-", dir=output.parent))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700; the dataset is for the whole team
        build(staging)
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old / output.name)
            try:
                os.replace(staging, output)
            except BaseException:
                os.replace(old / output.name, output)  # put the earlier dataset back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output / INDEX_NAME


def run(args: argparse.Namespace) -> Path:
    _set_workers(args.workers)
    if args.shard_tokens < 1:
        raise ConfigError(f"--shard-tokens {args.shard_tokens} must be positive")
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {args.val_fraction} is outside [0, 1); use e.g. 0.02")
    if args.builtin:
        if args.inputs or args.tokenizer:
            raise ConfigError("--builtin trains its own tokenizer on its own corpus; drop INPUT and --tokenizer")
        from albor.data.builtin import BUILTIN_VAL_FRACTION, DEFAULT_MAX_BYTES, DEFAULT_VOCAB_SIZE, prepare_builtin

        vocab_size = DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size
        max_bytes = DEFAULT_MAX_BYTES if args.max_bytes is None else args.max_bytes
        return _staged(args.output, lambda out: prepare_builtin(
            args.builtin, out, vocab_size=vocab_size, max_bytes=max_bytes,
            val_fraction=BUILTIN_VAL_FRACTION if args.val_fraction is None else args.val_fraction,
            shard_tokens=args.shard_tokens,
        ), keep_out=[])
    if args.vocab_size is not None or args.max_bytes is not None:
        raise ConfigError("--vocab-size and --max-bytes apply to --builtin only; a corpus uses --tokenizer's vocabulary")
    if not args.inputs:
        raise ConfigError("give corpus INPUT files/directories with --tokenizer DIR, or --builtin python-stdlib")
    if args.tokenizer is None:
        raise ConfigError("a raw corpus needs --tokenizer DIR (a directory with vocab.json + merges.txt)")
    val_fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    return _staged(args.output, lambda out: prepare_corpus(
        args.inputs, args.tokenizer, out, val_fraction=val_fraction, shard_tokens=args.shard_tokens,
    ), keep_out=[*args.inputs, args.tokenizer])


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 on --help
        return int(e.code or 0)
    try:
        index_path = run(args)
    except AlborError as e:
        print(f"albor prepare-data: error: {' '.join(str(e).split())}", file=sys.stderr)
        return int(e.exit_code)
    except OSError as e:  # unreadable corpus, unwritable --output, full disk: the user's to fix
        where = e.filename if e.filename is not None else args.output
        print(f"albor prepare-data: error: {where}: {e.strerror or e}; check the path, its permissions "
              "and free disk space", file=sys.stderr)
        return int(DataError.exit_code)
    index = json.loads(index_path.read_text())
    print(
        f"albor prepare-data: wrote {index_path} ({index['tokens']['train']} train / {index['tokens']['val']} val "
        f"tokens, {len(index['shards'])} shards, fingerprint {index['fingerprint'][:16]})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
