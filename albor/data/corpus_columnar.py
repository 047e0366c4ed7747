"""Columnar corpora: parquet files, and the Arrow files of a Hugging Face ``datasets`` directory.

One document per row, in the ``--text-field`` column (The Stack calls it
``content``). Only the text column and the columns a filter needs are read,
a record batch at a time: a parquet file by row groups (a worker reads a run
of them alone), an Arrow IPC file memory-mapped (batches it skips cost no
reading). A bad row is named ``file row N``, N counted from 0 over the whole
file, as pyarrow and ``datasets`` index rows.

A directory written by ``Dataset.save_to_disk`` is recognised by its
``state.json`` and ``dataset_info.json``; its Arrow files are read in the
order ``state.json`` lists them, with pyarrow alone (``datasets`` itself is
not needed to read them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from albor.data.records import EXT_FIELD, LANG_FIELD, Document, RecordGate
from albor.errors import ConfigError, DataError

log = logging.getLogger("albor")

PARQUET_BATCH_ROWS = 512  # rows decoded at once: a few MB of source code
# pyarrow decodes a row group's column chunk whole, however few rows a batch asks for: a reader holds its
# row group's text column. Above this (uncompressed), the planner warns that memory grows with it.
PARQUET_ROW_GROUP_WARN_BYTES = 256 << 20
ARROW_FILE_MAGIC = b"ARROW1"  # the random-access IPC format; datasets writes the stream format
DATASET_STATE = "state.json"
DATASET_INFO = "dataset_info.json"
DATASET_DICT = "dataset_dict.json"

_BROKEN = (pa.ArrowException, OSError, EOFError)  # what pyarrow raises on a truncated or corrupt file


def _broken(path: Path, kind: str, e: BaseException) -> DataError:
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return DataError(f"corpus file {path} cannot be read ({e.strerror or e}); check it exists and is readable")
    return DataError(f"{path} cannot be read as {kind} ({e}); re-download or re-create it")


# ---- which columns, and a batch's rows as documents ---------------------------------------------------


def _is_text_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text_type(t.value_type)
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_null(t))


def _needed_columns(schema: pa.Schema, path: Path, gate: RecordGate) -> list[str]:
    """The columns to read, checked against ``schema``: a file without them is a DataError (no row can do)."""
    field = gate.options.text_field
    if field not in schema.names:
        raise DataError(f'{path} has no column "{field}" (its columns: {", ".join(schema.names)}); '
                        "name the text column with --text-field")
    if not _is_text_type(schema.field(field).type):
        raise DataError(f'{path}: column "{field}" holds {schema.field(field).type}, not text; '
                        "name the text column with --text-field")
    for name, flag in gate.options.filter_fields():
        if name not in schema.names:
            raise DataError(f'{path} has no column "{name}", which {flag} filters on; drop {flag} for this corpus')
    return list(dict.fromkeys([field, *(name for name, _ in gate.options.filter_fields())]))


def _raw_texts(column: pa.Array) -> list[bytes | None]:
    """A text column's values as bytes: decoding them once both checks the UTF-8 and gives the str."""
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    t = column.type
    if pa.types.is_string(t):
        column = column.cast(pa.binary())  # same buffers, no copy
    elif pa.types.is_large_string(t):
        column = column.cast(pa.large_binary())
    return column.to_pylist()


def _batch_documents(batch: pa.RecordBatch, first_row: int, path: Path, gate: RecordGate) -> Iterator[Document]:
    field = gate.options.text_field
    raws = _raw_texts(batch.column(field))
    filters = [(name, flag, batch.column(name).to_pylist()) for name, flag in gate.options.filter_fields()]
    for i, raw in enumerate(raws):
        def where(i: int = i) -> str:
            return f"{path} row {first_row + i} (counting from 0)"
        if raw is None:
            gate.bad(lambda: f'{where()}: "{field}" is null; fix or remove the row')
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f'"{field}" is not valid UTF-8 ({e})'
            gate.bad(lambda: f"{where()}: {problem}; fix or remove the row")
            continue
        values = {}
        for name, flag, column in filters:
            if not isinstance(value := column[i], str):
                gate.bad(lambda: f'{where()}: "{name}" is {value!r}, not a string, and {flag} filters on it; '
                         f"fix or remove the row or drop {flag}")
                break
            values[name] = value
        else:
            if (doc := gate.admit(text, raw, values.get(LANG_FIELD), values.get(EXT_FIELD))) is not None:
                yield doc


# ---- parquet ------------------------------------------------------------------------------------------


