"""``albor prepare-data``: tokenize a corpus, or a built-in one, into a dataset directory.

The command: flags, the checks on them, and putting the dataset (or a part
of one) at ``--output`` all or nothing. The tokenizing itself is
:mod:`albor.data.tokenizing` (and :mod:`albor.data.builtin` for ``--builtin``,
:mod:`albor.data.parts` for ``--part`` and ``--combine``).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
from collections.abc import Callable
from pathlib import Path

from albor.data.builtin import BUILTIN_VAL_FRACTION, BUILTINS, DEFAULT_MAX_BYTES, DEFAULT_VOCAB_SIZE, TOKENIZER_SUBDIR
from albor.data.builtin import check_builtin_args, prepare_builtin
from albor.data.corpus import ReadOptions, add_read_option_flags, describe, find_corpus_files, read_options_from_args
from albor.data.parts import PART_MANIFEST, combine_parts, parse_part, prepare_part, read_parts
from albor.data.shards import DEFAULT_SHARD_TOKENS, INDEX_NAME
from albor.data.spill import SPILL_RE
from albor.data.staging import publish
from albor.data.tokenizer import load_tokenizer
from albor.data.tokenizing import DEFAULT_VAL_FRACTION, check_workers, prepare_corpus
from albor.errors import ConfigError, run_command, signals_interrupt

_SHARD_RE = re.compile(r"^(train|val)-\d{5}\.bin$")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="albor prepare-data",
        description="Tokenize a corpus of .txt/.py files, JSON Lines (plain, .gz, .zst), parquet files or "
        "datasets save_to_disk directories (or the built-in python-stdlib corpus) into token shards and an "
        "index.json that `albor pretrain --dataset` reads. On several machines: --part K/N on each, then --combine.",
    )
    p.add_argument("inputs", nargs="*", type=Path, metavar="INPUT", help="corpus files or directories")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="directory with vocab.json + merges.txt")
    p.add_argument("--output", type=Path, metavar="DIR", required=True,
                   help="dataset directory to write (with --part: the part's directory)")
    p.add_argument("--val-fraction", type=float, default=None, metavar="F",
                   help=f"share of documents for validation, by hash (default {DEFAULT_VAL_FRACTION}; "
                   f"{BUILTIN_VAL_FRACTION} with --builtin, whose few large files would otherwise leave "
                   "almost no validation tokens)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizing processes, one core each (default: every core this process may use); "
                   "the output is the same for any N")
    p.add_argument("--shard-tokens", type=int, default=None, metavar="N",
                   help=f"tokens per shard file at most (default {DEFAULT_SHARD_TOKENS}; with --part, "
                   "give it to --combine)")
    p.add_argument("--part", metavar="K/N",
                   help="tokenize only part K of N (K = 0..N-1) of the corpus into --output, e.g. "
                   "--part $SLURM_ARRAY_TASK_ID/N in a Slurm array; then --combine the N parts")
    p.add_argument("--combine", nargs="+", type=Path, metavar="PART_DIR",
                   help="merge the --output directories of all N parts into one dataset at --output, "
                   "byte-identical to preparing the corpus on one machine (no INPUT)")
    p.add_argument("--builtin", choices=sorted(BUILTINS), help="use a built-in corpus instead of INPUT files")
    p.add_argument("--vocab-size", type=int, default=None, metavar="V",
                   help=f"with --builtin: BPE vocabulary to train (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help=f"with --builtin: cap on source bytes collected (default {DEFAULT_MAX_BYTES})")
    add_read_option_flags(p)
    return p


def _is_replaceable_dataset(output: Path) -> bool:
    """An empty directory, or one holding exactly what prepare-data writes (a dataset or a part), nothing of the user's."""
    for entry in output.iterdir():
        ours = (entry.name in (INDEX_NAME, PART_MANIFEST) or _SHARD_RE.match(entry.name) or SPILL_RE.match(entry.name)
                or (entry.name == TOKENIZER_SUBDIR and entry.is_dir()))
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


def _write_dataset(output: Path, build: Callable[[Path], object], written: str = INDEX_NAME) -> Path:
    """Build the dataset (or part) beside ``output`` and swap it in; on failure nothing is left behind.

    An earlier one at ``output`` stays usable until the new one is complete.
    Returns the path of its ``written`` file.
    """
    publish(output, build, flag="--output")
    return output / written


def _refuse(flags: dict[str, bool], why: str) -> None:
    given = [flag for flag, on in flags.items() if on]
    if given:
        it = "it" if len(given) == 1 else "them"
        raise ConfigError(f"{' and '.join(given)} {'does' if len(given) == 1 else 'do'} not apply {why}; drop {it}")


