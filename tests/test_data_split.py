"""The train/validation split rule, against its documented closed form."""

from __future__ import annotations

import random

import numpy as np
import pytest

from albor.data.split import DocumentSplitter, is_validation
from albor.errors import DataError, ExitCode

def split_documents(hashes: list[int], val_fraction: float) -> dict[str, list[int]]:
    """Run the splitter over documents 0..n-1 with the given hashes; the document ids per split."""
    out: dict[str, list[int]] = {"train": [], "val": []}
    splitter = DocumentSplitter(lambda split, tokens: out[split].append(int(tokens[0])), val_fraction, source="c/")
    for i, h in enumerate(hashes):
        splitter.add(h, np.array([i]))
    splitter.finish()
    assert splitter.docs == {"train": len(out["train"]), "val": len(out["val"])}
    return out


def documented_split(hashes: list[int], val_fraction: float) -> dict[str, set[int]]:
    """The rule as the module docstring states it, computed directly."""
    val = {i for i, h in enumerate(hashes) if is_validation(h, val_fraction)}
    train = set(range(len(hashes))) - val
    if val_fraction > 0 and not val:  # the train document with the smallest hash (the first of equals)
        i = min(train, key=lambda i: (hashes[i], i))
        train, val = train - {i}, {i}
    elif not train:  # the validation document with the largest hash (the first of equals)
        i = max(val, key=lambda i: (hashes[i], -i))
        train, val = {i}, val - {i}
    return {"train": train, "val": val}


def random_cases(count: int):
    """Uniform 64-bit hashes like blake2b's, some drawn from a small pool so that equal hashes occur."""
    rng = random.Random(1234)
    for _ in range(count):
        n = rng.randint(2, 12)
        pool = [rng.getrandbits(64) for _ in range(rng.choice([2, 3, n]))]
        yield [rng.choice(pool) for _ in range(n)], rng.choice([0.0, 1e-9, 0.02, 0.5, 0.98, 1 - 1e-9])


def test_split_follows_the_documented_rule() -> None:
    crossed = {"train": 0, "val": 0}
    for hashes, val_fraction in random_cases(3000):
        got = split_documents(hashes, val_fraction)
        expected = documented_split(hashes, val_fraction)
        assert {k: set(v) for k, v in got.items()} == expected, (hashes, val_fraction)
        assert sorted(got["train"] + got["val"]) == list(range(len(hashes)))  # each document exactly once
        assert got["train"] and (got["val"] or val_fraction == 0)
        for split in crossed:
            crossed[split] += any(is_validation(hashes[i], val_fraction) != (split == "val") for i in got[split])
    assert min(crossed.values()) > 100  # both crossings were really exercised


@pytest.mark.parametrize("hashes,val_fraction,expected", [
    ([2**63, 2**62], 0.02, {"train": {0}, "val": {1}}),  # no val by hash: the smaller hash moves to val
    ([10, 20, 5], 0.5, {"train": {1}, "val": {0, 2}}),  # no train by hash: the larger hash moves to train
    ([10, 2**63], 0.5, {"train": {1}, "val": {0}}),  # both present: nothing moves
])
def test_crossing_examples(hashes: list[int], val_fraction: float, expected: dict[str, set[int]]) -> None:
    assert {k: set(v) for k, v in split_documents(hashes, val_fraction).items()} == expected


@pytest.mark.parametrize("hashes,val_fraction,needle", [
    ([], 0.02, "holds no text"),
    ([], 0.0, "holds no text"),
    ([5], 0.02, "holds a single document"),
    ([2**63], 0.02, "holds a single document"),
])
def test_too_few_documents(hashes: list[int], val_fraction: float, needle: str) -> None:
    with pytest.raises(DataError) as info:
        split_documents(hashes, val_fraction)
    assert info.value.exit_code == ExitCode.DATA
    # Names the corpus as the user gave it; suggests no flag (the fix differs by command).
    assert f"corpus c/ {needle}" in str(info.value) and "add documents" in str(info.value) and "--" not in str(info.value)


def test_single_document_without_validation_is_fine() -> None:
    assert split_documents([5], 0.0) == {"train": [0], "val": []}
