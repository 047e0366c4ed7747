"""``albor prepare-data`` on made-up corpora and on the builtin corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import ByteLevelBPETokenizer

from albor.data import builtin
from albor.data.prepare import main
from albor.data.shards import HEADER_SIZE, read_header
from albor.data.split import is_validation, split_hash
from albor.data.tokenizer import EOS_TOKEN, load_tokenizer

TRAIN_TEXT = ["import os\nprint(os.getcwd())\n", "def f(x):\n    return x * 2\n", "hello tokenizer world\n"] * 10


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TRAIN_TEXT, vocab_size=320, special_tokens=[EOS_TOKEN], show_progress=False)
    bpe.save_model(str(d))
    return d


def make_corpus(root: Path) -> list[str]:
    """A directory of .txt/.py/.jsonl; returns its documents."""
    (root / "sub").mkdir(parents=True)
    docs = ["plain text document\nsecond line\n", "def g():\n    return 'ü ✓'\n", "first json doc", "second\njson doc"]
    (root / "a.txt").write_text(docs[0])
    (root / "b.py").write_text(docs[1])
    (root / "sub" / "c.jsonl").write_text(
        json.dumps({"text": docs[2], "meta": 1}) + "\n\n" + json.dumps({"text": docs[3]}) + "\n"
    )
    (root / "ignored.md").write_text("not corpus")
    (root / "empty.txt").write_text("")
    return docs


def read_split(out: Path, split: str) -> np.ndarray:
    index = json.loads((out / "index.json").read_text())
    parts = []
    for s in index["shards"]:
        if s["split"] == split:
            h = read_header(out / s["name"])
            parts.append(np.frombuffer((out / s["name"]).read_bytes()[HEADER_SIZE:], dtype=h.dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def decode_docs(out: Path, tok_dir: Path) -> list[str]:
    tok = load_tokenizer(tok_dir)
    docs = []
    for split in ("train", "val"):
        tokens = read_split(out, split).tolist()
        assert tokens and tokens[-1] == tok.eos_id  # every document ends with EOS
        cur: list[int] = []
        for t in tokens:
            if t == tok.eos_id:
                docs.append(tok.backend.decode(cur))
                cur = []
            else:
                cur.append(t)
    return docs


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_small_corpus(tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture) -> None:
    docs = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    assert main([str(tmp_path / "corpus"), "--tokenizer", str(tok_dir), "--output", str(out)]) == 0
    assert "index.json" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert sorted(decode_docs(out, tok_dir)) == sorted(docs)
    assert index["documents"]["train"] + index["documents"]["val"] == 4
    assert index["documents"]["val"] >= 1  # tiny corpus: the smallest-hash document is moved to val
    assert index["vocab_size"] == load_tokenizer(tok_dir).vocab_size and index["dtype"] == "uint16"
    assert index["tokenizer_sha256"] == load_tokenizer(tok_dir).sha256
    assert {s["split"] for s in index["shards"]} == {"train", "val"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_val_fraction_zero_and_split_by_hash(tmp_path: Path, tok_dir: Path) -> None:
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    assert main([str(tmp_path / "corpus"), "--tokenizer", str(tok_dir), "--output", str(out), "--val-fraction", "0"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["documents"] == {"train": 4, "val": 0} and index["tokens"]["val"] == 0
    hashes = [split_hash(str(i).encode()) for i in range(2000)]
    share = sum(is_validation(h, 0.1) for h in hashes) / len(hashes)
    assert 0.08 < share < 0.12


def test_hash_split_places_documents(tmp_path: Path, tok_dir: Path) -> None:
    texts = [f"document number {i}\n" for i in range(200)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    assert main([str(tmp_path / "c.jsonl"), "--tokenizer", str(tok_dir), "--output", str(out), "--val-fraction", "0.2"]) == 0
    tok = load_tokenizer(tok_dir)
    val_tokens = read_split(out, "val").tolist()
    expected_val = [t for t in texts if is_validation(split_hash(t.encode()), 0.2)]
    expected = [i for ids in tok.encode_batch(expected_val) for i in ids + [tok.eos_id]]
    assert 20 < len(expected_val) < 60 and val_tokens == expected


def test_single_document_with_validation_is_an_error(tmp_path: Path, tok_dir: Path, capsys) -> None:
    (tmp_path / "one.txt").write_text("only one")
    rc = main([str(tmp_path / "one.txt"), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    # Names the user's file; no --val-fraction 0, which would only move the failure to pretrain's validation.
    assert rc == 3 and f"{tmp_path / 'one.txt'} holds a single document" in err and "add documents" in err
    assert "--val-fraction" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["one.txt"]


@pytest.mark.parametrize("line,needle", [('{"txt": "x"}', 'no string "text"'), ("{not json", "not a JSON"),
                                         ('{"text": 5}', 'no string "text"')])
def test_bad_jsonl_line(tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture, line: str, needle: str) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ok.txt").write_text("fine")
    bad = tmp_path / "c" / "z.jsonl"
    bad.write_text('{"text": "good"}\n' + line + "\n")
    out = tmp_path / "out"
    assert main([str(tmp_path / "c"), "--tokenizer", str(tok_dir), "--output", str(out)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("albor prepare-data: error: ") and err.count("\n") == 1
    assert f"{bad}:2" in err and needle in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_failed_rerun_keeps_the_earlier_dataset(tmp_path: Path, tok_dir: Path, capsys) -> None:
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    assert main([str(tmp_path / "corpus"), "--tokenizer", str(tok_dir), "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "corpus" / "zz.jsonl").write_text("{not json\n")
    assert main([str(tmp_path / "corpus"), "--tokenizer", str(tok_dir), "--output", str(out)]) == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_dir_with_other_files_is_refused(tmp_path: Path, tok_dir: Path, capsys) -> None:
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([str(tmp_path / "corpus"), "--tokenizer", str(tok_dir), "--output", str(out)]) == 2
    assert "holds more than an albor dataset" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_notes_beside_an_earlier_dataset_are_not_deleted(tmp_path: Path, tok_dir: Path, capsys) -> None:
    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = [str(tmp_path / "corpus"), "--tokenizer", str(tok_dir), "--output", str(out)]
    assert main(args) == 0
    (out / "NOTES.md").write_text("mine")
    assert main(args) == 2 and "holds more than an albor dataset" in capsys.readouterr().err
    assert (out / "NOTES.md").read_text() == "mine" and (out / "index.json").is_file()


def test_tokenizer_inside_the_output_is_refused(tmp_path: Path, tok_dir: Path, capsys) -> None:
    import shutil

    make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    assert main([str(tmp_path / "corpus"), "--tokenizer", str(tok_dir), "--output", str(out)]) == 0
    shutil.copytree(tok_dir, out / "tokenizer")
    before = sorted(p.name for p in out.iterdir())
    assert main([str(tmp_path / "corpus"), "--tokenizer", str(out / "tokenizer"), "--output", str(out)]) == 2
    assert "lies inside --output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_bad_val_fraction_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["--builtin", "python-stdlib", "--output", str(out), "--val-fraction", "1.5"]) == 2
    assert not out.exists() and "--val-fraction 1.5" in capsys.readouterr().err


def test_not_utf8(tmp_path: Path, tok_dir: Path, capsys) -> None:
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert main([str(tmp_path / "latin.txt"), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "o")]) == 3
    assert "latin.txt" in capsys.readouterr().err


@pytest.mark.parametrize("args,code,needle", [
    # README's table: a path that does not exist, or is not what the flag takes, is usage (2).
    (["missing_dir", "--tokenizer", "{tok}"], 2, "corpus path missing_dir does not exist"),
    (["corpus/file.md", "--tokenizer", "{tok}"], 2, "not .txt, .py or .jsonl"),
    (["corpus", "--tokenizer", "nowhere"], 2, "tokenizer directory nowhere does not exist"),
    (["corpus", "--tokenizer", "corpus/a.txt"], 2, "is not a directory"),
    (["empty", "--tokenizer", "{tok}"], 3, "no .txt, .py or .jsonl files in empty"),
    (["corpus", "--tokenizer", "{tok}", "--output", "corpus/a.txt/ds"], 2, "corpus/a.txt is a file"),
    (["--builtin", "python-stdlib", "--max-bytes", "0"], 2, "--max-bytes 0"),
    (["--builtin", "python-stdlib", "--max-bytes", "10"], 2, "raise --max-bytes"),
    (["corpus", "--tokenizer", "{tok}", "--max-bytes", "10"], 2, "--builtin only"),
    (["corpus", "--tokenizer", "{tok}", "--shard-tokens", "0"], 2, "--shard-tokens"),
    (["corpus"], 2, "--tokenizer"),
    ([], 2, "--builtin python-stdlib"),
    (["corpus", "--tokenizer", "{tok}", "--val-fraction", "1.5"], 2, "--val-fraction"),
    (["corpus", "--tokenizer", "{tok}", "--workers", "0"], 2, "--workers"),
    (["--builtin", "python-stdlib", "--vocab-size", "10"], 2, "--vocab-size"),
    (["corpus", "--builtin", "python-stdlib"], 2, "drop INPUT"),
])
def test_usage_errors(tmp_path: Path, tok_dir: Path, capsys, monkeypatch, args: list[str], code: int,
                      needle: str) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "file.md").write_text("x")
    (tmp_path / "corpus" / "a.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    before = tree_bytes(tmp_path)
    argv = [a.replace("{tok}", str(tok_dir)) for a in args]
    assert main(argv if "--output" in argv else argv + ["--output", "out"]) == code
    err = capsys.readouterr().err
    assert needle in err and err.startswith("albor prepare-data: error:") and err.count("\n") == 1
    assert tree_bytes(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "empty"]


def test_unwritable_output_is_one_line(tmp_path: Path, tok_dir: Path, capsys) -> None:
    make_corpus(tmp_path / "corpus")
    (tmp_path / "out").write_text("a file where the output directory should go")
    assert main([str(tmp_path / "corpus"), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("albor prepare-data: error:") and "out" in err and err.count("\n") == 1
    assert (tmp_path / "out").read_text() == "a file where the output directory should go"


def test_shard_cap_and_rerun_removes_stale_shards(tmp_path: Path, tok_dir: Path) -> None:
    make_corpus(tmp_path / "corpus")
    big, small = tmp_path / "big", tmp_path / "small"
    base = [str(tmp_path / "corpus"), "--tokenizer", str(tok_dir)]
    assert main(base + ["--output", str(small)]) == 0
    assert main(base + ["--output", str(big), "--shard-tokens", "7"]) == 0
    names = [s["name"] for s in json.loads((big / "index.json").read_text())["shards"]]
    assert len(names) > 3 and all(0 < read_header(big / n).count <= 7 for n in names)
    for split in ("train", "val"):
        assert np.array_equal(read_split(big, split), read_split(small, split))
    assert main(base + ["--output", str(big)]) == 0  # same dir, now one shard per split
    assert sorted(p.name for p in big.glob("*.bin")) == ["train-00000.bin", "val-00000.bin"]
    assert tree_bytes(big) == tree_bytes(small)


def test_workers_leave_the_environment_as_it_was(tmp_path: Path, tok_dir: Path, monkeypatch) -> None:
    """One worker tokenizes on one thread in this process, and puts TOKENIZERS_PARALLELISM back afterwards:
    a run's raw-corpus cache must not change the environment its training then runs in."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    make_corpus(tmp_path / "corpus")
    base = [str(tmp_path / "corpus"), "--tokenizer", str(tok_dir)]
    assert main(base + ["--output", str(tmp_path / "a")]) == 0
    assert main(base + ["--output", str(tmp_path / "b"), "--workers", "1"]) == 0
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


