"""Raw corpora: which files are read, and the documents in them.

A corpus is a list of files or directories (searched recursively, in sorted
order) of ``.txt`` and ``.py`` files (one document each) and ``.jsonl`` files
(one document per line, in its ``text`` field). Empty documents are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from albor.errors import ConfigError, DataError

CORPUS_SUFFIXES = (".txt", ".py", ".jsonl")


@dataclass(frozen=True)
class Document:
    text: str
    data: bytes  # the UTF-8 bytes of ``text``, which the split hash is taken over


def describe(inputs: Iterable[Path]) -> str:
    """How messages name a corpus: the paths the user gave."""
    return ", ".join(str(p) for p in inputs)


def find_corpus_files(inputs: Iterable[Path]) -> list[Path]:
    """Every corpus file under ``inputs``, directories expanded recursively in sorted order.

    A path that does not exist or is not a corpus file is a usage error (exit 2);
    directories without a single corpus file are a data error (exit 3).
    """
    inputs = [Path(p) for p in inputs]
    files: list[Path] = []
    for root in inputs:
        if root.is_file():
            if root.suffix not in CORPUS_SUFFIXES:
                raise ConfigError(f"corpus file {root} is not .txt, .py or .jsonl; convert it or leave it out")
            files.append(root)
        elif root.is_dir():
            files.extend(sorted(p for p in root.rglob("*") if p.suffix in CORPUS_SUFFIXES and p.is_file()))
        elif root.exists():
            raise ConfigError(
                f"corpus path {root} is neither a file nor a directory; pass .txt/.py/.jsonl files or directories"
            )
        else:
            raise ConfigError(f"corpus path {root} does not exist; pass existing files or directories")
    if not files:
        raise DataError(f"no .txt, .py or .jsonl files in {describe(inputs)}; point at the corpus")
    return files


def read_documents(path: Path) -> Iterator[Document]:
    """The documents of one corpus file; DataError naming file(:line) on bad input."""
    try:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path)
            return
        data = path.read_bytes()
    except OSError as e:  # removed or made unreadable since it was listed
        raise DataError(f"corpus file {path} cannot be read ({e.strerror or e}); check it exists and is readable") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 ({e}); re-encode it as UTF-8 or leave it out") from None
    if text:
        yield Document(text, data)


def _jsonl_documents(path: Path) -> Iterator[Document]:
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
            if not text:
                continue
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON can escape a lone surrogate, which no tokenizer accepts
                raise DataError(
                    f"{path}:{lineno}: the text holds {e.object[e.start:e.end]!r}, half of a UTF-16 surrogate pair, "
                    "which is not valid Unicode; fix or remove the line"
                ) from None
            yield Document(text, data)


def iter_corpus(files: list[Path]) -> Iterator[Document]:
    for path in files:
        yield from read_documents(path)
