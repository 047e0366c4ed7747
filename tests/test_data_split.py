"""The train/validation split rule, against its documented closed form."""

from __future__ import annotations

import random

import numpy as np
import pytest

from albor.data.split import DocumentSplitter, UnitSplit, UnitSplitter, is_validation
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


# ---- the same rule, applied to whole units at merge time ----------------------------------------------


class ArrayTokens:
    """A unit's token streams held in memory, as a worker's spill files hold them."""

    def __init__(self, streams: dict[str, list[int]]):
        self.streams = {k: np.array(v, dtype=np.int64) for k, v in streams.items()}
        self.reads = 0

    def copy(self, split: str, start: int, stop: int) -> None:
        self.out[split].extend(self.streams[split][start:stop].tolist())

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        self.reads += 1
        return self.streams[split][start:stop].copy()


def merged_by_units(docs: list[tuple[int, list[int]]], cuts: list[int], val_fraction: float):
    """Documents (hash, tokens) cut into units at ``cuts``, each summarized alone, then merged in order."""
    out: dict[str, list[int]] = {"train": [], "val": []}
    splitter = UnitSplitter(lambda split, tokens: out[split].extend(tokens.tolist()), val_fraction, source="c/")
    bounds = [0, *cuts, len(docs)]
    for lo, hi in zip(bounds, bounds[1:]):
        unit = UnitSplit(val_fraction)
        streams: dict[str, list[int]] = {"train": [], "val": []}
        for h, tokens in docs[lo:hi]:
            streams[unit.add(h, len(tokens))].extend(tokens)
        unit = UnitSplit.from_json(unit.to_json(), val_fraction)  # as a part's manifest carries it
        tokens = ArrayTokens(streams)
        tokens.out = out
        splitter.add_unit(unit, tokens)
        assert tokens.reads <= len(unit.records)  # only candidates are ever read into memory
    splitter.finish()
    return out, splitter.docs


def one_by_one(docs: list[tuple[int, list[int]]], val_fraction: float):
    out: dict[str, list[int]] = {"train": [], "val": []}
    splitter = DocumentSplitter(lambda split, tokens: out[split].extend(tokens.tolist()), val_fraction, source="c/")
    for h, tokens in docs:
        splitter.add(h, np.array(tokens))
    splitter.finish()
    return out, splitter.docs


def test_units_merged_in_order_give_exactly_the_one_pass_result() -> None:
    """Whatever the cut into units, the merge writes what one pass over the documents writes."""
    rng = random.Random(99)
    for case, (hashes, val_fraction) in enumerate(random_cases(3000)):
        # Documents of 1-3 tokens with ids unique to them, so any move or reordering shows.
        docs = [(h, [100 * i + k for k in range(rng.randint(1, 3))]) for i, h in enumerate(hashes)]
        cuts = sorted(rng.choices(range(len(docs) + 1), k=rng.randint(0, 5)))  # empty units too
        try:
            expected = one_by_one(docs, val_fraction)
        except DataError as e:
            with pytest.raises(DataError, match=str(e)[:30]):
                merged_by_units(docs, cuts, val_fraction)
            continue
        assert merged_by_units(docs, cuts, val_fraction) == expected, (case, hashes, cuts, val_fraction)


def test_unit_records_are_only_the_candidates() -> None:
    unit = UnitSplit(0.5)
    for h, n in [(2**63 + 5, 2), (2**63 + 9, 1), (2**63 + 3, 4), (2**63 + 3, 1), (10, 1), (2**63 + 1, 2)]:
        unit.add(h, n)
    # The leading train run is the first four documents; 9 is not below 5, the second 3 does not beat the first.
    assert unit.run_split == "train" and unit.run == 4 and unit.run_tokens == 8
    assert unit.records == [[0, 2**63 + 5, 0, 2], [2, 2**63 + 3, 3, 7]]
    assert unit.docs == {"train": 5, "val": 1} and unit.tokens == {"train": 10, "val": 1}
