"""A corpus prepared in parts on many machines, then combined into one dataset.

``albor prepare-data INPUT... --tokenizer DIR --part K/N --output PART_DIR``
tokenizes the units ``u`` of the corpus's unit plan with ``u % N == K`` into
``PART_DIR``: each unit's spill files (:mod:`albor.data.spill`) and a manifest,
``part.json``, written last, that records the plan's fingerprint, the
recipe (tokenizer, validation fraction, read options) and every unit's
summary. Units are dealt out round-robin, not in blocks, so that a stretch of
large files at one end of the corpus does not land on one machine.

``albor prepare-data --combine PART_DIR... --output DIR`` checks that the
parts come from the same plan and recipe and hold every unit exactly once,
then merges them in plan order exactly as a one-machine ``prepare-data``
merges its workers' units: the dataset is byte-identical to one prepared on
one machine. Which machine runs which part is the scheduler's business (a
Slurm array: ``--part $SLURM_ARRAY_TASK_ID/N``); albor has none of its own.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import closing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from albor.atomic_files import write_bytes_atomic
from albor.data.corpus import CorpusUnit, ReadOptions
from albor.data.spill import SpillReader, summary_counts
from albor.data.split import UnitSplit
from albor.data.shards import SPLITS
from albor.data.tokenizer import Tokenizer
from albor.data.tokenizing import Recipe, check_val_fraction, check_workers, corpus_extra, corpus_units, make_job
from albor.data.tokenizing import merge_units, recipe_for
from albor.data.unit_worker import tokenize_units
from albor.errors import ConfigError, DataError

PART_MANIFEST = "part.json"
PART_FORMAT = "albor-prepare-part"
PART_FORMAT_VERSION = 2  # 2: each unit's summary holds its spill files' sha256


def parse_part(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), with 0 <= K < N; ConfigError otherwise."""
    k, slash, n = text.partition("/")
    if not (slash and k.isdigit() and n.isdigit() and int(n) >= 1 and int(k) < int(n)):
        raise ConfigError(f"--part {text} is not K/N with 0 <= K < N (parts are numbered from 0); "
                          "e.g. --part 0/4 ... --part 3/4, or --part $SLURM_ARRAY_TASK_ID/4 with --array=0-3")
    return int(k), int(n)


def plan_fingerprint(units: list[CorpusUnit]) -> str:
    """A hash of the unit plan: the files as given, their sizes, and how they are cut."""
    h = hashlib.sha256(b"albor-unit-plan v1\n")
    for unit in units:
        h.update((json.dumps(asdict(unit), default=str, sort_keys=True) + "\n").encode())
    return h.hexdigest()


def prepare_part(
    files: list[Path],
    tokenizer: Tokenizer,
    output: Path,
    *,
    part: int,
    parts: int,
    source: str,
    val_fraction: float,
    workers: int | None = None,
    options: ReadOptions | None = None,
) -> Path:
    """Tokenize part ``part`` of ``parts`` of the corpus ``files`` into the fresh directory ``output``.

    ``source`` names the corpus in errors, then and when the parts are combined.
    Returns the path of its manifest, written last.
    """
    check_val_fraction(val_fraction)
    workers = check_workers(workers)
    options = ReadOptions() if options is None else options
    recipe = recipe_for(tokenizer, val_fraction, options)
    units = corpus_units(files)
    mine = [(u, unit) for u, unit in enumerate(units) if u % parts == part]
    output.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, Any] = {}
    with closing(tokenize_units(make_job(tokenizer, recipe, options, output), tokenizer, mine, workers)) as done:
        for unit_id, summary in done:
            summaries[str(unit_id)] = summary
    manifest = {
        "format": PART_FORMAT, "format_version": PART_FORMAT_VERSION, "part": part, "parts": parts,
        "corpus": source,
        "plan": {"fingerprint": plan_fingerprint(units), "units": len(units)},
        "recipe": asdict(recipe), "extra": corpus_extra(files, tokenizer), "units": summaries,
    }
    path = output / PART_MANIFEST
    write_bytes_atomic(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return path


@dataclass(frozen=True)
class Part:
    directory: Path
    manifest: dict[str, Any]

    @property
    def number(self) -> int:
        return self.manifest["part"]


_MANIFEST_KEYS = {"part": int, "parts": int, "corpus": str, "plan": dict, "recipe": dict, "extra": dict, "units": dict}


def _rerun(directory: Path) -> str:
    return f"prepare that part again (`albor prepare-data ... --part K/N --output {directory}`)"


def _read_part(directory: Path) -> Part:
    if not directory.is_dir():
        raise ConfigError(f"--combine {directory} is not a directory; pass the --output directories of the parts")
    path = directory / PART_MANIFEST
    rerun = _rerun(directory)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{directory} holds no {PART_MANIFEST}: not a finished prepare-data part; {rerun}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read ({e}); {rerun}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PART_FORMAT:
        raise DataError(f"{path} is not a prepare-data part manifest; pass the --output directories of the parts")
    if manifest.get("format_version") != PART_FORMAT_VERSION:
        raise DataError(f"{path} has part format version {manifest.get('format_version')}, this albor reads "
                        f"{PART_FORMAT_VERSION}; {rerun} with this albor")
    for key, typ in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), typ) or isinstance(manifest.get(key), bool):
            raise DataError(f"{path} lacks a valid {key!r}; {rerun}")
    if set(manifest["recipe"]) != {f.name for f in fields(Recipe)}:
        raise DataError(f"{path} lacks a valid 'recipe'; {rerun}")
    return Part(directory, manifest)