# ---- builtin ---------------------------------------------------------------------------------------


def test_stdlib_sources_sorted_capped_and_filtered() -> None:
    sources = builtin.stdlib_sources(300_000)
    names = [n for n, _ in sources]
    assert names == sorted(names) and names
    assert sum(len(d.data) for _, d in sources) <= 300_000
    assert not any(part in {"test", "tests", "site-packages"} for n in names for part in n.split("/"))


def test_builtin_is_byte_identical_across_runs(tmp_path: Path) -> None:
    args = ["--builtin", "python-stdlib", "--max-bytes", "250000", "--vocab-size", "512"]
    assert main(args + ["--output", str(tmp_path / "a")]) == 0
    # The second run in a fresh process: other hash seeds, another thread pool.
    env = dict(os.environ, PYTHONHASHSEED="123", RAYON_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "albor.cli", "prepare-data", *args, "--output", str(tmp_path / "b")],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    a, b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert set(a) == {"index.json", "train-00000.bin", "val-00000.bin", "tokenizer/vocab.json", "tokenizer/merges.txt"}
    assert a == b
    index = json.loads(a["index.json"])
    tok = load_tokenizer(tmp_path / "a" / "tokenizer")
    assert index["vocab_size"] == tok.vocab_size == 512 and index["tokens"]["val"] > 0
    assert index["tokenizer"] == "tokenizer" and index["source"]["builtin"] == "python-stdlib"


