"""``prepare-data``'s flags that choose how a corpus is read: the text field, the filters, bad records."""

from __future__ import annotations

import argparse

from albor.data.records import EXT_FIELD, LANG_FIELD, ReadOptions
from albor.errors import ConfigError


def add_read_option_flags(parser: argparse.ArgumentParser) -> None:
    """Add --text-field, the filters and --skip-bad-records to ``parser`` (see :func:`read_options_from_args`)."""
    g = parser.add_argument_group("reading the corpus")
    g.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSONL key, parquet or arrow column holding each document (default %(default)s; "
                   "The Stack's is content)")
    g.add_argument("--min-doc-bytes", type=int, default=0, metavar="N",
                   help="drop documents shorter than N bytes of UTF-8 (default: keep all)")
    g.add_argument("--max-doc-bytes", type=int, default=None, metavar="N",
                   help="drop documents longer than N bytes of UTF-8 (default: keep all)")
    g.add_argument("--languages", default=None, metavar="L1,L2",
                   help=f"keep only records whose `{LANG_FIELD}` field is one of these, compared exactly "
                   "(The Stack: e.g. Python)")
    g.add_argument("--extensions", default=None, metavar="E1,E2",
                   help=f"keep only records whose `{EXT_FIELD}` field is one of these, compared exactly "
                   "(The Stack: e.g. py,pyi)")
    g.add_argument("--skip-bad-records", action="store_true",
                   help="skip and count (in index.json) a record that cannot be read, instead of stopping")


def _name_list(value: str | None, flag: str) -> frozenset[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        raise ConfigError(f"{flag} {value!r} has an empty name; give comma-separated names, e.g. {flag} Python,Go")
    return frozenset(names)


def read_options_from_args(args: argparse.Namespace) -> ReadOptions:
    """The :class:`ReadOptions` the parsed flags choose; ConfigError on a bad value."""
    if not args.text_field:
        raise ConfigError("--text-field is empty; name the field holding the text, e.g. --text-field content")
    if args.min_doc_bytes < 0:
        raise ConfigError(f"--min-doc-bytes {args.min_doc_bytes} is negative; use 0 to keep every length")
    if args.max_doc_bytes is not None and args.max_doc_bytes < max(1, args.min_doc_bytes):
        raise ConfigError(f"--max-doc-bytes {args.max_doc_bytes} leaves no document (--min-doc-bytes is "
                          f"{args.min_doc_bytes}); raise it or leave it out")
    return ReadOptions(
        text_field=args.text_field,
        min_doc_bytes=args.min_doc_bytes,
        max_doc_bytes=args.max_doc_bytes,
        languages=_name_list(args.languages, "--languages"),
        extensions=_name_list(args.extensions, "--extensions"),
        skip_bad_records=args.skip_bad_records,
    )
