"""``prepare-data`` on several workers and in parts: the same bytes as one pass, every failure clean.

The corpus here is small, so the unit size is lowered to cut it into many
units (the output does not depend on the cut, which is what is tested).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import ByteLevelBPETokenizer

from albor.data import tokenizing
from albor.data.corpus import find_corpus_files, iter_corpus
from albor.data.prepare import main
from albor.data.shards import HEADER_SIZE, read_header
from albor.data.split import DocumentSplitter, split_hash
from albor.data.tokenizer import EOS_TOKEN, load_tokenizer

WORDS = "def return import class self value list dict print yield lambda for while if else".split()


def make_tokenizer(directory: Path, vocab_size: int = 300, seed_text: str = "") -> Path:
    bpe = ByteLevelBPETokenizer()
    texts = [" ".join(WORDS)] * 5 + ([seed_text] if seed_text else [])
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(directory))
    return directory


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(autouse=True)
def small_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizing, "MIN_UNIT_BYTES", 2048)


def doc_text(i: int) -> str:
    return f"# document {i}\n" + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(20 + i % 50)) + "\n"


def make_corpus(root: Path, n: int = 240) -> Path:
    """JSONL (plain and gzip) and .py files, about 40 KB; every 17th JSONL record is empty."""
    root.mkdir(parents=True)
    per_file = n // 4
    for f in range(3):
        records = [{"text": "" if i % 17 == 5 else doc_text(i)} for i in range(f * per_file, (f + 1) * per_file)]
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        if f == 1:
            (root / f"b{f}.jsonl.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (root / f"b{f}.jsonl").write_bytes(data)
    (root / "py").mkdir()
    for i in range(3 * per_file, n):
        (root / "py" / f"m{i:04d}.py").write_text(doc_text(i))
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def split_tokens(out: Path, split: str) -> list[int]:
    index = json.loads((out / "index.json").read_text())
    parts = [np.frombuffer((out / s["name"]).read_bytes()[HEADER_SIZE:], dtype=read_header(out / s["name"]).dtype)
             for s in index["shards"] if s["split"] == split]
    return np.concatenate(parts).tolist()


def one_pass(corpus: Path, tok_dir: Path, val_fraction: float) -> dict[str, list[int]]:
    """The splits as one pass over the documents gives them, in this process: no units, workers or spills."""
    tok = load_tokenizer(tok_dir)
    out: dict[str, list[int]] = {"train": [], "val": []}
    splitter = DocumentSplitter(lambda split, tokens: out[split].extend(tokens.tolist()), val_fraction, source="c")
    for doc in iter_corpus(find_corpus_files([corpus])):
        splitter.add(split_hash(doc.data), np.array(tok.encode_batch([doc.text])[0] + [tok.eos_id]))
    splitter.finish()
    return out


def prepare(corpus: Path, tok_dir: Path, out: Path, *extra: str) -> int:
    return main([str(corpus), "--tokenizer", str(tok_dir), "--output", str(out), *extra])


def test_one_and_three_workers_write_the_same_bytes_as_one_pass(tmp_path: Path, tok_dir: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    assert len(tokenizing.corpus_units(find_corpus_files([corpus]))) >= 8  # really several units
    args = ["--val-fraction", "0.1", "--shard-tokens", "3000"]
    assert prepare(corpus, tok_dir, tmp_path / "w1", "--workers", "1", *args) == 0
    assert prepare(corpus, tok_dir, tmp_path / "w3", "--workers", "3", *args) == 0
    one, three = tree_bytes(tmp_path / "w1"), tree_bytes(tmp_path / "w3")
    assert one == three
    assert sorted(one) == sorted(["index.json", *(s["name"] for s in json.loads(one["index.json"])["shards"])])
    expected = one_pass(corpus, tok_dir, 0.1)
    assert len(one) > 4 and {s: split_tokens(tmp_path / "w3", s) for s in expected} == expected


def test_a_held_document_crosses_over_across_units(tmp_path: Path, tok_dir: Path) -> None:
    """No document hashes to validation: the train document with the smallest hash, wherever its unit, moves."""
    corpus = make_corpus(tmp_path / "corpus")
    assert prepare(corpus, tok_dir, tmp_path / "out", "--val-fraction", "1e-12", "--workers", "3") == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["documents"]["val"] == 1
    expected = one_pass(corpus, tok_dir, 1e-12)
    assert {s: split_tokens(tmp_path / "out", s) for s in expected} == expected


def test_index_records_the_read_counts_and_options(tmp_path: Path, tok_dir: Path) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    bad = corpus / "b2.jsonl"
    bad.write_bytes(bad.read_bytes() + b"{broken\n" + json.dumps({"text": doc_text(999)}).encode() + b"\n")
    min_bytes = 200
    assert prepare(corpus, tok_dir, tmp_path / "out", "--min-doc-bytes", str(min_bytes), "--skip-bad-records") == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    texts = [doc_text(i) if i % 17 != 5 or i >= 180 else "" for i in range(240)] + [doc_text(999)]
    sizes = [len(t.encode()) for t in texts]
    kept = sum(s >= min_bytes for s in sizes)
    assert index["read"] == {"documents": kept, "empty": sizes.count(0), "bad_records": 1,
                             "filtered": {"min_doc_bytes": sum(0 < s < min_bytes for s in sizes)}}
    assert index["documents"]["train"] + index["documents"]["val"] == kept
    assert index["options"] == {"text_field": "text", "min_doc_bytes": min_bytes, "max_doc_bytes": None,
                                "languages": None, "extensions": None, "skip_bad_records": True}


def test_a_bad_record_in_a_worker_is_one_line_and_leaves_nothing(tmp_path: Path, tok_dir: Path, capsys) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    bad = corpus / "b2.jsonl"
    lines = bad.read_bytes().splitlines(keepends=True)
    lines[40] = b'{"txt": "wrong key"}\n'
    bad.write_bytes(b"".join(lines))
    out = tmp_path / "new" / "ds"
    assert prepare(corpus, tok_dir, out, "--workers", "3") == 3
    err = capsys.readouterr().err
    assert err.startswith("albor prepare-data: error: ") and err.count("\n") == 1
    assert f"{bad}:41: " in err and 'no string "text" field' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no output, staging or spill files


# ---- parts ---------------------------------------------------------------------------------------------


def make_parts(corpus: Path, tok_dir: Path, root: Path, n: int, *extra: str) -> list[Path]:
    dirs = []
    for k in range(n):
        d = root / f"part{k}"
        assert prepare(corpus, tok_dir, d, "--part", f"{k}/{n}", "--workers", str(1 + k % 2), *extra) == 0
        dirs.append(d)
    return dirs


def combine(*args: str | Path) -> int:
    return main(["--combine", *map(str, args)])


@pytest.fixture(scope="module")
def parted(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> tuple[Path, list[Path], Path]:
    """A corpus, its three parts, and the dataset prepared from it on one machine."""
    root = tmp_path_factory.mktemp("parted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizing, "MIN_UNIT_BYTES", 2048)
        corpus = make_corpus(root / "corpus")
        parts = make_parts(corpus, tok_dir, root, 3, "--val-fraction", "0.1")
        assert prepare(corpus, tok_dir, root / "whole", "--val-fraction", "0.1", "--shard-tokens", "5000") == 0
    return corpus, parts, root / "whole"


def test_combined_parts_are_byte_identical_to_one_machine(tmp_path: Path, parted) -> None:
    corpus, parts, whole = parted
    manifests = [json.loads((d / "part.json").read_text()) for d in parts]
    units = manifests[0]["plan"]["units"]
    assert units >= 8 and sorted(int(u) for m in manifests for u in m["units"]) == list(range(units))
    before = [tree_bytes(d) for d in parts]
    # Given in any order; the parts are read, not changed.
    assert combine(parts[2], parts[0], parts[1], "--output", tmp_path / "ds", "--shard-tokens", "5000") == 0
    assert tree_bytes(tmp_path / "ds") == tree_bytes(whole)
    assert [tree_bytes(d) for d in parts] == before


def test_a_part_records_the_sha256_of_each_spill_file(parted) -> None:
    _, parts, _ = parted
    for d in parts:
        manifest = json.loads((d / "part.json").read_text())
        assert manifest["format_version"] == 2
        for u, summary in manifest["units"].items():
            assert summary["sha256"] == {
                split: hashlib.sha256((d / f"unit-{int(u):07d}.{split}.tok").read_bytes()).hexdigest()
                for split in ("train", "val")}


@pytest.mark.parametrize("case,code,needle", [
    ("missing", 2, "part 1/3 missing: --combine needs all 3 part directories"),
    ("twice", 2, "part 0/3 is given twice"),
    ("unfinished", 3, "holds no part.json"),
    ("spill gone", 3, "is missing from part"),
    ("spill short", 3, "has 2 bytes, part"),
    ("spill flipped", 3, "recorded"),  # same size, one bit changed: bit rot, a bad copy
    ("summary malformed", 3, "lacks a valid summary for unit"),
    ("other tokenizer", 3, "differ in their recipe"),
    ("other corpus", 3, "differ in their unit plan"),
    ("with input", 2, "INPUT does not apply to --combine"),
    ("with tokenizer", 2, "--tokenizer does not apply to --combine"),
    ("not a dir", 2, "is not a directory"),
])
def test_combine_refuses(tmp_path: Path, tok_dir: Path, parted, capsys, case: str, code: int, needle: str) -> None:
    corpus, parts, _ = parted
    parts = [shutil.copytree(d, tmp_path / d.name) for d in parts]
    out = tmp_path / "ds"
    extra: list[str | Path] = []
    if case == "missing":
        parts = [parts[0], parts[2]]
    elif case == "twice":
        parts = [parts[0], parts[1], parts[2], parts[0]]
    elif case == "unfinished":
        (parts[1] / "part.json").unlink()
    elif case == "spill gone":
        next(parts[2].glob("unit-*.train.tok")).unlink()
    elif case == "spill short":
        next(p for p in parts[2].glob("unit-*.train.tok") if p.stat().st_size > 2).write_bytes(b"xx")
    elif case == "spill flipped":
        spill = max(parts[2].glob("unit-*.train.tok"), key=lambda p: p.stat().st_size)
        raw = bytearray(spill.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        spill.write_bytes(bytes(raw))
        needle = f"{spill} has sha256 {hashlib.sha256(raw).hexdigest()}, but part {parts[2]} recorded"
    elif case == "summary malformed":
        manifest = json.loads((parts[1] / "part.json").read_text())
        unit = sorted(manifest["units"])[0]
        del manifest["units"][unit]["split"]["tokens"]
        (parts[1] / "part.json").write_text(json.dumps(manifest))
        needle = f"{parts[1] / 'part.json'} lacks a valid summary for unit {unit}; prepare that part again"
    elif case == "other tokenizer":
        other = make_tokenizer(tmp_path / "tok2", vocab_size=290)
        shutil.rmtree(parts[1])
        parts[1] = make_parts(corpus, other, tmp_path / "again", 3, "--val-fraction", "0.1")[1]
    elif case == "other corpus":
        grown = shutil.copytree(corpus, tmp_path / "grown")
        (grown / "py" / "zzz.py").write_text("one more file\n")
        parts[2] = make_parts(grown, tok_dir, tmp_path / "again", 3, "--val-fraction", "0.1")[2]
    elif case == "with input":
        extra = [corpus]
    elif case == "with tokenizer":
        extra = ["--tokenizer", tok_dir]
    elif case == "not a dir":
        parts[0] = tmp_path / "nowhere"
    capsys.readouterr()
    assert main([*map(str, extra), "--combine", *map(str, parts), "--output", str(out)]) == code
    err = capsys.readouterr().err
    assert needle in err and err.startswith("albor prepare-data: error: ") and err.count("\n") == 1, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("part", ["3/3", "1", "a/3", "-1/3", "0/0", "1/2/3"])
def test_bad_part_is_a_usage_error(tmp_path: Path, tok_dir: Path, capsys, part: str) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    assert prepare(corpus, tok_dir, tmp_path / "p", f"--part={part}") == 2
    err = capsys.readouterr().err
    assert f"--part {part} is not K/N with 0 <= K < N" in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()


def test_a_failed_part_leaves_nothing(tmp_path: Path, tok_dir: Path, capsys) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    (corpus / "py" / "m0200.py").write_bytes(b"caf\xe9")
    assert prepare(corpus, tok_dir, tmp_path / "p", "--part", "0/1", "--workers", "2") == 3
    assert "m0200.py is not UTF-8" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
