"""JSON Lines corpora: plain ``.jsonl`` by byte range, ``.jsonl.gz`` and ``.jsonl.zst`` streamed whole.

One document per line, in the line's ``--text-field`` key. A plain file is
split into byte ranges that workers read alone: a range owns the lines that
*start* in it. Compressed files cannot be entered in the middle, so each is
read from its start by one worker, a bounded chunk at a time: never the whole
file decompressed in memory.

A bad line is named ``file:LINE``. A range reader does not know its line
numbers (that would mean reading the file up to the range), so it counts the
newlines before the line's offset only when it reports one.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from albor.data.records import EXT_FIELD, LANG_FIELD, Document, RecordGate, lone_surrogate_problem
from albor.errors import DataError

READ_BUFFER = 1 << 20


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` of ``path``."""
    newlines = 0
    with open(path, "rb") as f:
        left = offset
        while left > 0 and (chunk := f.read(min(left, READ_BUFFER))):
            newlines += chunk.count(b"\n")
            left -= len(chunk)
    return newlines + 1


def _record_document(line: bytes, where: Callable[[], str], gate: RecordGate) -> Document | None:
    """The document on one JSONL line, or None (blank, empty, filtered, or a skipped bad line).

    ``where`` names the line (``file:LINE``) and is called only for an error.
    """
    if not line.strip():
        return None
    field = gate.options.text_field
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"not a JSON object ({e})"
        gate.bad(lambda: f"{where()}: {problem}; fix or remove the line")
        return None
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        gate.bad(lambda: f'{where()}: no string "{field}" field; every line must be {{"{field}": "..."}} '
                 "(--text-field names the key); fix or remove the line")
        return None
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can escape a lone surrogate, which no tokenizer accepts
        problem = lone_surrogate_problem(e)
        gate.bad(lambda: f"{where()}: {problem}; fix or remove the line")
        return None
    values = {}
    for name, flag in gate.options.filter_fields():
        if not isinstance(value := record.get(name), str):
            gate.bad(lambda: f'{where()}: no string "{name}" field, which {flag} filters on; '
                     f"fix or remove the line or drop {flag}")
            return None
        values[name] = value
    return gate.admit(text, data, values.get(LANG_FIELD), values.get(EXT_FIELD))


def read_jsonl_range(path: Path, start: int, stop: int, gate: RecordGate) -> Iterator[Document]:
    """The documents on the lines of ``path`` that start at a byte offset in ``[start, stop)``."""
    try:
        with open(path, "rb", buffering=READ_BUFFER) as f:
            offset = 0
            if start > 0:
                # The line running through `start - 1` (possibly just its newline) belongs to the range before.
                # Skipped a bounded piece at a time, and only up to `stop`: a line of many GB spans many
                # ranges, and each of them would otherwise read (and hold) the whole rest of it.
                f.seek(start - 1)
                offset = start - 1
                while piece := f.readline(READ_BUFFER):
                    offset += len(piece)
                    if piece.endswith(b"\n") or offset >= stop:
                        break
            while offset < stop:
                line = f.readline()
                if not line:
                    break
                at = offset
                doc = _record_document(line, lambda: f"{path}:{_line_number(path, at)}", gate)
                offset += len(line)
                if doc is not None:
                    yield doc
    except OSError as e:  # removed or made unreadable since it was listed
        raise DataError(f"corpus file {path} cannot be read ({e.strerror or e}); check it exists and is readable") from None


def _compressed_lines(path: Path, codec: str) -> Iterator[bytes]:
    # pyarrow's stream, not zstandard's stream_reader: that one ends silently at a truncated frame (an
    # interrupted download would lose its tail unnoticed); Arrow's raises "Truncated compressed stream".
    # Its output buffer is bounded whatever the compression ratio, and it reads concatenated frames/members.
    with pa.input_stream(str(path), compression=codec) as raw, io.BufferedReader(raw, READ_BUFFER) as f:
        yield from f


def read_jsonl_compressed(path: Path, codec: str, gate: RecordGate) -> Iterator[Document]:
    """The documents of a whole ``.jsonl.gz`` (codec ``gzip``) or ``.jsonl.zst`` (``zstd``), streamed."""
    lines = _compressed_lines(path, codec)
    lineno = 0
    while True:
        try:
            line = next(lines, None)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:  # gone or unreadable since listed
            raise DataError(f"corpus file {path} cannot be read ({e.strerror or e}); check it exists and is readable") from None
        except (OSError, pa.ArrowException) as e:  # bad magic, corrupt or truncated data
            fix = "re-download or re-compress it"
            if "too much memory" in str(e):  # libzstd's default limit: a 128 MiB window
                fix = "it needs a zstd window over 128 MiB (zstd --long=28 or more): re-compress it with --long=27 at most"
            after = f" after line {lineno}" if lineno else ""
            raise DataError(f"{path} is not a readable {codec} file{after} ({e}); {fix}") from None
        if line is None:
            return
        lineno += 1
        doc = _record_document(line, lambda: f"{path}:{lineno}", gate)
        if doc is not None:
            yield doc