def parquet_row_groups(path: Path) -> list[tuple[int, int]]:
    """(rows, uncompressed bytes) of each row group of ``path``, from its footer alone.

    Warns (once per file) when a row group is larger than
    :data:`PARQUET_ROW_GROUP_WARN_BYTES` uncompressed: each worker reading it
    holds its text column whole.
    """
    try:
        meta = pq.ParquetFile(path).metadata
    except _BROKEN as e:
        raise _broken(path, "parquet", e) from None
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    largest = max((rg.total_byte_size for rg in groups), default=0)
    if largest > PARQUET_ROW_GROUP_WARN_BYTES:
        log.warning("%s has row groups of up to %d MiB uncompressed: a worker reading one holds its text column "
                    "whole (pyarrow decodes a column chunk at once), so memory grows with --workers times that; "
                    "lower --workers if memory is short, or rewrite the file with smaller row groups "
                    "(e.g. pyarrow.parquet.write_table(..., row_group_size=10000))", path, largest >> 20)
    # Some writers leave total_byte_size 0; the compressed size still balances the units.
    return [(rg.num_rows, rg.total_byte_size or sum(rg.column(j).total_compressed_size for j in range(rg.num_columns)))
            for rg in groups]


def read_parquet(path: Path, row_groups: range, first_row: int, gate: RecordGate) -> Iterator[Document]:
    """The documents in ``row_groups`` of ``path``, whose first row is row ``first_row`` of the file."""
    row = first_row
    try:
        with pq.ParquetFile(path) as pf:
            columns = _needed_columns(pf.schema_arrow, path, gate)
            # use_threads=False: the parallelism is one process per unit; pyarrow's own pool would oversubscribe.
            batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=list(row_groups), columns=columns,
                                      use_threads=False)
            for batch in batches:
                yield from _batch_documents(batch, row, path, gate)
                row += batch.num_rows
    except _BROKEN as e:
        raise _broken(path, "parquet", e) from None


# ---- Arrow IPC (datasets' save_to_disk) ---------------------------------------------------------------


def _arrow_reader(source: pa.MemoryMappedFile) -> Iterator[pa.RecordBatch]:
    if source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC:
        reader = pa.ipc.open_file(source)
        return (reader.get_batch(i) for i in range(reader.num_record_batches))
    source.seek(0)
    return iter(pa.ipc.open_stream(source))


def arrow_batches(path: Path) -> list[tuple[int, int]]:
    """(rows, bytes) of each record batch of the Arrow file ``path`` (memory-mapped: no data is read)."""
    try:
        with pa.memory_map(str(path)) as source:
            return [(b.num_rows, b.nbytes) for b in _arrow_reader(source)]
    except _BROKEN as e:
        raise _broken(path, "Arrow", e) from None


def read_arrow(path: Path, batches: range, first_row: int, gate: RecordGate) -> Iterator[Document]:
    """The documents in record ``batches`` of the Arrow file ``path``, whose first is row ``first_row``."""
    row = first_row
    try:
        with pa.memory_map(str(path)) as source:
            reader = _arrow_reader(source)
            columns: list[str] | None = None
            for i, batch in enumerate(reader):
                if i >= batches.stop:
                    break
                if columns is None:
                    columns = _needed_columns(batch.schema, path, gate)
                if i >= batches.start:
                    yield from _batch_documents(batch.select(columns), row, path, gate)
                    row += batch.num_rows
    except _BROKEN as e:
        raise _broken(path, "Arrow", e) from None


def is_saved_dataset(directory: Path) -> bool:
    """Whether ``directory`` holds a ``Dataset.save_to_disk`` (one split)."""
    return (directory / DATASET_STATE).is_file() and (directory / DATASET_INFO).is_file()


def refuse_dataset_dict(directory: Path) -> None:
    """A ``DatasetDict.save_to_disk`` holds several splits: say which to point at instead of mixing them."""
    if not (directory / DATASET_DICT).is_file():
        return
    try:
        splits = json.loads((directory / DATASET_DICT).read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        splits = sorted(p.name for p in directory.iterdir() if p.is_dir())
    raise ConfigError(f"{directory} is a datasets DatasetDict with splits {', '.join(map(str, splits))}; "
                      f"point at one split's directory, e.g. {directory / str(splits[0]) if splits else directory}")


def saved_dataset_files(directory: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` directory, in the order of its rows (``state.json``)."""
    state_path = directory / DATASET_STATE
    try:
        state = json.loads(state_path.read_text())
        files = [directory / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state_path} does not list the dataset's files ({e!r}); save the dataset again "
                        "with Dataset.save_to_disk") from None
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}, listed in {state_path}, is missing; copy the whole dataset directory")
    return files
