"""Corpus input formats: every format reads the same records, units cover a file once, filters, bad records.

The corpora are written here from one list of records with the formats' own
libraries (json, gzip, zstandard, pyarrow, datasets), and the expected
documents and counts are computed from that list, not from albor's readers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from albor.data.corpus import (
    ReadCounts, ReadOptions, add_read_option_flags, find_corpus_files, iter_corpus, plan_units,
    read_options_from_args, read_unit,
)
from albor.errors import ConfigError, DataError

RECORDS = [
    {"text": "def f(x):\n    return x + 1\n", "lang": "Python", "ext": "py"},
    {"text": "", "lang": "Python", "ext": "py"},  # empty: skipped and counted
    {"text": "package main\n\nfunc main() {}\n", "lang": "Go", "ext": "go"},
    {"text": "print('ü ✓ 中文')\n", "lang": "Python", "ext": "pyi"},
    {"text": "x", "lang": "Python", "ext": "py"},
    {"text": "fn main() {\n    println!(\"hi\");\n}\n" * 20, "lang": "Rust", "ext": "rs"},
    {"text": "# a comment\n" * 3, "lang": "Python", "ext": "py"},
    {"text": "line with \\n escapes and \"quotes\"\r\n", "lang": "Go", "ext": "go"},
]
FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "datasets"]


# ---- writing corpora with the formats' own libraries ---------------------------------------------------


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_corpus(root: Path, fmt: str, records: list[dict], *, row_group_size: int = 3) -> Path:
    """``records`` in format ``fmt`` under ``root``; returns the path to hand to find_corpus_files."""
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path = root / "c.jsonl"
        path.write_bytes(jsonl_bytes(records))
    elif fmt == "jsonl.gz":
        path = root / "c.jsonl.gz"
        with gzip.open(path, "wb") as f:
            f.write(jsonl_bytes(records))
    elif fmt == "jsonl.zst":
        path = root / "c.jsonl.zst"
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(records)))
    elif fmt == "parquet":
        path = root / "c.parquet"
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    elif fmt == "datasets":
        import datasets

        path = root / "ds"
        # Two shards and small batches: several Arrow files, several record batches each.
        datasets.Dataset.from_list(records).save_to_disk(str(path), num_shards=2)
        for arrow in path.glob("*.arrow"):  # rewrite each with 2-row batches, as a big dataset would have many
            table = pa.ipc.open_stream(arrow.read_bytes()).read_all()  # not mapped: the file is rewritten
            with pa.ipc.new_stream(str(arrow), table.schema) as w:
                w.write_table(table, max_chunksize=2)
    else:
        raise AssertionError(fmt)
    return path


def read_all(path: Path, options: ReadOptions = ReadOptions(), *, target_bytes: int = 64 << 20
             ) -> tuple[list[str], ReadCounts]:
    counts = ReadCounts()
    units = plan_units(find_corpus_files([path]), target_bytes=target_bytes)
    return [d.text for u in units for d in read_unit(u, options, counts)], counts


def kept(records: list[dict], field: str = "text") -> list[str]:
    return [r[field] for r in records if r[field]]


# ---- every format, the same documents ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("target_bytes", [1, 40, 64 << 20])
def test_every_format_yields_the_records(tmp_path: Path, fmt: str, target_bytes: int) -> None:
    path = write_corpus(tmp_path, fmt, RECORDS)
    texts, counts = read_all(path, target_bytes=target_bytes)
    assert texts == kept(RECORDS)
    assert counts.to_json() == {"documents": len(RECORDS) - 1, "empty": 1, "filtered": {}, "bad_records": 0}
    docs = list(iter_corpus(find_corpus_files([path])))
    assert [d.data for d in docs] == [t.encode("utf-8") for t in kept(RECORDS)]


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst", "parquet", "datasets"])
def test_text_field_content(tmp_path: Path, fmt: str) -> None:
    records = [{"content": r["text"], "lang": r["lang"]} for r in RECORDS]
    path = write_corpus(tmp_path, fmt, records)
    texts, _ = read_all(path, ReadOptions(text_field="content"))
    assert texts == kept(records, "content")
    with pytest.raises(DataError) as e:
        read_all(path)
    if fmt in ("parquet", "datasets"):  # the whole file lacks the column: named with the columns it has
        assert 'no column "text" (its columns: content, lang)' in str(e.value) and "--text-field" in str(e.value)
    else:
        assert f"{path}:1: no string \"text\" field" in str(e.value) and "--text-field" in str(e.value)


def test_a_directory_mixes_formats_in_sorted_order(tmp_path: Path) -> None:
    write_corpus(tmp_path / "b", "parquet", RECORDS[:3])
    write_corpus(tmp_path / "a", "jsonl.zst", RECORDS[3:5])
    write_corpus(tmp_path / "c", "datasets", RECORDS[5:])
    (tmp_path / "a" / "notes.md").write_text("not corpus")
    (tmp_path / "a" / "cache-1234.arrow").write_bytes(b"a datasets cache file, not listed by any state.json")
    (tmp_path / "d.txt").write_text("plain file\n")
    files = find_corpus_files([tmp_path])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "a/c.jsonl.zst", "b/c.parquet", "c/ds/data-00000-of-00002.arrow", "c/ds/data-00001-of-00002.arrow", "d.txt"]
    assert [d.text for d in iter_corpus(files)] == kept(RECORDS[3:5] + RECORDS[:3] + RECORDS[5:]) + ["plain file\n"]


def test_saved_dataset_files_follow_state_json(tmp_path: Path) -> None:
    path = write_corpus(tmp_path, "datasets", RECORDS)
    state = json.loads((path / "state.json").read_text())
    state["_data_files"].reverse()  # the order of the rows is state.json's, not the file names'
    (path / "state.json").write_text(json.dumps(state))
    first = pa.ipc.open_stream(pa.memory_map(str(path / "data-00000-of-00002.arrow"))).read_all().num_rows
    assert [f.name for f in find_corpus_files([path])] == ["data-00001-of-00002.arrow", "data-00000-of-00002.arrow"]
    assert read_all(path)[0] == kept(RECORDS[first:] + RECORDS[:first])


def test_a_dataset_dict_is_refused_with_the_split_to_choose(tmp_path: Path) -> None:
    import datasets

    d = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"train": d, "test": d}).save_to_disk(str(tmp_path / "dd"))
    for where in (tmp_path / "dd", tmp_path):  # named, or met while walking a directory
        with pytest.raises(ConfigError) as e:
            find_corpus_files([where])
        assert f"{tmp_path / 'dd'} is a datasets DatasetDict with splits train, test" in str(e.value)
        assert f"e.g. {tmp_path / 'dd' / 'train'}" in str(e.value)
    assert read_all(tmp_path / "dd" / "train")[0] == kept(RECORDS)


def test_a_file_named_with_an_unsupported_suffix_lists_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text("[]")
    with pytest.raises(ConfigError) as e:
        find_corpus_files([tmp_path / "c.json"])
    for suffix in (".txt", ".py", ".jsonl", ".gz", ".zst", ".parquet", ".arrow"):
        assert suffix in str(e.value).split("; ")[0].removeprefix(f"corpus file {tmp_path / 'c.json'}")


# ---- units: every record once, in order, whatever the unit size ----------------------------------------


TEXTS = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30), max_size=25)


@settings(max_examples=60, deadline=None)
@given(texts=TEXTS, blank_every=st.integers(0, 4), target_bytes=st.integers(1, 300))
def test_jsonl_byte_ranges_yield_every_line_once(texts: list[str], blank_every: int, target_bytes: int) -> None:
    lines = []
    for i, t in enumerate(texts):
        lines.append(json.dumps({"text": t}, ensure_ascii=i % 2 == 0) + "\n")
        if blank_every and i % blank_every == 0:
            lines.append("\n")  # blank lines are no records
    data = "".join(lines).encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.jsonl"
        path.write_bytes(data)
        units = plan_units([path], target_bytes=target_bytes)
        assert [(u.start, u.stop) for u in units] == [(a, min(a + target_bytes, len(data)))
                                                      for a in range(0, len(data), target_bytes)]
        assert sum(u.size_bytes for u in units) == len(data)
        counts = ReadCounts()
        assert [doc.text for u in units for doc in read_unit(u, ReadOptions(), counts)] == [t for t in texts if t]
        assert counts.empty == texts.count("")


@settings(max_examples=40, deadline=None)
@given(texts=TEXTS, row_group_size=st.integers(1, 6), target_bytes=st.integers(1, 400), fmt=st.sampled_from(["parquet", "arrow"]))
def test_row_group_and_batch_runs_yield_every_row_once(texts: list[str], row_group_size: int, target_bytes: int,
                                                        fmt: str) -> None:
    table = pa.table({"text": pa.array(texts, pa.string())})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"c.{fmt}"
        if fmt == "parquet":
            pq.write_table(table, path, row_group_size=row_group_size)
            pieces = pq.ParquetFile(path).metadata.num_row_groups
        else:
            with pa.ipc.new_stream(str(path), table.schema) as w:
                w.write_table(table, max_chunksize=row_group_size)
            pieces = sum(1 for _ in pa.ipc.open_stream(pa.memory_map(str(path))))
        units = plan_units([path], target_bytes=target_bytes)
        # Consecutive runs covering every row group / batch once; first_row counts the rows before.
        stops = [u.stop for u in units]
        assert [u.start for u in units] == [0, *stops][:len(units)] and (stops[-1] if stops else 0) == pieces
        assert [u.first_row for u in units] == [min(u.start * row_group_size, len(texts)) for u in units]
        counts = ReadCounts()
        assert [doc.text for u in units for doc in read_unit(u, ReadOptions(), counts)] == [t for t in texts if t]


def test_an_arrow_file_named_directly_in_either_ipc_format(tmp_path: Path) -> None:
    texts = [r["text"] for r in RECORDS]
    table = pa.table({"text": pa.array(texts).dictionary_encode(), "lang": [r["lang"] for r in RECORDS]})
    for name, new in (("stream.arrow", pa.ipc.new_stream), ("file.arrow", pa.ipc.new_file)):
        with new(str(tmp_path / name), table.schema) as w:
            w.write_table(table, max_chunksize=3)
        assert read_all(tmp_path / name, target_bytes=1)[0] == kept(RECORDS)
    with pytest.raises(DataError, match="no .txt, .py or .jsonl files in"):  # loose in a directory: not read
        find_corpus_files([tmp_path])


def test_small_text_files_are_grouped_up_to_the_target(tmp_path: Path) -> None:
    sizes = [5, 5, 5, 20, 1, 1]
    for i, n in enumerate(sizes):
        (tmp_path / f"f{i}.py").write_text(str(i) * n)
    files = find_corpus_files([tmp_path])
    units = plan_units(files, target_bytes=10)
    assert [[p.name for p in u.paths] for u in units] == [["f0.py", "f1.py"], ["f2.py"], ["f3.py"], ["f4.py", "f5.py"]]
    assert [u.size_bytes for u in units] == [10, 5, 20, 2]
    counts = ReadCounts()
    assert [d.text for u in units for d in read_unit(u, ReadOptions(), counts)] == [str(i) * n for i, n in enumerate(sizes)]
    assert plan_units(files, target_bytes=10) == units  # deterministic: nothing but the files and the target


# ---- filters -------------------------------------------------------------------------------------------


FILTERS = [
    ReadOptions(languages=frozenset({"Python"})),
    ReadOptions(languages=frozenset({"Python", "Go"}), extensions=frozenset({"py"})),
    ReadOptions(min_doc_bytes=10, max_doc_bytes=100),
    ReadOptions(languages=frozenset({"python"})),  # compared exactly: The Stack writes "Python"
]


def expected_filtering(records: list[dict], o: ReadOptions) -> tuple[list[str], dict]:
    """Documents and per-filter drops, by the documented order: languages, extensions, min, max."""
    docs, dropped = [], {}
    for r in records:
        n = len(r["text"].encode())
        if n == 0:
            continue
        reason = ("languages" if o.languages is not None and r["lang"] not in o.languages else
                  "extensions" if o.extensions is not None and r["ext"] not in o.extensions else
                  "min_doc_bytes" if n < o.min_doc_bytes else
                  "max_doc_bytes" if o.max_doc_bytes is not None and n > o.max_doc_bytes else None)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            docs.append(r["text"])
    return docs, dropped


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("options", FILTERS)
def test_filters_and_their_counts(tmp_path: Path, fmt: str, options: ReadOptions) -> None:
    path = write_corpus(tmp_path, fmt, RECORDS)
    texts, counts = read_all(path, options, target_bytes=50)
    docs, dropped = expected_filtering(RECORDS, options)
    assert texts == docs and counts.filtered == dropped and sum(dropped.values()) > 0
    assert counts.documents == len(docs) and counts.empty == 1


def test_filter_flags(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    add_read_option_flags(p)
    assert read_options_from_args(p.parse_args([])) == ReadOptions()
    o = read_options_from_args(p.parse_args(["--text-field", "content", "--languages", "Python, Go", "--extensions",
                                             "py", "--min-doc-bytes", "3", "--max-doc-bytes", "9",
                                             "--skip-bad-records"]))
    assert o == ReadOptions("content", 3, 9, frozenset({"Python", "Go"}), frozenset({"py"}), True)
    for argv, needle in [(["--min-doc-bytes", "-1"], "--min-doc-bytes -1"), (["--max-doc-bytes", "0"], "--max-doc-bytes 0"),
                         (["--min-doc-bytes", "10", "--max-doc-bytes", "9"], "--max-doc-bytes 9"),
                         (["--languages", "Python,,Go"], "--languages"), (["--text-field", ""], "--text-field")]:
        with pytest.raises(ConfigError, match=needle):
            read_options_from_args(p.parse_args(argv))


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_a_filter_on_a_column_the_file_lacks(tmp_path: Path, fmt: str) -> None:
    path = write_corpus(tmp_path, fmt, [{"text": r["text"], "ext": r["ext"]} for r in RECORDS])
    with pytest.raises(DataError) as e:
        read_all(path, ReadOptions(languages=frozenset({"Python"}), skip_bad_records=True))
    named = find_corpus_files([path])[0]
    assert f'{named} has no column "lang", which --languages filters on; drop --languages' in str(e.value)


def test_a_filter_on_plain_text_files(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(DataError, match=r"a\.py is a plain text file, with no lang/ext field for --extensions"):
        read_all(tmp_path, ReadOptions(extensions=frozenset({"py"})))


# ---- bad records ---------------------------------------------------------------------------------------


GOOD = {"text": "good", "lang": "Python"}
# (JSONL line, problem named) ; every bad line is the 3rd line of its file.
BAD_LINES = [
    (b"{not json", "not a JSON object"),
    (b'{"txt": "x"}', 'no string "text" field'),
    (b'{"text": 5}', 'no string "text" field'),
    (b'{"text": null}', 'no string "text" field'),
    (b"[1, 2]", 'no string "text" field'),
    (b'{"text": "caf\xe9"}', "not a JSON object"),  # latin-1 bytes: not UTF-8
    (b'{"text": "half a pair \\ud800"}', "the text holds '\\ud800', half of a UTF-16 surrogate pair"),
]


def write_jsonl_lines(path: Path, fmt: str, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    path = path.with_name(f"c.{fmt}")
    if fmt == "jsonl":
        path.write_bytes(data)
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst"])
@pytest.mark.parametrize("line,problem", BAD_LINES)
def test_bad_jsonl_lines(tmp_path: Path, fmt: str, line: bytes, problem: str) -> None:
    good = json.dumps(GOOD).encode()
    path = write_jsonl_lines(tmp_path / "x", fmt, [good, b"", line, good])
    for target in (1, 64 << 20):  # the line is named right from any byte range
        with pytest.raises(DataError) as e:
            read_all(path, target_bytes=target)
        assert str(e.value).startswith(f"{path}:3: {problem}") and "--skip-bad-records" in str(e.value)
        texts, counts = read_all(path, ReadOptions(skip_bad_records=True), target_bytes=target)
        assert texts == ["good", "good"] and counts.bad_records == 1 and counts.documents == 2


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.zst"])
def test_a_jsonl_record_without_the_filtered_field(tmp_path: Path, fmt: str) -> None:
    path = write_jsonl_lines(tmp_path / "x", fmt, [json.dumps(GOOD).encode(), b'{"text": "no lang"}'])
    options = ReadOptions(languages=frozenset({"Python"}))
    with pytest.raises(DataError, match=r':2: no string "lang" field, which --languages filters on; .*drop --languages'):
        read_all(path, options)
    assert read_all(path, ReadOptions(languages=options.languages, skip_bad_records=True))[0] == ["good"]


def bad_rows_table(kind: str) -> pa.Table:
    """Row 4 is bad; the others good."""
    texts: list = ["r0", "r1", "r2", "r3", "r4", "r5"]
    langs: list = ["Python"] * 6
    if kind == "null text":
        texts[4] = None
        return pa.table({"text": pa.array(texts, pa.string()), "lang": langs})
    if kind == "not UTF-8":
        raw = [t.encode() for t in texts]
        raw[4] = b"caf\xe9"
        return pa.table({"text": pa.array(raw, pa.binary()), "lang": langs})
    langs[4] = None
    return pa.table({"text": texts, "lang": pa.array(langs, pa.string())})


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
@pytest.mark.parametrize("kind,problem", [("null text", '"text" is null'), ("not UTF-8", '"text" is not valid UTF-8'),
                                          ("null lang", '"lang" is None, not a string, and --languages filters on it')])
def test_bad_rows(tmp_path: Path, fmt: str, kind: str, problem: str) -> None:
    table = bad_rows_table(kind)
    path = tmp_path / f"c.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=2)
    else:
        with pa.ipc.new_stream(str(path), table.schema) as w:
            w.write_table(table, max_chunksize=2)
    options = ReadOptions(languages=frozenset({"Python"}))
    for target in (1, 64 << 20):  # row numbers count over the whole file, from any unit
        with pytest.raises(DataError) as e:
            read_all(path, options, target_bytes=target)
        assert str(e.value).startswith(f"{path} row 4 (counting from 0): {problem}")
        assert "--skip-bad-records" in str(e.value)
        texts, counts = read_all(path, ReadOptions(languages=options.languages, skip_bad_records=True),
                                 target_bytes=target)
        assert texts == ["r0", "r1", "r2", "r3", "r5"] and counts.bad_records == 1


def test_a_datasets_dir_names_the_arrow_file_and_row(tmp_path: Path) -> None:
    records = [{"text": f"doc {i}"} for i in range(8)]
    records[6]["text"] = None
    path = write_corpus(tmp_path, "datasets", records)
    arrow = find_corpus_files([path])[1]
    first_in_second = pa.ipc.open_stream(pa.memory_map(str(find_corpus_files([path])[0]))).read_all().num_rows
    with pytest.raises(DataError, match=f"{arrow} row {6 - first_in_second} \\(counting from 0\\): \"text\" is null"):
        read_all(path, target_bytes=1)


def test_a_text_file_that_is_not_utf8_is_a_bad_record(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "b.txt").write_text("fine")
    with pytest.raises(DataError, match=f"{tmp_path / 'a.txt'} is not UTF-8 .*--skip-bad-records"):
        read_all(tmp_path)
    texts, counts = read_all(tmp_path, ReadOptions(skip_bad_records=True))
    assert texts == ["fine"] and counts.bad_records == 1


def test_a_wrong_text_column_type_is_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r'c\.parquet: column "text" holds int64, not text; name the text column'):
        read_all(tmp_path / "c.parquet", ReadOptions(skip_bad_records=True))


# ---- broken files: never hidden by --skip-bad-records --------------------------------------------------


def broken(tmp_path: Path, fmt: str, how: str) -> Path:
    data = {"jsonl.gz": lambda b: gzip.compress(b), "jsonl.zst": lambda b: zstandard.ZstdCompressor().compress(b)}
    records = [{"text": f"document {i} " * 20} for i in range(200)]
    if fmt == "parquet":
        path = write_corpus(tmp_path, fmt, records)
        whole = path.read_bytes()
    else:
        path = tmp_path / f"c.{fmt}"
        whole = data[fmt](jsonl_bytes(records))
    path.write_bytes(whole[: len(whole) // 2] if how == "truncated" else b"garbage!" + whole[8:])
    return path


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst", "parquet"])
@pytest.mark.parametrize("how", ["truncated", "bad magic"])
def test_a_broken_file_is_a_data_error_naming_it(tmp_path: Path, fmt: str, how: str) -> None:
    path = broken(tmp_path, fmt, how)
    with pytest.raises(DataError) as e:
        read_all(path, ReadOptions(skip_bad_records=True))
    assert str(e.value).startswith(str(path)) and "re-download" in str(e.value)


def test_a_broken_arrow_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    path = write_corpus(tmp_path, "datasets", RECORDS)
    arrow = path / "data-00001-of-00002.arrow"
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(DataError, match=f"{arrow} cannot be read as Arrow"):
        read_all(path, ReadOptions(skip_bad_records=True))


def test_zst_of_several_frames(tmp_path: Path) -> None:
    c = zstandard.ZstdCompressor()
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(c.compress(jsonl_bytes(RECORDS[:3])) + c.compress(jsonl_bytes(RECORDS[3:])))
    assert read_all(path)[0] == kept(RECORDS)


def test_a_zst_with_a_window_over_128_mib_says_how_to_recompress(tmp_path: Path) -> None:
    params = zstandard.ZstdCompressionParameters(window_log=28, write_content_size=False)  # as `zstd --long=28`
    path = tmp_path / "c.jsonl.zst"
    with open(path, "wb") as f, zstandard.ZstdCompressor(compression_params=params).stream_writer(f) as w:
        w.write(jsonl_bytes(RECORDS))
    assert zstandard.get_frame_parameters(path.read_bytes()).window_size == 1 << 28
    with pytest.raises(DataError, match=r"c\.jsonl\.zst is not a readable zstd file .*re-compress it with --long=27"):
        read_all(path)


# ---- streaming: a compressed file is never held whole --------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_compressed_jsonl_is_read_streaming(tmp_path: Path, fmt: str) -> None:
    # 16 MB of JSONL, a 300 kB block repeated: it compresses by a huge ratio, so a reader that feeds the
    # decompressor fixed input chunks (zstandard's decompressobj) would still hold most of it at once.
    words = [f"w{i * 7919 % 10007}" for i in range(4000)]
    block = b"".join(json.dumps({"text": " ".join(words[i:i + 120])}).encode() + b"\n" for i in range(0, 3880, 8))
    data = block * (16_000_000 // len(block))
    path = tmp_path / f"c.{fmt}"
    path.write_bytes(gzip.compress(data, 1) if fmt == "jsonl.gz" else zstandard.ZstdCompressor(level=1).compress(data))
    (unit,) = plan_units([path])
    counts = ReadCounts()
    arrow_peak = 0  # what pyarrow's memory pool holds (tracemalloc sees Python's allocations only)
    tracemalloc.start()
    try:
        for i, _ in enumerate(read_unit(unit, ReadOptions(), counts)):
            if i % 50 == 0:
                arrow_peak = max(arrow_peak, pa.total_allocated_bytes())
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert counts.documents == data.count(b"\n")
    assert python_peak + arrow_peak < len(data) / 4, f"held {python_peak} + {arrow_peak} of {len(data)} bytes"


def test_read_counts_add_and_json() -> None:
    a = ReadCounts(documents=2, empty=1, filtered={"languages": 3}, bad_records=1)
    a.add(ReadCounts(documents=5, filtered={"languages": 1, "min_doc_bytes": 2}))
    assert a.to_json() == {"documents": 7, "empty": 1, "filtered": {"languages": 4, "min_doc_bytes": 2},
                           "bad_records": 1}


# ---- the README's worked example: a The Stack-style parquet through prepare-data -----------------------


def write_stack_sample(path: Path) -> list[dict]:
    """README's worked example, row for row: a small parquet shaped like The Stack."""
    rows = [{"content": f"def f{i}(x):\n    return x * {i}\n" if i % 3 else f"package p{i}\n",
             "lang": "Python" if i % 3 else "Go", "ext": "py" if i % 3 else "go", "hexsha": f"{i:040x}"}
            for i in range(60)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=16)
    return rows


