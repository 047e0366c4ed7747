"""Is this the tokenizer a dataset was made with? Checked against ``tokenizer_sha256`` in index.json.

Two tokenizers are compared, when they are there:

* the one a dataset ships: ``index.json``'s ``tokenizer`` names a directory
  inside the dataset (``prepare-data --builtin`` writes ``tokenizer/``). If
  that directory exists, its ``vocab.json`` + ``merges.txt`` must hash to the
  index's sha: a tokenizer edited after the fact would decode the model's
  output into other text than it was trained on. A dataset copied without it
  still trains (the tokens are already in the shards).
* the one passed as ``--tokenizer`` together with a prepared dataset: it
  must be the tokenizer the dataset was made with, or the user is training
  on another vocabulary than the one they believe.

A raw corpus is tokenized with ``--tokenizer`` itself, so it matches by construction.
``albor export`` checks the tokenizer it writes out against the run's dataset
the same way (albor.export.run_tokenizer).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from albor.data.tokenizer import MERGES_FILE, VOCAB_FILE, Tokenizer, tokenizer_sha256
from albor.errors import DataError

_REGENERATE_DATASET = "regenerate the dataset with `albor prepare-data`"


def shipped_tokenizer_dir(index_path: Path, index: Mapping[str, Any]) -> Path | None:
    """The tokenizer directory inside the dataset that the index names, if it names one and it exists."""
    name = index.get("tokenizer")
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        return None  # made with a tokenizer outside the dataset: nothing shipped
    root = index_path.parent.resolve()
    directory = (root / name).resolve()
    if not directory.is_relative_to(root) or directory == root or not directory.is_dir():
        return None
    return index_path.parent / name


def index_tokenizer_dir(index_path: Path, index: Mapping[str, Any]) -> Path | None:
    """The tokenizer directory the index names, if it is there: the one it ships, or the absolute path it records.

    ``prepare-data --builtin`` ships its tokenizer inside the dataset;
    ``prepare-data --tokenizer`` and a run's raw-corpus cache record the
    tokenizer's absolute path.
    """
    name = index.get("tokenizer")
    if isinstance(name, str) and Path(name).is_absolute():
        return Path(name) if Path(name).is_dir() else None
    return shipped_tokenizer_dir(index_path, index)


def check_shipped_tokenizer(index_path: Path, index: Mapping[str, Any]) -> None:
    """DataError when the tokenizer inside the dataset is not the one its tokens were made with."""
    directory = shipped_tokenizer_dir(index_path, index)
    if directory is None:
        return
    expected = index["tokenizer_sha256"]
    for name in (VOCAB_FILE, MERGES_FILE):
        if not (directory / name).is_file():
            raise DataError(
                f"dataset {index_path}: its tokenizer file {directory / name} is missing (the dataset was made "
                f"with tokenizer sha256 {expected}); restore it or {_REGENERATE_DATASET}"
            )
    actual = tokenizer_sha256(directory)
    if actual != expected:
        raise DataError(
            f"dataset {index_path}: its tokenizer {directory} has sha256 {actual}, but the dataset was made with "
            f"sha256 {expected} (the tokenizer files changed afterwards); restore them or {_REGENERATE_DATASET}"
        )


def check_tokenizer_matches(
    tokenizer: Tokenizer,
    index_path: Path,
    index: Mapping[str, Any],
    *,
    named: str = "--tokenizer",
    made: str = "this dataset was made with",
    fix: str = "pass that tokenizer, drop --tokenizer (a prepared dataset needs none), or re-run `albor prepare-data` "
    "with this one",
) -> None:
    """DataError when ``tokenizer`` is not the one the dataset was made with (its index's ``tokenizer_sha256``).

    The message reads "{named} DIR (sha256 ...) is not the tokenizer {made}
    (sha256 ..., recorded in INDEX); {fix}"; by default, training's: ``--tokenizer``
    passed with a prepared dataset.
    """
    expected = index["tokenizer_sha256"]
    if tokenizer.sha256 != expected:
        raise DataError(
            f"{named} {tokenizer.directory} (sha256 {tokenizer.sha256}) is not the tokenizer {made} (sha256 "
            f"{expected}, recorded in {index_path}); {fix}"
        )
