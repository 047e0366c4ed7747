"""Memory-mapped token dataset and the train / validation batch loaders.

``TokenDataset.open`` checks what it can without reading the tokens (the index,
its fingerprint, every shard's header and file size) before any model is
built: O(number of shards), whatever the corpus size. The full content check
(every shard's sha256 and largest token id) is :mod:`albor.data.verify`'s, run
by ``albor verify-data`` and, in a run, in the background during the first
steps (docs/data-verification.md). Until it has passed, every batch is checked
against the vocabulary as it is read, so a corrupt id never reaches the
embedding (on a GPU an out-of-range id is a device-side assert, not an
exception). Samples are non-overlapping windows of ``seq_length + 1`` tokens over
the concatenation of a split's shards, in index order; a window may cross a
shard boundary (documents are already separated by EOS, so a boundary is just
another document edge and no tokens are wasted). Leftover tokens after the
last whole window are not used.

Rank/world are plain integers: this module never talks to other processes.
Every rank computes the same permutation from (seed, data_epoch) and takes
its own contiguous slice of each global batch.

``prefetch``: each loader reads its next batch on a background thread while
the caller computes on the current one (torch's kernels release the GIL),
into pinned memory with ``pin_memory`` so the step's
``.to(device, non_blocking=True)`` does not wait for the host. The batches and
their order are the same either way, and a train loader's cursor counts the
batches handed out, never the one read ahead: a checkpoint taken with a batch
read ahead resumes at that batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from albor.data.shards import REGENERATE, SPLITS, ShardInfo, dataset_fingerprint, index_path, open_tokens
from albor.data.shards import read_header, read_index
from albor.data.tokenizer_match import check_shipped_tokenizer
from albor.errors import ConfigError, DataError


@dataclass(frozen=True, eq=False)
class Split:
    """A read-only view over one split's shards, concatenated."""

    name: str
    arrays: tuple[np.ndarray, ...]
    fingerprint: str  # of the whole dataset, so a loader cursor can name its data
    starts: np.ndarray  # (S + 1,) cumulative token offsets of the shards
    names: tuple[str, ...] = ()  # the shards' file names, for errors
    vocab_size: int | None = None  # every id read must be below it (None: not checked)

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def num_windows(self, seq_length: int) -> int:
        return self.num_tokens // (seq_length + 1)

    def window(self, i: int, seq_length: int) -> np.ndarray:
        """Tokens [i*(T+1), (i+1)*(T+1)) of the concatenated split, as int64."""
        n = seq_length + 1
        lo, hi = i * n, (i + 1) * n
        assert 0 <= i and hi <= self.num_tokens, (i, seq_length, self.num_tokens)
        s = int(np.searchsorted(self.starts, lo, side="right")) - 1
        out = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            a = self.arrays[s]
            off = lo + filled - int(self.starts[s])
            take = min(n - filled, a.shape[0] - off)
            out[filled : filled + take] = a[off : off + take]
            filled += take
            s += 1
        return out

    def batch(self, indices: np.ndarray, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = np.stack([self.window(int(i), seq_length) for i in indices])  # (B, T + 1)
        if self.vocab_size is not None and w.size and int(w.max()) >= self.vocab_size:
            self._refuse(w, indices, seq_length)
        t = torch.from_numpy(w)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T), (B, T)

    def _refuse(self, w: np.ndarray, indices: np.ndarray, seq_length: int) -> None:
        """DataError naming the shard and token of the first id in ``w`` the model cannot embed."""
        row, col = (int(v) for v in np.argwhere(w >= self.vocab_size)[0])
        at = int(indices[row]) * (seq_length + 1) + col  # in the concatenated split
        s = int(np.searchsorted(self.starts, at, side="right")) - 1
        name = self.names[s] if s < len(self.names) else f"{self.name} shard {s}"
        raise DataError(
            f"shard {name} holds token id {int(w[row, col])} at token {at - int(self.starts[s])}, not below the model's "
            f"vocab_size {self.vocab_size}: the shard is corrupt or was made with another tokenizer; run "
            f"`albor verify-data` on the dataset, and restore the shard or {REGENERATE}"
        )


