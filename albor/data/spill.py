"""One corpus unit's tokens on disk, between the worker that tokenized it and the merge that writes shards.

A unit's worker writes two headerless files of tokens in the dataset's dtype,
``unit-0000042.train.tok`` and ``unit-0000042.val.tok`` (each split's
documents in corpus order, each ending with EOS), and returns a small summary
(:func:`unit_summary`) with the unit's :class:`~albor.data.split.UnitSplit`
and read counts. ``prepare-data`` merges them in a scratch directory and
deletes them as it goes; ``--part`` keeps them in its part directory, with
the summaries in the part's manifest, for ``--combine``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from albor.data.records import ReadCounts
from albor.data.shards import DTYPES, SPLITS
from albor.data.split import UnitSplit
from albor.errors import DataError

SPILL_RE = re.compile(r"^unit-\d{7}\.(train|val)\.tok$")
COPY_TOKENS = 4 << 20  # tokens per read while merging: bounds the merge's memory whatever the unit's size
_WRITE_BUFFER = 1 << 20


def spill_path(directory: Path, unit_id: int, split: str) -> Path:
    return directory / f"unit-{unit_id:07d}.{split}.tok"


def unit_summary(unit_split: UnitSplit, counts: ReadCounts, sha256: dict[str, str]) -> dict[str, Any]:
    """What the merge needs of a unit besides its tokens; JSON, so that a part's manifest can hold it.

    ``sha256`` is each spill file's (:meth:`SpillWriter.sha256`): ``--combine``
    checks a part's files against it as it copies them.
    """
    return {"split": unit_split.to_json(), "read": counts.to_json(), "sha256": dict(sha256)}


def summary_counts(summary: dict[str, Any]) -> ReadCounts:
    read = summary["read"]
    return ReadCounts(documents=read["documents"], empty=read["empty"], filtered=dict(read["filtered"]),
                      bad_records=read["bad_records"])


class SpillWriter:
    """Appends a unit's documents to its two token files, hashing them; :meth:`abort` removes them."""

    def __init__(self, directory: Path, unit_id: int, dtype_code: int):
        self.dtype = DTYPES[dtype_code]
        self.paths = {split: spill_path(directory, unit_id, split) for split in SPLITS}
        self._hashes = {split: hashlib.sha256() for split in SPLITS}
        self._files: dict[str, BinaryIO] = {}
        try:
            for split, path in self.paths.items():
                self._files[split] = open(path, "wb", buffering=_WRITE_BUFFER)
        except BaseException:
            self.abort()
            raise

    def write(self, split: str, tokens: np.ndarray) -> None:
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._hashes[split].update(data)
        self._files[split].write(data)

    def sha256(self) -> dict[str, str]:
        """Each split's file's sha256, of what was written so far."""
        return {split: h.hexdigest() for split, h in self._hashes.items()}

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        for path in self.paths.values():
            path.unlink(missing_ok=True)


class SpillReader:
    """A unit's token files as the merge reads them (:class:`~albor.data.split.UnitTokens`).

    ``copy`` hands the tokens to ``write(split, tokens)`` in bounded chunks.
    With ``sha256`` (the unit summary's), every token read is hashed on the
    way, and :meth:`check_sha256` then compares each file's hash: the merge
    reads each file once, in order, so the check costs no extra reading.
    """

    def __init__(self, directory: Path, unit_id: int, dtype_code: int, write: Callable[[str, np.ndarray], None],
                 sha256: dict[str, str] | None = None):
        self.dtype = DTYPES[dtype_code]
        self.paths = {split: spill_path(directory, unit_id, split) for split in SPLITS}
        self._write = write
        self._expected = sha256
        self._hashes = {split: hashlib.sha256() for split in SPLITS}
        self._hashed = {split: 0 for split in SPLITS}  # tokens [0, n) of each file went into its hash

    def check(self, tokens: dict[str, int], where: str) -> None:
        """DataError unless each token file holds exactly the tokens its summary counts."""
        for split, path in self.paths.items():
            expected = tokens[split] * self.dtype.itemsize
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise DataError(f"{path} is missing from {where}; prepare that part again") from None
            if size != expected:
                raise DataError(f"{path} has {size} bytes, {where} promises {expected}; prepare that part again")

    def copy(self, split: str, start: int, stop: int) -> None:
        with open(self.paths[split], "rb") as f:
            f.seek(start * self.dtype.itemsize)
            while start < stop:
                count = min(COPY_TOKENS, stop - start)
                chunk = np.fromfile(f, dtype=self.dtype, count=count)
                if chunk.size != count:  # the file changed under us since check()
                    raise DataError(f"{self.paths[split]} ends before token {start + count}; prepare it again")
                self._hash(split, start, chunk)
                self._write(split, chunk)
                start += count

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        with open(self.paths[split], "rb") as f:
            f.seek(start * self.dtype.itemsize)
            tokens = np.fromfile(f, dtype=self.dtype, count=stop - start)
        if tokens.size != stop - start:
            raise DataError(f"{self.paths[split]} ends before token {stop}; prepare it again")
        self._hash(split, start, tokens)
        return tokens

    def _hash(self, split: str, start: int, tokens: np.ndarray) -> None:
        """Add tokens ``[start, start + len(tokens))`` to the file's hash (what the merge skipped first)."""
        if self._expected is None:
            return
        end = start + tokens.size
        if start > self._hashed[split]:  # a gap the merge did not read (it reads every token, in order)
            self._hash_file(split, stop=start)
        if start <= self._hashed[split] < end:
            self._hashes[split].update(tokens[self._hashed[split] - start:].tobytes())
            self._hashed[split] = end

    def _hash_file(self, split: str, stop: int | None = None) -> None:
        with open(self.paths[split], "rb") as f:
            f.seek(self._hashed[split] * self.dtype.itemsize)
            while stop is None or self._hashed[split] < stop:
                count = COPY_TOKENS if stop is None else min(COPY_TOKENS, stop - self._hashed[split])
                chunk = f.read(count * self.dtype.itemsize)
                if not chunk:
                    break
                self._hashes[split].update(chunk)
                self._hashed[split] += len(chunk) // self.dtype.itemsize

    def check_sha256(self, where: str) -> None:
        """DataError unless each file, read in full, has the sha256 its summary recorded (given at construction)."""
        if self._expected is None:
            return
        for split, path in self.paths.items():
            self._hash_file(split)  # what the merge did not read: none, normally
            actual = self._hashes[split].hexdigest()
            if actual != self._expected[split]:
                raise DataError(f"{path} has sha256 {actual}, but {where} recorded {self._expected[split]}: the file "
                                "changed after it was written (damaged in a copy?); prepare that part again")

    def delete(self) -> None:
        for path in self.paths.values():
            path.unlink(missing_ok=True)
