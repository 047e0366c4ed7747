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


def unit_summary(unit_split: UnitSplit, counts: ReadCounts) -> dict[str, Any]:
    """What the merge needs of a unit besides its tokens; JSON, so that a part's manifest can hold it."""
    return {"split": unit_split.to_json(), "read": counts.to_json()}


def summary_counts(summary: dict[str, Any]) -> ReadCounts:
    read = summary["read"]
    return ReadCounts(documents=read["documents"], empty=read["empty"], filtered=dict(read["filtered"]),
                      bad_records=read["bad_records"])


class SpillWriter:
    """Appends a unit's documents to its two token files; :meth:`abort` removes them."""

    def __init__(self, directory: Path, unit_id: int, dtype_code: int):
        self.dtype = DTYPES[dtype_code]
        self.paths = {split: spill_path(directory, unit_id, split) for split in SPLITS}
        self._files: dict[str, BinaryIO] = {}
        try:
            for split, path in self.paths.items():
                self._files[split] = open(path, "wb", buffering=_WRITE_BUFFER)
        except BaseException:
            self.abort()
            raise

    def write(self, split: str, tokens: np.ndarray) -> None:
        self._files[split].write(tokens.astype(self.dtype, copy=False).tobytes())

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
    """

    def __init__(self, directory: Path, unit_id: int, dtype_code: int, write: Callable[[str, np.ndarray], None]):
        self.dtype = DTYPES[dtype_code]
        self.paths = {split: spill_path(directory, unit_id, split) for split in SPLITS}
        self._write = write

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
                self._write(split, chunk)
                start += count

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        with open(self.paths[split], "rb") as f:
            f.seek(start * self.dtype.itemsize)
            tokens = np.fromfile(f, dtype=self.dtype, count=stop - start)
        if tokens.size != stop - start:
            raise DataError(f"{self.paths[split]} ends before token {stop}; prepare it again")
        return tokens

    def delete(self) -> None:
        for path in self.paths.values():
            path.unlink(missing_ok=True)
