"""Which documents go to validation: by content hash, so the split ignores file order.

A document goes to validation when the first 8 bytes of blake2b(its UTF-8
text), read as a fraction of 2**64, fall below ``val_fraction``. Small corpora
may leave one split empty; then one document crosses over: with no
validation document, the train document with the smallest hash goes to
validation (when ``val_fraction > 0``); with no train document, the
validation document with the largest hash goes to train. So a corpus of two
or more documents always fills both splits. To decide in one pass, the
current candidate is held back until a document of the other split appears
(then it is written where its hash put it) or the corpus ends (then it
crosses over).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from albor.errors import DataError


def split_hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def is_validation(h: int, val_fraction: float) -> bool:
    return h < val_fraction * 2.0**64


class DocumentSplitter:
    """Routes tokenized documents to ``emit(split, tokens)`` (see module docstring)."""

    def __init__(self, emit: Callable[[str, np.ndarray], None], val_fraction: float, *, source: str):
        self._emit_fn = emit
        self.val_fraction = val_fraction
        self.source = source  # names the corpus in errors
        self.docs = {"train": 0, "val": 0}  # documents written
        self._seen = {"train": False, "val": False}  # held documents count as seen
        self._held: tuple[str, int, np.ndarray] | None = None  # (split by hash, hash, tokens)

    def add(self, h: int, tokens: np.ndarray) -> None:
        split = "val" if is_validation(h, self.val_fraction) else "train"
        other = "train" if split == "val" else "val"
        self._seen[split] = True
        if self._held is not None and self._held[0] == other:
            self._release()  # the other split is no longer empty: the held document stays where it was
        if self._seen[other] or (other == "val" and self.val_fraction == 0):
            self._emit(split, tokens)
            return
        if self._held is None or self._better_candidate(split, h):
            self._release()
            self._held = (split, h, tokens)
        else:
            self._emit(split, tokens)

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
        self._emit("val" if split == "train" else "train", tokens)

    def _better_candidate(self, split: str, h: int) -> bool:
        """Smallest-hash train document, or largest-hash validation document: the closest to the threshold."""
        assert self._held is not None
        return h < self._held[1] if split == "train" else h > self._held[1]

    def _release(self) -> None:
        if self._held is not None:
            split, _, tokens = self._held
            self._held = None
            self._emit(split, tokens)

    def _emit(self, split: str, tokens: np.ndarray) -> None:
        self._emit_fn(split, tokens)
        self.docs[split] += 1
