"""One corpus record on its way to a document: the read options, the filters, the counts.

Every input format (:mod:`albor.data.corpus`) turns its rows or lines into
calls of :meth:`RecordGate.admit`, which applies ``prepare-data``'s filters and
counts what it drops, and :meth:`RecordGate.bad`, which either stops with a
:class:`DataError` naming the record or, with ``--skip-bad-records``, counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from albor.errors import DataError

SKIP_HINT = "or pass --skip-bad-records to skip and count such records"

# The filter names, as ReadCounts.filtered (and index.json) count them; one per flag.
FILTER_LANGUAGES = "languages"
FILTER_EXTENSIONS = "extensions"
FILTER_MIN_BYTES = "min_doc_bytes"
FILTER_MAX_BYTES = "max_doc_bytes"
LANG_FIELD = "lang"  # The Stack's names for a row's language and file extension
EXT_FIELD = "ext"


@dataclass(frozen=True)
class Document:
    text: str
    data: bytes  # the UTF-8 bytes of ``text``, which the split hash is taken over


@dataclass(frozen=True)
class ReadOptions:
    """What prepare-data's reading flags choose; the defaults read a corpus as albor always has."""

    text_field: str = "text"  # JSONL key / parquet / arrow column holding the document
    min_doc_bytes: int = 0  # filters, off by default (UTF-8 bytes of the text)
    max_doc_bytes: int | None = None
    languages: frozenset[str] | None = None  # keep only records whose `lang` field is one of these
    extensions: frozenset[str] | None = None  # keep only records whose `ext` field is one of these
    skip_bad_records: bool = False  # skip and count a bad record instead of a DataError

    def filter_fields(self) -> list[tuple[str, str]]:
        """(field, flag) of each field besides the text that a filter on reads from every record."""
        return [(name, flag) for name, flag, wanted in ((LANG_FIELD, "--languages", self.languages),
                                                        (EXT_FIELD, "--extensions", self.extensions))
                if wanted is not None]


@dataclass
class ReadCounts:
    """What reading did with the records: filled in by ``read_unit``, summed over units into index.json."""

    documents: int = 0  # yielded
    empty: int = 0  # records with an empty text, dropped
    filtered: dict[str, int] = field(default_factory=dict)  # filter name -> records it dropped
    bad_records: int = 0  # skipped with skip_bad_records

    def add(self, other: ReadCounts) -> None:
        self.documents += other.documents
        self.empty += other.empty
        self.bad_records += other.bad_records
        for reason, n in other.filtered.items():
            self.filtered[reason] = self.filtered.get(reason, 0) + n

    def to_json(self) -> dict:
        return {"documents": self.documents, "empty": self.empty,
                "filtered": dict(sorted(self.filtered.items())), "bad_records": self.bad_records}

    def nothing_kept(self, source: str) -> str | None:
        """The error when filters or skipped records left no document at all (None otherwise).

        Without it the split would report an empty corpus, hiding that the records were there.
        """
        if self.documents or not (self.filtered or self.bad_records):
            return None
        dropped = [f"{n} by --{name.replace('_', '-')}" for name, n in sorted(self.filtered.items())]
        if self.bad_records:
            dropped.append(f"{self.bad_records} skipped as bad records")
        if self.empty:
            dropped.append(f"{self.empty} empty")
        return (f"corpus {source} has no document left to tokenize: its records were dropped ({', '.join(dropped)}); "
                "check the filters' values (--languages and --extensions compare exactly, e.g. Python) and --text-field")


class RecordGate:
    """Turns one format's records into documents under ``options``, counting into ``counts``."""

    def __init__(self, options: ReadOptions, counts: ReadCounts) -> None:
        self.options = options
        self.counts = counts

    def bad(self, message: Callable[[], str]) -> None:
        """A record that cannot be read: a DataError with ``message()``, or counted when skipping bad records.

        ``message`` (naming the record, the problem and its fix) is built only for the error, since
        naming a JSONL line means counting the lines before it.
        """
        if self.options.skip_bad_records:
            self.counts.bad_records += 1
            return
        raise DataError(f"{message()}, {SKIP_HINT}")

    def admit(self, text: str, data: bytes, lang: object = None, ext: object = None) -> Document | None:
        """The document for a well-formed record, or None if it is empty or a filter drops it (counted).

        ``lang`` and ``ext`` are the record's fields, looked at only when a filter is on;
        the format has already made them strings (a record without them is a bad record).
        """
        opts = self.options
        if not data:
            self.counts.empty += 1
            return None
        reason = None
        if opts.languages is not None and lang not in opts.languages:
            reason = FILTER_LANGUAGES
        elif opts.extensions is not None and ext not in opts.extensions:
            reason = FILTER_EXTENSIONS
        elif len(data) < opts.min_doc_bytes:
            reason = FILTER_MIN_BYTES
        elif opts.max_doc_bytes is not None and len(data) > opts.max_doc_bytes:
            reason = FILTER_MAX_BYTES
        if reason is not None:
            self.counts.filtered[reason] = self.counts.filtered.get(reason, 0) + 1
            return None
        self.counts.documents += 1
        return Document(text, data)


def lone_surrogate_problem(e: UnicodeEncodeError) -> str:
    """What is wrong with a text that JSON let hold half of a UTF-16 surrogate pair (no tokenizer accepts one)."""
    return (f"the text holds {e.object[e.start:e.end]!r}, half of a UTF-16 surrogate pair, "
            "which is not valid Unicode")