# What every part must agree on, and what a difference means.
_MUST_AGREE = {
    "parts": "the number of parts N",
    "plan": "unit plan (the corpus files, their sizes, or their order)",
    "recipe": "recipe (tokenizer, --val-fraction or the reading options)",
    "extra.source": "corpus (files and bytes)",
}


def _field(manifest: dict[str, Any], key: str) -> Any:
    for name in key.split("."):
        manifest = manifest.get(name) if isinstance(manifest, dict) else None
    return manifest


def read_parts(directories: list[Path]) -> list[Part]:
    """The parts in ``directories``, checked to agree and to hold every unit exactly once, ordered by K.

    A part missing or given twice is a ConfigError (the command line); parts
    that disagree, or lack files their manifest lists, are a DataError.
    """
    parts = [_read_part(Path(d)) for d in directories]
    first = parts[0]
    for p in parts[1:]:
        for key, what in _MUST_AGREE.items():
            if _field(p.manifest, key) != _field(first.manifest, key):
                raise DataError(
                    f"part {p.directory} and part {first.directory} differ in their {what}; prepare every part "
                    "from the same corpus with the same flags"
                )
    n = first.manifest["parts"]
    by_number: dict[int, Part] = {}
    for p in parts:
        if p.number in by_number:
            raise ConfigError(f"part {p.number}/{n} is given twice ({by_number[p.number].directory} and "
                              f"{p.directory}); pass each part once")
        by_number[p.number] = p
    missing = [k for k in range(n) if k not in by_number]
    if missing:
        raise ConfigError(f"part{'s' if len(missing) > 1 else ''} {', '.join(f'{k}/{n}' for k in missing)} "
                          f"missing: --combine needs all {n} part directories")
    count = first.manifest["plan"]["units"]
    dtype_code = Recipe(**first.manifest["recipe"]).dtype_code
    for k, p in sorted(by_number.items()):
        expected = {str(u) for u in range(k, count, n)}
        if set(p.manifest["units"]) != expected:
            raise DataError(f"{p.directory / PART_MANIFEST} lists other units than part {k}/{n} of "
                            f"{count} units; prepare that part again")
        for u, summary in p.manifest["units"].items():
            tokens = _unit_tokens(summary, p.directory / PART_MANIFEST, u, _rerun(p.directory))
            SpillReader(p.directory, int(u), dtype_code, lambda split, tokens: None).check(
                tokens, f"part {p.directory}")
    return [by_number[k] for k in range(n)]


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _unit_tokens(summary: Any, path: Path, unit: str, rerun: str) -> dict[str, int]:
    """Each split's token count in a unit's summary, once every field the merge reads is checked; else a DataError."""
    try:
        UnitSplit.from_json(summary["split"], 0.0)
        summary_counts(summary)
        tokens = {split: summary["split"]["tokens"][split] for split in SPLITS}
        if not all(type(t) is int and t >= 0 for t in tokens.values()):
            raise ValueError("token counts")
        if not all(isinstance(summary["sha256"][split], str) and _SHA256.match(summary["sha256"][split])
                   for split in SPLITS):
            raise ValueError("sha256")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise DataError(f"{path} lacks a valid summary for unit {unit}; {rerun}") from None
    return tokens


def combine_parts(parts: list[Part], output: Path, *, shard_tokens: int) -> Path:
    """Merge checked ``parts`` (from :func:`read_parts`) into a dataset under the fresh directory ``output``.

    The parts are read, not changed; each spill file is checked against the
    sha256 its part recorded while it is copied. Returns the path of index.json.
    """
    first = parts[0].manifest
    n, count = first["parts"], first["plan"]["units"]
    units = ((parts[u % n].directory, u, parts[u % n].manifest["units"][str(u)]) for u in range(count))
    output.mkdir(parents=True, exist_ok=True)
    return merge_units(units, output, Recipe(**first["recipe"]), source=first["corpus"], shard_tokens=shard_tokens,
                       extra=first["extra"], delete=False, check_sha256=True)
