"""Tokenizer loading: every bad directory is one clear DataError (exit code 3)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from tokenizers import ByteLevelBPETokenizer

from albor.data.tokenizer import EOS_TOKEN, load_tokenizer
from albor.errors import ConfigError, DataError, ExitCode

TEXTS = ["def add(a, b):\n    return a + b\n", "hello world, hello tokenizer\n", "for i in range(10):\n    print(i)\n"] * 5


def make_tokenizer(directory: Path, vocab_size: int = 300, special: bool = True) -> Path:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=vocab_size, special_tokens=[EOS_TOKEN] if special else [],
                            show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(directory))
    return directory


def _error(directory: Path) -> DataError:
    with pytest.raises(DataError) as info:
        load_tokenizer(directory)
    assert info.value.exit_code == ExitCode.DATA == 3
    return info.value


def test_loads_and_encodes(tmp_path: Path) -> None:
    d = make_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(d)
    vocab = json.loads((d / "vocab.json").read_text())
    assert tok.vocab_size == len(vocab) == max(vocab.values()) + 1
    assert tok.eos_id == vocab[EOS_TOKEN]
    ids = tok.encode_batch(["def add(a, b):", "ünïcode ✓"])
    assert all(isinstance(i, int) for row in ids for i in row)
    assert [tok.backend.decode(row) for row in ids] == ["def add(a, b):", "ünïcode ✓"]
    assert tok.sha256 == hashlib.sha256((d / "vocab.json").read_bytes() + (d / "merges.txt").read_bytes()).hexdigest()


def test_literal_eos_text_is_not_a_document_boundary(tmp_path: Path) -> None:
    tok = load_tokenizer(make_tokenizer(tmp_path / "tok"))
    assert tok.eos_id not in tok.encode_batch([f"x = '{EOS_TOKEN}'"])[0]


def test_sha_changes_with_merges(tmp_path: Path) -> None:
    d = make_tokenizer(tmp_path / "tok")
    before = load_tokenizer(d).sha256
    lines = (d / "merges.txt").read_text().splitlines()
    (d / "merges.txt").write_text("\n".join(lines[:-1]) + "\n")
    assert load_tokenizer(d).sha256 != before


@pytest.mark.parametrize("make,needle", [(lambda p: None, "does not exist"),
                                         (lambda p: p.write_text("x"), "is not a directory")])
def test_not_a_directory_is_a_usage_error(tmp_path: Path, make, needle: str) -> None:
    """A --tokenizer path that is not there, or a file, is a bad flag (exit 2), as README's table says."""
    make(tmp_path / "nope")
    with pytest.raises(ConfigError) as info:
        load_tokenizer(tmp_path / "nope")
    assert info.value.exit_code == ExitCode.USAGE == 2
    assert "nope" in str(info.value) and needle in str(info.value) and "--tokenizer" in str(info.value)


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    d = make_tokenizer(tmp_path / "tok")
    (d / name).unlink()
    err = _error(d)
    assert name in str(err) and "missing" in str(err)


def test_malformed_json(tmp_path: Path) -> None:
    d = make_tokenizer(tmp_path / "tok")
    (d / "vocab.json").write_text('{"a": 0,')
    err = _error(d)
    assert "vocab.json" in str(err) and "not valid JSON" in str(err)


@pytest.mark.parametrize("content", ["{}", "[]", '"x"'])
def test_empty_vocab(tmp_path: Path, content: str) -> None:
    d = make_tokenizer(tmp_path / "tok")
    (d / "vocab.json").write_text(content)
    err = _error(d)
    assert "vocab.json" in str(err) and "no vocabulary" in str(err)


def test_missing_eos(tmp_path: Path) -> None:
    d = make_tokenizer(tmp_path / "tok", special=False)
    err = _error(d)
    assert EOS_TOKEN in str(err) and "vocab.json" in str(err)


def test_merges_inconsistent_with_vocab(tmp_path: Path) -> None:
    d = make_tokenizer(tmp_path / "tok")
    (d / "merges.txt").write_text("#version: 0.2\nzzzq qqqz\n")
    err = _error(d)
    assert "merges.txt" in str(err)
