"""Which documents go to validation: by content hash, so the split ignores file order.

A document goes to validation when the first 8 bytes of blake2b(its UTF-8
text), read as a fraction of 2**64, fall below ``val_fraction``. Small corpora
may leave one split empty; then one document crosses over: with no
validation document, the train document with the smallest hash goes to
validation (when ``val_fraction > 0``); with no train document, the
validation document with the largest hash goes to train; of equal hashes,
the first in corpus order. So a corpus of two or more documents always fills
both splits.

To decide in one pass, the current candidate is held back until a document
of the other split appears (then it is written where its hash put it, at
that point of the stream) or the corpus ends (then it crosses over). Each
split otherwise keeps corpus order.

:class:`DocumentSplitter` applies the rule one document at a time.
``prepare-data`` tokenizes the corpus in units, in parallel, and applies it
when it merges them in corpus order (:class:`UnitSplitter`): each unit's
worker records a :class:`UnitSplit` (its counts, and its leading run of
documents of one split with the ones there that could be held), which is all
the merge needs to write exactly what :class:`DocumentSplitter` would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from albor.errors import DataError


def split_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def is_validation(h: int, val_fraction: float) -> bool:
    return h < val_fraction * 2.0**64


def _other(split: str) -> str:
    return "train" if split == "val" else "val"


def _better(split: str, h: int, than: int) -> bool:
    """Smallest-hash train document, or largest-hash validation document: the closer to the threshold.

    Strict, so that of equal hashes the first stays the candidate.
    """
    return h < than if split == "train" else h > than


class _SplitState:
    """What both splitters track: the splits seen, the held candidate, the documents written."""

    def __init__(self, val_fraction: float, source: str):
        self.val_fraction = val_fraction
        self.source = source  # names the corpus in errors
        self.docs = {"train": 0, "val": 0}  # documents written
        self._seen = {"train": False, "val": False}  # held documents count as seen
        self._held: tuple[str, int, np.ndarray] | None = None  # (split by hash, hash, tokens)

    def _passes_through(self, split: str) -> bool:
        """True when a document of ``split`` is written at once, whatever its hash."""
        other = _other(split)
        return self._seen[other] or (other == "val" and self.val_fraction == 0)

    def finish(self) -> None:
        """Flush the held document; DataError when the corpus cannot fill the splits it needs."""
        total = self.docs["train"] + self.docs["val"] + (self._held is not None)
        if total == 0:
            raise DataError(f"corpus {self.source} holds no text (every document in it is empty); add documents")
        if self._held is None:
            return
        split, _, tokens = self._held
        self._held = None
        if total == 1:  # only held with val_fraction > 0, so both splits are needed
            raise DataError(
                f"corpus {self.source} holds a single document, too few for both a train and a validation "
                "split; add documents"
            )
        self._emit_tokens(_other(split), tokens)

    def _release(self) -> None:
        if self._held is not None:
            split, _, tokens = self._held
            self._held = None
            self._emit_tokens(split, tokens)

    def _emit_tokens(self, split: str, tokens: np.ndarray) -> None:
        raise NotImplementedError


class DocumentSplitter(_SplitState):
    """Routes tokenized documents to ``emit(split, tokens)``, one at a time (see module docstring)."""

    def __init__(self, emit: Callable[[str, np.ndarray], None], val_fraction: float, *, source: str):
        super().__init__(val_fraction, source)
        self._emit_fn = emit

    def add(self, h: int, tokens: np.ndarray) -> None:
        split = "val" if is_validation(h, self.val_fraction) else "train"
        self._seen[split] = True
        if self._held is not None and self._held[0] == _other(split):
            self._release()  # the other split is no longer empty: the held document stays where it was
        if self._passes_through(split):
            self._emit_tokens(split, tokens)
            return
        if self._held is None or _better(split, h, self._held[1]):
            self._release()
            self._held = (split, h, tokens)
        else:
            self._emit_tokens(split, tokens)

    def _emit_tokens(self, split: str, tokens: np.ndarray) -> None:
        self._emit_fn(split, tokens)
        self.docs[split] += 1


@dataclass
class UnitSplit:
    """One unit's documents as the split rule sees them; built by :meth:`add` in the unit's worker.

    ``run`` counts the unit's leading documents of one split (``run_split``),
    ending at its first document of the other split; ``run_tokens`` are theirs.
    ``records`` are the run's documents that are closer to the threshold than
    every one before them in the run, as ``[index, hash, start, stop]`` (their
    tokens in the unit's ``run_split`` stream): only these can be held.
    """

    val_fraction: float
    docs: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    run_split: str | None = None
    run: int = 0
    run_tokens: int = 0
    in_run: bool = True
    records: list[list[int]] = field(default_factory=list)

    def add(self, h: int, n_tokens: int) -> str:
        """Count a document of ``n_tokens`` tokens (EOS included) and hash ``h``; returns its split by hash."""
        split = "val" if is_validation(h, self.val_fraction) else "train"
        if self.run_split is None:
            self.run_split = split
        if self.in_run and split != self.run_split:
            self.in_run = False
        if self.in_run:
            if not self.records or _better(split, h, self.records[-1][1]):
                start = self.tokens[split]
                self.records.append([self.run, h, start, start + n_tokens])
            self.run += 1
            self.run_tokens += n_tokens
        self.docs[split] += 1
        self.tokens[split] += n_tokens
        return split

    def to_json(self) -> dict[str, Any]:
        return {"docs": dict(self.docs), "tokens": dict(self.tokens), "run_split": self.run_split, "run": self.run,
                "run_tokens": self.run_tokens, "records": [list(r) for r in self.records]}

    @classmethod
    def from_json(cls, data: dict[str, Any], val_fraction: float) -> UnitSplit:
        return cls(val_fraction, docs=dict(data["docs"]), tokens=dict(data["tokens"]), run_split=data["run_split"],
                   run=data["run"], run_tokens=data["run_tokens"], in_run=False, records=[list(r) for r in data["records"]])


class UnitTokens(Protocol):
    """A unit's tokens, one stream per split, as the merge reads them."""

    def copy(self, split: str, start: int, stop: int) -> None:
        """Write tokens ``[start, stop)`` of the unit's ``split`` stream to the output's ``split``."""

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the unit's ``split`` stream, in memory (one held document)."""


class UnitSplitter(_SplitState):
    """:class:`DocumentSplitter`'s result, from whole units merged in corpus order.

    Runs of documents that are written where they are go out as ranges of the
    units' token streams (``write(split, tokens)`` receives held documents).
    """

    def __init__(self, write: Callable[[str, np.ndarray], None], val_fraction: float, *, source: str):
        super().__init__(val_fraction, source)
        self._write = write

    def add_unit(self, unit: UnitSplit, tokens: UnitTokens) -> None:
        """Apply the rule to the next unit's documents; its streams are read now and not after."""
        if unit.run_split is None:
            return  # no document
        s = unit.run_split
        if not self._passes_through(s):
            self._add_run(unit, tokens)
        else:
            if self._held is not None:  # held in the other split, which is seen now
                self._release()
            self._seen[s] = True
            self._copy(tokens, s, 0, unit.run_tokens, unit.run)
        if unit.run < unit.docs[s] + unit.docs[_other(s)]:  # the unit holds both splits: all seen from here
            self._seen[_other(s)] = True
            self._release()
            o = _other(s)
            self._copy(tokens, s, unit.run_tokens, unit.tokens[s], unit.docs[s] - unit.run)
            self._copy(tokens, o, 0, unit.tokens[o], unit.docs[o])

    def _add_run(self, unit: UnitSplit, tokens: UnitTokens) -> None:
        """The leading run of one split while that split's other is still unseen: candidates are held."""
        s = unit.run_split
        assert s is not None  # and what is held, if anything, is of split s: its other is unseen
        self._seen[s] = True
        index, start = 0, 0  # the next document of the run not yet written or held, and its first token
        for i, h, begin, end in unit.records:
            if self._held is not None and not _better(s, h, self._held[1]):
                continue  # records are ever closer to the threshold: a later one may still win
            self._copy(tokens, s, start, begin, i - index)
            self._release()
            self._held = (s, h, tokens.read(s, begin, end))
            index, start = i + 1, end
        self._copy(tokens, s, start, unit.run_tokens, unit.run - index)

    def _copy(self, tokens: UnitTokens, split: str, start: int, stop: int, docs: int) -> None:
        if docs:
            tokens.copy(split, start, stop)
            self.docs[split] += docs

    def _emit_tokens(self, split: str, tokens: np.ndarray) -> None:
        self._write(split, tokens)
        self.docs[split] += 1