def stack_sample_and_tokenizer(tmp_path: Path) -> list[dict]:
    """README's stack-sample.parquet and a small BPE trained on its contents (tmp_path/tok); returns its rows."""
    from tokenizers import ByteLevelBPETokenizer

    from albor.data.tokenizer import EOS_TOKEN

    rows = write_stack_sample(tmp_path / "stack-sample.parquet")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r["content"] for r in rows], vocab_size=300, special_tokens=[EOS_TOKEN], show_progress=False)
    (tmp_path / "tok").mkdir()
    bpe.save_model(str(tmp_path / "tok"))
    return rows


def test_readme_worked_example(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from albor.data.prepare import main
    from albor.data.shards import HEADER_SIZE, read_header
    from albor.data.tokenizer import load_tokenizer

    rows = stack_sample_and_tokenizer(tmp_path)
    out = tmp_path / "data"
    assert main([str(tmp_path / "stack-sample.parquet"), "--tokenizer", str(tmp_path / "tok"), "--output", str(out),
                 "--text-field", "content", "--languages", "Python"]) == 0, capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    python = [r["content"] for r in rows if r["lang"] == "Python"]
    assert index["read"] == {"documents": len(python), "empty": 0, "filtered": {"languages": len(rows) - len(python)},
                             "bad_records": 0}
    tok = load_tokenizer(tmp_path / "tok")
    decoded = []
    for shard in index["shards"]:
        h = read_header(out / shard["name"])
        ids = np.frombuffer((out / shard["name"]).read_bytes()[HEADER_SIZE:], dtype=h.dtype).tolist()
        while ids:
            end = ids.index(tok.eos_id)
            decoded.append(tok.backend.decode(ids[:end]))
            ids = ids[end + 1:]
    assert sorted(decoded) == sorted(python)


def test_filters_that_drop_every_record_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A filter value in the wrong case drops everything: the error says so, not "the corpus is empty"."""
    from albor.data.prepare import main

    rows = stack_sample_and_tokenizer(tmp_path)
    code = main([str(tmp_path / "stack-sample.parquet"), "--tokenizer", str(tmp_path / "tok"),
                 "--output", str(tmp_path / "data"), "--text-field", "content", "--languages", "python"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"dropped ({len(rows)} by --languages)" in err and "compare exactly" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "data").exists()


# ---- a long line and a big row group: what a reader holds ------------------------------------------------


def test_a_range_inside_a_long_line_skips_it_in_bounded_pieces(tmp_path: Path, monkeypatch) -> None:
    """A range starting inside a 2 MB line reads a piece at a time, and no further than its own end."""
    from albor.data import corpus_jsonl
    from albor.data.records import RecordGate

    long_text = "def x(): pass  " * 140_000
    long = json.dumps({"text": long_text}).encode() + b"\n"
    short = b'{"text": "short"}\n'
    path = tmp_path / "c.jsonl"
    path.write_bytes(long + short)
    piece = 4096
    monkeypatch.setattr(corpus_jsonl, "READ_BUFFER", piece)
    read: list[int] = []  # bytes each readline returned
    real_open = open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, *args):
            return self.f.seek(*args)

        def readline(self, *args):
            line = self.f.readline(*args)
            read.append(len(line))
            return line

    monkeypatch.setattr(corpus_jsonl, "open", Spy, raising=False)
    gate = RecordGate(ReadOptions(), ReadCounts())
    # Wholly inside the long line: no document, and not much more read than the range itself.
    assert list(corpus_jsonl.read_jsonl_range(path, 1000, 51_000, gate)) == []
    assert max(read) <= piece and sum(read) <= 50_000 + piece
    # The range holding the short line's start skips the rest of the long one in pieces, then reads it.
    read.clear()
    docs = list(corpus_jsonl.read_jsonl_range(path, 1_000_000, len(long) + len(short), gate))
    assert [d.text for d in docs] == ["short"] and max(read) <= piece
    monkeypatch.undo()
    # Cut into many ranges, the file still reads as its two documents, each once.
    units = plan_units([path], target_bytes=300_000)
    assert len(units) > 5
    counts = ReadCounts()
    assert [d.text for u in units for d in read_unit(u, ReadOptions(), counts)] == [long_text, "short"]


def test_a_parquet_row_group_above_the_limit_is_warned_about(tmp_path: Path, monkeypatch) -> None:
    from albor.data import corpus_columnar

    path = write_corpus(tmp_path, "parquet", RECORDS, row_group_size=3)
    largest = max(pq.ParquetFile(path).metadata.row_group(i).total_byte_size for i in range(3))
    warned: list[str] = []

    class Log:
        def warning(self, message: str, *args) -> None:
            warned.append(message % args)

    monkeypatch.setattr(corpus_columnar, "log", Log())
    monkeypatch.setattr(corpus_columnar, "PARQUET_ROW_GROUP_WARN_BYTES", largest)
    plan_units([path])
    assert warned == []  # at the limit: no warning
    monkeypatch.setattr(corpus_columnar, "PARQUET_ROW_GROUP_WARN_BYTES", largest - 1)
    plan_units([path])
    assert len(warned) == 1 and str(path) in warned[0] and "holds its text column whole" in warned[0]
