"""Raw corpora: which files are read, how they are cut into units, and the documents in them.

A corpus is a list of files or directories (searched recursively, in sorted
order) of:

- ``.txt`` and ``.py`` files, one document each;
- JSON Lines, plain (``.jsonl``), gzip (``.jsonl.gz``) or zstd (``.jsonl.zst``):
  one document per line (:mod:`albor.data.corpus_jsonl`);
- ``.parquet`` files and Hugging Face ``datasets`` directories written with
  ``save_to_disk``: one document per row (:mod:`albor.data.corpus_columnar`).

Empty documents are skipped. :func:`plan_units` cuts the files into units that
one worker reads alone; the list of units, in order, *is* the order of the
documents, and it depends on the files and ``target_bytes`` only, never on how
many workers read it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from albor.data.corpus_columnar import arrow_batches, is_saved_dataset, parquet_row_groups, read_arrow, read_parquet
from albor.data.corpus_columnar import refuse_dataset_dict, saved_dataset_files
from albor.data.corpus_jsonl import read_jsonl_compressed, read_jsonl_range
from albor.data.read_options import add_read_option_flags, read_options_from_args
from albor.data.records import Document, ReadCounts, ReadOptions, RecordGate
from albor.errors import ConfigError, DataError

__all__ = [
    "CORPUS_SUFFIXES", "CorpusUnit", "Document", "ReadCounts", "ReadOptions", "add_read_option_flags", "describe",
    "find_corpus_files", "iter_corpus", "plan_units", "read_options_from_args", "read_unit",
]

# File name endings -> unit kind. ".arrow" is read only when named on the command line or listed by a
# save_to_disk directory's state.json: a directory walk would otherwise pick up datasets' cache files.
KIND_BY_SUFFIX = {
    ".txt": "text", ".py": "text", ".jsonl": "jsonl", ".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst",
    ".parquet": "parquet",
}
ARROW_SUFFIX = ".arrow"
CORPUS_SUFFIXES = tuple(KIND_BY_SUFFIX)
DEFAULT_TARGET_BYTES = 64 << 20
_CODECS = {"jsonl.gz": "gzip", "jsonl.zst": "zstd"}


@dataclass(frozen=True)
class CorpusUnit:
    """A piece of the corpus that one worker reads alone, in order; picklable.

    ``kind`` says what ``start``/``stop`` count: byte offsets for ``jsonl``
    (the lines starting in ``[start, stop)``), row groups for ``parquet``,
    record batches for ``arrow`` (``first_row`` is then the file's row number
    of the first row), and nothing for ``text`` (the whole files ``paths``)
    or ``jsonl.gz``/``jsonl.zst`` (the whole file).
    """

    path: Path  # the file (for a group of .txt/.py files, the first of ``paths``)
    kind: str  # "text", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "arrow"
    size_bytes: int  # input bytes covered: on disk, but uncompressed for parquet/arrow; for progress and balancing
    start: int = 0
    stop: int = 0
    first_row: int = 0
    paths: tuple[Path, ...] = ()


def describe(inputs: Iterable[Path]) -> str:
    """How messages name a corpus: the paths the user gave."""
    return ", ".join(str(p) for p in inputs)


def _kind(path: Path) -> str | None:
    name = path.name
    return next((kind for suffix, kind in KIND_BY_SUFFIX.items() if name.endswith(suffix)), None)


def _walk(root: Path) -> list[Path]:
    """The corpus files under directory ``root``, sorted; a save_to_disk directory gives its Arrow files."""
    refuse_dataset_dict(root)
    if is_saved_dataset(root):
        return saved_dataset_files(root)
    files: list[Path] = []
    dataset_dirs: list[Path] = []
    for p in sorted(root.rglob("*")):
        if any(p.is_relative_to(d) for d in dataset_dirs):
            continue  # a dataset's own files are its state.json's business
        if p.is_dir():
            refuse_dataset_dict(p)
            if is_saved_dataset(p):
                dataset_dirs.append(p)
                files.extend(saved_dataset_files(p))
        elif _kind(p) is not None and p.is_file():
            files.append(p)
    return files


def find_corpus_files(inputs: Iterable[Path]) -> list[Path]:
    """Every corpus file under ``inputs``, directories expanded recursively in sorted order.

    A save_to_disk directory stands for its Arrow files, in its own order. A path
    that does not exist or is not a corpus file is a usage error (exit 2);
    directories without a single corpus file are a data error (exit 3).
    """
    inputs = [Path(p) for p in inputs]
    files: list[Path] = []
    for root in inputs:
        if root.is_file():
            if _kind(root) is None and not root.name.endswith(ARROW_SUFFIX):
                raise ConfigError(
                    f"corpus file {root} is not .txt, .py or .jsonl (plain, .gz or .zst), .parquet or .arrow; "
                    "convert it or leave it out"
                )
            files.append(root)
        elif root.is_dir():
            files.extend(_walk(root))
        elif root.exists():
            raise ConfigError(
                f"corpus path {root} is neither a file nor a directory; pass corpus files or directories"
            )
        else:
            raise ConfigError(f"corpus path {root} does not exist; pass existing files or directories")
    if not files:
        raise DataError(f"no .txt, .py or .jsonl files in {describe(inputs)} (nor .jsonl.gz, .jsonl.zst, .parquet "
                        "or a datasets save_to_disk directory); point at the corpus")
    return files


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise DataError(f"corpus file {path} cannot be read ({e.strerror or e}); check it exists and is readable") from None


def _runs(pieces: list[tuple[int, int]], target_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """Consecutive runs of ``pieces`` (rows, bytes) up to ``target_bytes`` each (a bigger piece alone).

    Yields (first piece, end piece, first row, bytes) per run.
    """
    begin = row = run_row = size = 0
    for i, (rows, nbytes) in enumerate(pieces):
        if i > begin and size + nbytes > target_bytes:
            yield begin, i, run_row, size
            begin, run_row, size = i, row, 0
        size += nbytes
        row += rows
    if pieces:
        yield begin, len(pieces), run_row, size


def _file_units(path: Path, target_bytes: int) -> list[CorpusUnit]:
    kind = "arrow" if path.name.endswith(ARROW_SUFFIX) else _kind(path)
    if kind == "jsonl":
        size = _file_size(path)
        return [CorpusUnit(path, kind, min(size, at + target_bytes) - at, start=at, stop=min(size, at + target_bytes))
                for at in range(0, size, target_bytes)]
    if kind in ("parquet", "arrow"):
        pieces = parquet_row_groups(path) if kind == "parquet" else arrow_batches(path)
        return [CorpusUnit(path, kind, size, start=a, stop=b, first_row=row)
                for a, b, row, size in _runs(pieces, target_bytes)]
    if kind not in _CODECS:
        raise ConfigError(f"corpus file {path} is of no kind albor reads; pass files from find_corpus_files")
    return [CorpusUnit(path, kind, _file_size(path))]


def plan_units(files: list[Path], *, target_bytes: int = DEFAULT_TARGET_BYTES) -> list[CorpusUnit]:
    """Cut ``files`` (from :func:`find_corpus_files`) into units of about ``target_bytes``, in document order.

    Deterministic and independent of the number of workers. Consecutive small
    .txt/.py files are grouped; a plain .jsonl is cut into byte ranges; a parquet
    or Arrow file into runs of row groups or record batches; a compressed JSONL
    file is one unit (it can only be read from its start).
    """
    if target_bytes < 1:
        raise ValueError(f"target_bytes {target_bytes} must be positive")
    units: list[CorpusUnit] = []
    group: list[Path] = []
    group_bytes = 0

    def close_group() -> None:
        nonlocal group_bytes
        if group:
            units.append(CorpusUnit(group[0], "text", group_bytes, paths=tuple(group)))
            group.clear()
            group_bytes = 0

    for path in files:
        if _kind(path) == "text":
            size = _file_size(path)
            if group and group_bytes + size > target_bytes:
                close_group()
            group.append(path)
            group_bytes += size
        else:
            close_group()
            units.extend(_file_units(path, target_bytes))
    close_group()
    return units


def _read_text_files(paths: tuple[Path, ...], gate: RecordGate) -> Iterator[Document]:
    """Each file one document; a file that is not UTF-8 is a bad record (it holds exactly one)."""
    if flags := " and ".join(flag for _, flag in gate.options.filter_fields()):
        raise DataError(f"{paths[0]} is a plain text file, with no lang/ext field for {flags} to filter on; "
                        f"leave .txt/.py files out of the corpus or drop {flags}")
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as e:  # removed or made unreadable since it was listed
            raise DataError(f"corpus file {path} cannot be read ({e.strerror or e}); check it exists and is readable") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f"{path} is not UTF-8 ({e}); re-encode it as UTF-8 or leave it out"
            gate.bad(lambda: problem)
            continue
        if (doc := gate.admit(text, data)) is not None:
            yield doc


def read_unit(unit: CorpusUnit, options: ReadOptions, counts: ReadCounts) -> Iterator[Document]:
    """The documents of ``unit`` in order, counting into ``counts``.

    A bad record is a DataError naming ``file:LINE`` (JSONL) or ``file row N``
    (parquet, Arrow), unless ``options.skip_bad_records``; a file that cannot
    be read at all (missing, corrupt, truncated) is always a DataError.
    """
    gate = RecordGate(options, counts)
    if unit.kind == "text":
        return _read_text_files(unit.paths, gate)
    if unit.kind == "jsonl":
        return read_jsonl_range(unit.path, unit.start, unit.stop, gate)
    if unit.kind in _CODECS:
        return read_jsonl_compressed(unit.path, _CODECS[unit.kind], gate)
    if unit.kind == "parquet":
        return read_parquet(unit.path, range(unit.start, unit.stop), unit.first_row, gate)
    if unit.kind == "arrow":
        return read_arrow(unit.path, range(unit.start, unit.stop), unit.first_row, gate)
    raise ValueError(f"unknown corpus unit kind {unit.kind!r}")


def iter_corpus(files: list[Path], options: ReadOptions = ReadOptions(),
                counts: ReadCounts | None = None) -> Iterator[Document]:
    """Every document of ``files`` in order, in one process (counting into ``counts`` if given)."""
    counts = ReadCounts() if counts is None else counts
    for unit in plan_units(files):
        yield from read_unit(unit, options, counts)