def _combine(args: argparse.Namespace, options: ReadOptions, shard_tokens: int) -> Path:
    _refuse({"INPUT": bool(args.inputs), "--tokenizer": args.tokenizer is not None, "--part": args.part is not None,
             "--builtin": args.builtin is not None, "--val-fraction": args.val_fraction is not None,
             "--workers": args.workers is not None, "--vocab-size": args.vocab_size is not None,
             "--max-bytes": args.max_bytes is not None, "the reading options": options != ReadOptions()},
            "to --combine, which takes them from the parts it merges")
    parts = read_parts(args.combine)
    _check_output(args.output, keep_out=list(args.combine))
    return _write_dataset(args.output, lambda out: combine_parts(parts, out, shard_tokens=shard_tokens))


def run(args: argparse.Namespace) -> Path:
    """Check every flag and input, then write the dataset (or part); returns the path of its index.json (part.json)."""
    shard_tokens = DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens {shard_tokens} must be positive")
    if args.val_fraction is not None and not 0.0 <= args.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {args.val_fraction} is outside [0, 1); use e.g. {DEFAULT_VAL_FRACTION}")
    workers = check_workers(args.workers)
    options = read_options_from_args(args)
    if args.combine is not None:
        return _combine(args, options, shard_tokens)
    part = None if args.part is None else parse_part(args.part)
    if args.builtin:
        if args.inputs or args.tokenizer:
            raise ConfigError("--builtin trains its own tokenizer on its own corpus; drop INPUT and --tokenizer")
        _refuse({"--part": part is not None, "the reading options": options != ReadOptions()},
                "to --builtin, a small corpus read as it is on one machine")
        vocab_size = DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size
        max_bytes = DEFAULT_MAX_BYTES if args.max_bytes is None else args.max_bytes
        val_fraction = BUILTIN_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        check_builtin_args(args.builtin, vocab_size=vocab_size, max_bytes=max_bytes)
        _check_output(args.output, keep_out=[])
        return _write_dataset(args.output, lambda out: prepare_builtin(
            args.builtin, out, vocab_size=vocab_size, max_bytes=max_bytes, val_fraction=val_fraction,
            shard_tokens=shard_tokens, workers=workers))
    if args.vocab_size is not None or args.max_bytes is not None:
        raise ConfigError("--vocab-size and --max-bytes apply to --builtin only; a corpus uses --tokenizer's vocabulary")
    if not args.inputs:
        raise ConfigError("give corpus INPUT files/directories with --tokenizer DIR, or --builtin python-stdlib")
    if args.tokenizer is None:
        raise ConfigError("a raw corpus needs --tokenizer DIR (a directory with vocab.json + merges.txt)")
    if part is not None and args.shard_tokens is not None:
        raise ConfigError("--shard-tokens applies when the parts are combined; give it to --combine, not --part")
    files = find_corpus_files(args.inputs)
    tokenizer = load_tokenizer(args.tokenizer)
    _check_output(args.output, keep_out=[*args.inputs, args.tokenizer])
    val_fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    source = describe(args.inputs)
    if part is not None:
        return _write_dataset(args.output, lambda out: prepare_part(
            files, tokenizer, out, part=part[0], parts=part[1], source=source, val_fraction=val_fraction,
            workers=workers, options=options), written=PART_MANIFEST)
    return _write_dataset(args.output, lambda out: prepare_corpus(
        files, tokenizer, out, source=source, val_fraction=val_fraction, shard_tokens=shard_tokens, workers=workers,
        options=options))


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the process exit code."""

    def body() -> int:  # argparse exits 2 on usage errors (with its usage text), 0 on --help
        path = run(_parser().parse_args(argv))
        written = json.loads(path.read_text())
        if path.name == PART_MANIFEST:
            units = written["units"].values()
            tokens = {split: sum(u["split"]["tokens"][split] for u in units) for split in ("train", "val")}
            print(f"albor prepare-data: wrote part {written['part']}/{written['parts']} to {path.parent} "
                  f"({len(units)} of {written['plan']['units']} units, {tokens['train'] + tokens['val']} tokens); "
                  f"merge all {written['parts']} parts with `albor prepare-data --combine`")
            return 0
        print(
            f"albor prepare-data: wrote {path} ({written['tokens']['train']} train / {written['tokens']['val']} val "
            f"tokens, {len(written['shards'])} shards, fingerprint {written['fingerprint'][:16]})"
        )
        return 0

    # SIGTERM (a Slurm time limit or scancel, `timeout`, `docker stop`) unwinds like Ctrl-C: the workers are
    # killed and the staging directory beside --output removed. Only SIGKILL leaves a `.OUTPUT.staging-*`.
    with signals_interrupt(signal.SIGTERM):
        return run_command("albor prepare-data", body,
                           interrupted="--output was left as it was (nothing of this run remains)")