class TokenDataset:
    """An ``index.json`` and its shards, validated at open."""

    def __init__(self, fingerprint: str, splits: dict[str, Split], *, index_path: Path | None = None,
                 shard_names: tuple[str, ...] = ()):
        self.fingerprint = fingerprint
        self._splits = splits
        self.index_path = index_path  # what albor.data.verify checks in full
        self.shard_names = shard_names  # every shard, in index.json's order

    def split(self, name: str) -> Split:
        if name not in self._splits:
            raise ConfigError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        return self._splits[name]

    @classmethod
    def open(cls, dataset: str | Path, *, vocab_size: int) -> TokenDataset:
        """Open an index.json (or its directory) for a model with ``vocab_size``; DataError if unusable.

        Reads the index and each shard's 32-byte header and size, never the tokens: the shards
        are memory-mapped, and their sha256 and largest id are checked by albor.data.verify.
        """
        path = index_path(dataset)
        index = read_index(path)
        if index["vocab_size"] > vocab_size:
            raise DataError(
                f"dataset {path} was tokenized with vocab_size {index['vocab_size']} but the model has "
                f"vocab_size {vocab_size}; set the model's vocab_size to at least {index['vocab_size']} "
                "or re-tokenize with a matching tokenizer"
            )
        if not 0 <= index["eos_id"] < index["vocab_size"]:
            raise DataError(f"index {path}: eos_id {index['eos_id']} is outside the vocabulary; {REGENERATE}")
        check_shipped_tokenizer(path, index)
        infos: list[ShardInfo] = []
        arrays: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        names: dict[str, list[str]] = {s: [] for s in SPLITS}
        for entry in index["shards"]:
            shard_path = path.parent / entry["name"]
            if not shard_path.is_file():
                raise DataError(f"shard {shard_path} listed in {path} is missing; restore it or {REGENERATE}")
            try:
                header = read_header(shard_path)  # magic, version, dtype, and the size its count implies
                tokens = open_tokens(shard_path, header)
            except OSError as e:
                raise DataError(
                    f"shard {shard_path} cannot be read ({e.strerror or e}); check its permissions and the disk"
                ) from None
            if header.count != entry["tokens"]:
                raise DataError(
                    f"shard {shard_path} holds {header.count} tokens but {path} lists {entry['tokens']}; {REGENERATE}"
                )
            infos.append(ShardInfo(entry["name"], entry["split"], entry["tokens"], entry["sha256"]))
            arrays[entry["split"]].append(tokens)
            names[entry["split"]].append(entry["name"])
        if dataset_fingerprint(infos, index["tokenizer_sha256"], index["format_version"]) != index["fingerprint"]:
            raise DataError(f"index {path} has a fingerprint that does not match its shards; {REGENERATE}")
        splits = {}
        for name in SPLITS:
            counts = [a.shape[0] for a in arrays[name]]
            starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
            splits[name] = Split(name, tuple(arrays[name]), index["fingerprint"], starts, tuple(names[name]), vocab_size)
        return cls(index["fingerprint"], splits, index_path=path, shard_names=tuple(e["name"] for e in index["shards"]))


def index_vocab_size(dataset: str | Path) -> int:
    """The vocabulary size an index was tokenized with (the model's vocab follows it)."""
    return int(read_index(index_path(dataset))["vocab_size"])


def _check_layout(micro_batch: int, seq_length: int, rank: int, world_size: int) -> None:
    if micro_batch < 1 or seq_length < 1:
        raise ConfigError(f"micro_batch {micro_batch} and seq_length {seq_length} must be positive")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in [0, world_size {world_size})")


def rank_slice(global_batch: np.ndarray, micro_batch: int, rank: int) -> np.ndarray:
    """Rank ``rank``'s contiguous share of a global batch of micro_batch * world_size windows."""
    return global_batch[rank * micro_batch : (rank + 1) * micro_batch]


