"""``albor prepare-data``: tokenize a corpus, or a built-in one, into a dataset directory.

The command: flags, the checks on them, and putting the dataset at
``--output`` all or nothing. The tokenizing itself is
:mod:`albor.data.tokenizing` (and :mod:`albor.data.builtin` for ``--builtin``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from albor.data.builtin import BUILTIN_VAL_FRACTION, BUILTINS, DEFAULT_MAX_BYTES, DEFAULT_VOCAB_SIZE, TOKENIZER_SUBDIR
from albor.data.builtin import check_builtin_args, prepare_builtin
from albor.data.corpus import describe, find_corpus_files
from albor.data.shards import DEFAULT_SHARD_TOKENS, INDEX_NAME
from albor.data.staging import publish
from albor.data.tokenizer import load_tokenizer
from albor.data.tokenizing import DEFAULT_VAL_FRACTION, prepare_corpus
from albor.errors import ConfigError, run_command

_SHARD_RE = re.compile(r"^(train|val)-\d{5}\.bin$")


def _parser() -> argparse.ArgumentParser:
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
        ours = entry.name == INDEX_NAME or _SHARD_RE.match(entry.name) or (entry.name == TOKENIZER_SUBDIR and entry.is_dir())
        if not ours:
            return False
    return True


def _check_output(output: Path, keep_out: list[Path]) -> None:
    """Refuse an --output that is not ours to replace, before anything is read or written.

    Only a directory that is empty or holds nothing but an earlier dataset is ever
    replaced, and never one holding the inputs or the tokenizer of this very run.
    """
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a directory; choose a new or empty directory")
    if output.exists():
        if not _is_replaceable_dataset(output):
            raise ConfigError(
                f"--output {output} exists and holds more than an albor dataset; choose a new or empty directory"
            )
        for path in keep_out:
            if path.resolve().is_relative_to(output.resolve()):
                raise ConfigError(f"{path} lies inside --output {output}, which is replaced: move it or pick another --output")
    ancestor = next(p for p in [output, *output.parents] if p.exists())
    if not ancestor.is_dir():
        raise ConfigError(f"--output {output} cannot be created: {ancestor} is a file; choose another --output")


def _write_dataset(output: Path, build: Callable[[Path], object]) -> Path:
    """Build the dataset beside ``output`` and swap it in; on failure nothing is left behind.

    An earlier dataset at ``output`` stays usable until the new one is complete.
    """
    publish(output, build, flag="--output")
    return output / INDEX_NAME


def run(args: argparse.Namespace) -> Path:
    """Check every flag and input, then write the dataset; returns the path of its index.json."""
    _set_workers(args.workers)
    if args.shard_tokens < 1:
        raise ConfigError(f"--shard-tokens {args.shard_tokens} must be positive")
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {args.val_fraction} is outside [0, 1); use e.g. {DEFAULT_VAL_FRACTION}")
    if args.builtin:
        if args.inputs or args.tokenizer:
            raise ConfigError("--builtin trains its own tokenizer on its own corpus; drop INPUT and --tokenizer")
        vocab_size = DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size
        max_bytes = DEFAULT_MAX_BYTES if args.max_bytes is None else args.max_bytes
        val_fraction = BUILTIN_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        check_builtin_args(args.builtin, vocab_size=vocab_size, max_bytes=max_bytes)
        _check_output(args.output, keep_out=[])

        def build(out: Path) -> Path:
            return prepare_builtin(args.builtin, out, vocab_size=vocab_size, max_bytes=max_bytes,
                                   val_fraction=val_fraction, shard_tokens=args.shard_tokens)
    else:
        if args.vocab_size is not None or args.max_bytes is not None:
            raise ConfigError("--vocab-size and --max-bytes apply to --builtin only; a corpus uses --tokenizer's vocabulary")
        if not args.inputs:
            raise ConfigError("give corpus INPUT files/directories with --tokenizer DIR, or --builtin python-stdlib")
        if args.tokenizer is None:
            raise ConfigError("a raw corpus needs --tokenizer DIR (a directory with vocab.json + merges.txt)")
        files = find_corpus_files(args.inputs)
        tokenizer = load_tokenizer(args.tokenizer)
        _check_output(args.output, keep_out=[*args.inputs, args.tokenizer])
        val_fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction

        def build(out: Path) -> Path:
            return prepare_corpus(files, tokenizer, out, source=describe(args.inputs), val_fraction=val_fraction,
                                  shard_tokens=args.shard_tokens)
    return _write_dataset(args.output, build)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the process exit code."""

    def body() -> int:  # argparse exits 2 on usage errors (with its usage text), 0 on --help
        index_path = run(_parser().parse_args(argv))
        index = json.loads(index_path.read_text())
        print(
            f"albor prepare-data: wrote {index_path} ({index['tokens']['train']} train / {index['tokens']['val']} val "
            f"tokens, {len(index['shards'])} shards, fingerprint {index['fingerprint'][:16]})"
        )
        return 0

    return run_command("albor prepare-data", body)
