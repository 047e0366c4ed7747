"""The ``prefetch`` lever (albor.data.loader): the next batch read in the background, same batches, exact cursor."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from albor.data.loader import Split, TrainLoader, ValidationLoader, epoch_permutation
from albor.distributed.process_group import DistEnv
from albor.distributed.step import DeepSpeedStep
from albor.errors import DataError

SEQ, MICRO = 7, 2
N_WINDOWS = 23  # 11 global batches of 2 per data epoch, one window spare


def arange_split(n_windows: int = N_WINDOWS, vocab_size: int | None = None, bad_window: int | None = None) -> Split:
    """Token i is i % 60000; window w holds tokens w*(SEQ+1).., so a batch names its windows."""
    tokens = (np.arange(n_windows * (SEQ + 1)) % 60000).astype(np.uint16)
    if bad_window is not None:
        tokens[bad_window * (SEQ + 1) + 3] = 65000  # above vocab_size: the read of that window raises
    return Split("train", (tokens,), "f" * 64, np.array([0, tokens.shape[0]], dtype=np.int64), ("s0.bin",), vocab_size)


def loader(split: Split, *, prefetch: bool, seed: int = 3, rank: int = 0, world_size: int = 1) -> TrainLoader:
    return TrainLoader(split, micro_batch=MICRO, seq_length=SEQ, rank=rank, world_size=world_size, seed=seed,
                       prefetch=prefetch)


def windows(x: torch.Tensor) -> list[int]:
    return [int(v) // (SEQ + 1) for v in x[:, 0]]


def expected_windows(n_batches: int, seed: int = 3) -> list[list[int]]:
    """The windows of the first ``n_batches`` batches, from the epoch permutations alone (one rank)."""
    per_epoch = N_WINDOWS // MICRO
    out = []
    for b in range(n_batches):
        epoch, pos = divmod(b, per_epoch)
        out.append([int(w) for w in epoch_permutation(N_WINDOWS, seed, epoch)[pos * MICRO : (pos + 1) * MICRO]])
    return out


def test_same_batches_and_cursor_with_and_without_prefetch():
    split = arange_split()
    on, off = loader(split, prefetch=True), loader(split, prefetch=False)
    n = 3 * on.batches_per_epoch + 2  # through two data-epoch boundaries
    for want in expected_windows(n):
        (x_on, y_on), (x_off, y_off) = on.next_batch(), off.next_batch()
        assert windows(x_on) == windows(x_off) == want
        assert torch.equal(x_on, x_off) and torch.equal(y_on, y_off)
        assert on.state_dict() == off.state_dict()  # the batch read ahead is never counted
    assert on.data_epoch == 3


def test_the_next_batch_is_read_on_the_background_thread():
    split = arange_split()
    readers: list[str] = []
    read = split.batch

    def recording(indices, seq_length):
        readers.append(threading.current_thread().name)
        return read(indices, seq_length)

    object.__setattr__(split, "batch", recording)  # a frozen dataclass: this instance only
    tl = loader(split, prefetch=True)
    for _ in range(4):
        tl.next_batch()
    # The first batch is read when asked for; each later one was read ahead, off the caller's thread.
    # (The fifth read, of the batch after, may still be running.)
    assert readers[0] == threading.current_thread().name
    assert len(readers) >= 4 and all(name.startswith("albor-prefetch") for name in readers[1:4])


@pytest.mark.parametrize("taken", [1, 5, 11, 12])  # mid epoch, the last batch of epoch 0 (read ahead: epoch 1's first)
def test_a_resume_after_prefetch_neither_skips_nor_repeats_a_batch(taken):
    split = arange_split()
    first = loader(split, prefetch=True)
    seen = [windows(first.next_batch()[0]) for _ in range(taken)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it, with batch taken+1 read ahead
    assert state["data_epoch"] * first.batches_per_epoch + state["position"] == taken
    resumed = loader(split, prefetch=True, seed=99)  # the saved seed wins
    resumed.load_state_dict(state)
    seen += [windows(resumed.next_batch()[0]) for _ in range(6)]
    assert seen == expected_windows(taken + 6)


def test_loading_a_cursor_drops_the_batch_read_ahead_for_the_old_one():
    split = arange_split()
    tl = loader(split, prefetch=True, seed=99)
    for _ in range(3):
        tl.next_batch()  # batch 3 of seed 99's order is now read ahead
    saved = loader(split, prefetch=False)  # seed 3
    for _ in range(3):
        saved.next_batch()
    # The same position in another order: the batch read ahead is not the one to hand out.
    tl.load_state_dict(saved.state_dict())
    assert [windows(tl.next_batch()[0]) for _ in range(3)] == expected_windows(6)[3:]
    tl.load_state_dict(loader(split, prefetch=False).state_dict())  # back to the start, with batch 6 read ahead
    assert [windows(tl.next_batch()[0]) for _ in range(4)] == expected_windows(4)


def test_a_bad_batch_read_ahead_raises_only_when_it_is_handed_out():
    per_epoch = N_WINDOWS // MICRO
    bad = int(epoch_permutation(N_WINDOWS, 3, 0)[2 * MICRO])  # a window of batch 2
    tl = loader(arange_split(vocab_size=60000, bad_window=bad), prefetch=True)
    tl.next_batch()
    tl.next_batch()  # batch 2 is read ahead now, and fails in the background
    with pytest.raises(DataError, match="not below the model's vocab_size 60000"):
        tl.next_batch()
    assert tl.state_dict()["position"] == 3  # a failed batch is spent, as without prefetch
    assert windows(tl.next_batch()[0]) == expected_windows(4)[3]
    assert per_epoch > 4


def test_validation_batches_are_the_same_with_prefetch():
    split = arange_split()
    kw = dict(micro_batch=MICRO, seq_length=SEQ, rank=1, world_size=2, max_batches=4)
    on, off = ValidationLoader(split, prefetch=True, **kw), ValidationLoader(split, prefetch=False, **kw)
    a, b = list(on), list(off)
    assert len(a) == len(b) == 4
    assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))
    assert [windows(x) for x, _ in a] == [[4 * b + 2, 4 * b + 3] for b in range(4)]  # rank 1's half of each batch
    assert [windows(x) for x, _ in on] == [windows(x) for x, _ in a]  # and the same again next time


class _RecordingEngine:
    """Forward, backward and step of nothing: records each micro-batch's windows."""

    def __init__(self) -> None:
        self.windows: list[list[int]] = []
        self.weight = torch.zeros((), requires_grad=True)

    def __call__(self, inputs, hidden_only=False):
        self.windows.append(windows(inputs))
        return self.weight.expand(*inputs.shape, 256)  # logits over a vocabulary of 256 (every token id here)

    def backward(self, loss):
        pass

    def step(self):
        pass

    def was_step_applied(self):
        return True

    def get_global_grad_norm(self):
        return 1.0

    optimizer = type("Opt", (), {"param_groups": []})()


class _OneRank(DistEnv):
    def set_timeout(self, seconds: float) -> None:  # no process group here
        pass


class _NoGpu:
    def read(self) -> float:
        return 0.0


def _steps(tl: TrainLoader, first: int, count: int, accumulation: int) -> list[list[int]]:
    engine = _RecordingEngine()
    step = DeepSpeedStep(engine, tl, _OneRank(0, 1, 0, torch.device("cpu")), grad_accumulation=accumulation,
                         gpu=_NoGpu())
    for s in range(first, first + count):
        assert step(s, 1e-3).rank_error is None
    return engine.windows


@pytest.mark.parametrize("accumulation", [1, 3])
def test_the_step_function_resumes_a_prefetching_loader_at_the_next_unused_micro_batch(accumulation):
    """DeepSpeedStep over a prefetching loader, checkpointed after K steps and resumed in a new one."""
    split = arange_split()
    k, m = 4, 5
    reference = _steps(loader(split, prefetch=False), 0, k + m, accumulation)
    first = loader(split, prefetch=True)
    before = _steps(first, 0, k, accumulation)
    resumed = loader(split, prefetch=True)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    after = _steps(resumed, k, m, accumulation)
    assert before + after == reference == expected_windows((k + m) * accumulation)