def epoch_permutation(num_windows: int, seed: int, data_epoch: int) -> np.ndarray:
    """The window order of one data epoch: same on every rank, new for every epoch."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, data_epoch])))
    return rng.permutation(num_windows)


Batch = tuple[torch.Tensor, torch.Tensor]


class _Reader:
    """Reads batches, on one background thread when prefetching, into pinned memory when asked."""

    def __init__(self, *, prefetch: bool, pin_memory: bool) -> None:
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self._pool: ThreadPoolExecutor | None = None

    def read(self, read: Callable[[], Batch]) -> Batch:
        """``read()`` now, on the calling thread."""
        x, y = read()
        return (x.pin_memory(), y.pin_memory()) if self.pin_memory else (x, y)

    def ahead(self, read: Callable[[], Batch]) -> Future[Batch]:
        """``read()`` on the background thread; an error it raises is raised by the future's ``result()``."""
        if self._pool is None:  # one thread per loader, started on first use
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="albor-prefetch")
        return self._pool.submit(self.read, read)


class TrainLoader:
    """Shuffled, rank-sharded training batches with a resumable cursor (gate EXHAUST).

    ``prefetch``: after handing out a batch, read the next one in the background
    (module docstring); ``pin_memory``: batches in pinned host memory (for a GPU).
    """

    def __init__(self, split: Split, *, micro_batch: int, seq_length: int, rank: int, world_size: int, seed: int,
                 prefetch: bool = False, pin_memory: bool = False):
        _check_layout(micro_batch, seq_length, rank, world_size)
        self.split = split
        self.micro_batch, self.seq_length = micro_batch, seq_length
        self.rank, self.world_size = rank, world_size
        self.global_windows = micro_batch * world_size
        self.num_windows = split.num_windows(seq_length)
        self.batches_per_epoch = self.num_windows // self.global_windows
        if self.batches_per_epoch == 0:
            need = self.global_windows * (seq_length + 1)
            raise DataError(
                f"the {split.name} split has {split.num_tokens} tokens, fewer than one global batch needs "
                f"({micro_batch} micro-batch x {world_size} ranks x {seq_length + 1} tokens = {need}); "
                "use a smaller --batch-size or --seq-length, or more data"
            )
        self.seed = seed
        self.data_epoch = 0
        self.position = 0  # global batches handed out from this data epoch (not counting one read ahead)
        self._perm = epoch_permutation(self.num_windows, seed, 0)
        self._reader = _Reader(prefetch=prefetch, pin_memory=pin_memory)
        # The batch being read ahead: ((data_epoch, position) it is for, that epoch's order, its future).
        self._ahead: tuple[tuple[int, int], np.ndarray, Future[Batch]] | None = None

    @property
    def tokens_per_global_batch(self) -> int:
        return self.global_windows * self.seq_length

    def _following(self, data_epoch: int, position: int) -> tuple[int, int]:
        """(data_epoch, position) of the batch after ``position`` batches of ``data_epoch`` were handed out."""
        # Fewer windows left than a global batch: a new epoch with a new order, never a padded or repeated batch.
        return (data_epoch + 1, 0) if position >= self.batches_per_epoch else (data_epoch, position)

    def _read_fn(self, perm: np.ndarray, position: int) -> Callable[[], Batch]:
        g = perm[position * self.global_windows : (position + 1) * self.global_windows]
        return lambda: self.split.batch(rank_slice(g, self.micro_batch, self.rank), self.seq_length)

    def _perm_for(self, data_epoch: int) -> np.ndarray:
        return self._perm if data_epoch == self.data_epoch else epoch_permutation(self.num_windows, self.seed, data_epoch)

    def next_batch(self) -> Batch:
        """(inputs, targets), each a LongTensor (micro_batch, seq_length)."""
        at = self._following(self.data_epoch, self.position)
        ahead, self._ahead = self._ahead, None
        hit = ahead is not None and ahead[0] == at  # else nothing was read ahead, or the cursor was loaded since
        self._perm = ahead[1] if hit else self._perm_for(at[0])
        self.data_epoch, self.position = at[0], at[1] + 1  # before the read: a batch that fails is still spent
        batch = ahead[2].result() if hit else self._reader.read(self._read_fn(self._perm, at[1]))
        if self._reader.prefetch:
            following = self._following(self.data_epoch, self.position)
            perm = self._perm_for(following[0])
            self._ahead = (following, perm, self._reader.ahead(self._read_fn(perm, following[1])))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "data_epoch": self.data_epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_length": self.seq_length,
            "global_windows": self.global_windows,
            "num_windows": self.num_windows,
            "fingerprint": self.split.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the cursor; the saved seed wins, since it defines the order being resumed."""
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise DataError(
                f"the checkpoint's data cursor lacks {', '.join(missing)}; resume from a checkpoint albor wrote, "
                "or start a new run"
            )
        if state["fingerprint"] != self.split.fingerprint:
            raise DataError(
                "the checkpoint's data cursor was saved on another dataset (fingerprint "
                f"{str(state['fingerprint'])[:16]}…, this one {self.split.fingerprint[:16]}…); resume with the "
                "dataset the run started on, or start a new run"
            )
        for key, mine in (("seq_length", self.seq_length), ("global_windows", self.global_windows),
                          ("num_windows", self.num_windows)):
            if state[key] != mine:
                raise ConfigError(
                    f"cannot resume the data order exactly: the checkpoint has {key} {state[key]}, this run "
                    f"{mine}; keep --seq-length and the global batch (micro-batch x gradient accumulation x world size) of the original run"
                )
        if not 0 <= int(state["position"]) <= self.batches_per_epoch or int(state["data_epoch"]) < 0:
            raise DataError(f"the checkpoint's data cursor {state} is out of range for this dataset")
        self.seed = int(state["seed"])
        self.data_epoch = int(state["data_epoch"])
        self.position = int(state["position"])
        self._perm = epoch_permutation(self.num_windows, self.seed, self.data_epoch)
        self._ahead = None  # read for the old cursor (and maybe the old seed): dropped, never handed out


class ValidationLoader:
    """The same validation batches every time, in window order, each rank a disjoint slice.

    ``prefetch`` and ``pin_memory`` as for :class:`TrainLoader`.
    """

    def __init__(self, split: Split, *, micro_batch: int, seq_length: int, rank: int, world_size: int,
                 max_batches: int | None = None, prefetch: bool = False, pin_memory: bool = False):
        _check_layout(micro_batch, seq_length, rank, world_size)
        if max_batches is not None and max_batches < 1:
            raise ConfigError(f"max_batches {max_batches} must be positive or None")
        self.split = split
        self.micro_batch, self.seq_length, self.rank = micro_batch, seq_length, rank
        self.global_windows = micro_batch * world_size
        available = split.num_windows(seq_length) // self.global_windows
        if available == 0:
            need = self.global_windows * (seq_length + 1)
            raise DataError(
                f"the {split.name} split has {split.num_tokens} tokens, fewer than one validation batch needs "
                f"({micro_batch} x {world_size} ranks x {seq_length + 1} tokens = {need}); raise "
                "--val-fraction in prepare-data, or use a smaller --batch-size or --seq-length"
            )
        self.num_batches = available if max_batches is None else min(available, max_batches)
        self._reader = _Reader(prefetch=prefetch, pin_memory=pin_memory)

    def _read_fn(self, b: int) -> Callable[[], Batch]:
        g = np.arange(b * self.global_windows, (b + 1) * self.global_windows)
        return lambda: self.split.batch(rank_slice(g, self.micro_batch, self.rank), self.seq_length)

    def __iter__(self) -> Iterator[Batch]:
        if not self._reader.prefetch:
            for b in range(self.num_batches):
                yield self._reader.read(self._read_fn(b))
            return
        ahead = self._reader.ahead(self._read_fn(0))
        for b in range(self.num_batches):
            batch = ahead.result()
            if b + 1 < self.num_batches:
                ahead = self._reader.ahead(self._read_fn(b + 1))
            yield batch