def test_vocab_size_without_builtin_is_refused(tmp_path: Path, tok_dir: Path, capsys) -> None:
    make_corpus(tmp_path / "corpus")
    code = main([str(tmp_path / "corpus"), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "o"), "--vocab-size", "100"])
    assert code == 2 and "--builtin only" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_dataset_directory_is_readable_by_others(tmp_path: Path, tok_dir: Path) -> None:
    import os
    import stat

    make_corpus(tmp_path / "corpus")
    old = os.umask(0o022)
    try:
        assert main([str(tmp_path / "corpus"), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "o")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o755


# ---- nothing half-written ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,content,needle", [
    ("a.txt", b"", "corpus {corpus} holds no text"),
    ("a.txt", b"caf\xe9", "{corpus}/a.txt is not UTF-8"),
    ("a.jsonl", b'{"text": "fine"}\n{"text": "half a pair \\ud800"}\n', "{corpus}/a.jsonl:2: the text holds '\\ud800'"),
    ("a.jsonl", b'{"text": "fine"}\n{"text": "also fine"}\n[1]\n', "{corpus}/a.jsonl:3: no string"),
])
def test_a_failed_prepare_leaves_no_new_directories(tmp_path: Path, tok_dir: Path, capsys, name: str, content: bytes,
                                                    needle: str) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / name).write_bytes(content)
    out = tmp_path / "new" / "deeper" / "ds"
    assert main([str(corpus), "--tokenizer", str(tok_dir), "--output", str(out)]) == 3
    err = capsys.readouterr().err
    assert needle.format(corpus=corpus) in err and err.count("\n") == 1 and "staging" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_an_output_that_cannot_be_written_is_a_usage_error(tmp_path: Path, tok_dir: Path, capsys, monkeypatch) -> None:
    make_corpus(tmp_path / "corpus")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr("albor.data.staging.tempfile.mkdtemp", refuse)  # root writes anywhere: simulate a read-only place
    out = tmp_path / "new" / "ds"
    assert main([str(tmp_path / "corpus"), "--tokenizer", str(tok_dir), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--output {out}: cannot write in {out.parent} (Permission denied)" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_a_corpus_whose_documents_all_hash_to_validation_still_has_a_train_split(tmp_path: Path, tok_dir: Path) -> None:
    (tmp_path / "c.jsonl").write_text('{"text": "one document"}\n{"text": "another document"}\n')
    out = tmp_path / "out"
    args = [str(tmp_path / "c.jsonl"), "--tokenizer", str(tok_dir), "--output", str(out), "--val-fraction", "0.999999"]
    assert main(args) == 0
    assert json.loads((out / "index.json").read_text())["documents"] == {"train": 1, "val": 1}
