"""Shard format, open-time validation and the train / validation loaders."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from albor.data.loader import Split, TokenDataset, TrainLoader, ValidationLoader, rank_slice
from albor.data.shards import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    ShardHeader,
    ShardInfo,
    ShardWriter,
    build_index,
    open_tokens,
    read_header,
    write_index,
)
from albor.data.tokenizer import tokenizer_sha256
from albor.errors import ConfigError, DataError, ExitCode

VOCAB = 65536


def make_dataset(directory: Path, train: np.ndarray, val: np.ndarray, *, vocab: int = VOCAB,
                 shard_tokens: int = 1000) -> Path:
    """A dataset whose token i of a split is ``train[i]`` / ``val[i]``, across several shards."""
    directory.mkdir(parents=True, exist_ok=True)
    code = 1 if vocab <= 65536 else 2
    shards = []
    for split, tokens in (("train", train), ("val", val)):
        w = ShardWriter(directory, split, dtype_code=code, shard_tokens=shard_tokens)
        for part in np.array_split(tokens, 3):  # several writes, so writes straddle shard caps
            w.write(part)
        shards += w.close()
    return write_index(directory, build_index(shards, vocab_size=vocab, eos_id=0, tokenizer_sha="t" * 64))


def arange_dataset(tmp_path: Path, n_train: int = 5000, n_val: int = 2000, **kw) -> Path:
    return make_dataset(tmp_path / "ds", np.arange(n_train) % VOCAB, (np.arange(n_val) + 40000) % VOCAB, **kw)


def window_ids(x: torch.Tensor, seq_length: int) -> list[int]:
    """With arange tokens, window i starts at token i*(T+1): recover i from the first input."""
    return [int(v) // (seq_length + 1) for v in x[:, 0]]


# ---- shard format -------------------------------------------------------------------------------


def test_header_round_trip(tmp_path: Path) -> None:
    h = ShardHeader(FORMAT_VERSION, 1, 12345)
    raw = h.pack()
    assert len(raw) == HEADER_SIZE == 32 and raw[:8] == MAGIC
    assert struct.unpack("<8sIIQ8x", raw) == (MAGIC, FORMAT_VERSION, 1, 12345)
    p = tmp_path / "s.bin"
    p.write_bytes(raw + np.arange(12345, dtype="<u2").tobytes())
    assert read_header(p) == h
    assert np.array_equal(open_tokens(p, h), np.arange(12345))


@pytest.mark.parametrize("vocab,dtype", [(65536, "uint16"), (65537, "uint32")])
def test_writer_splits_at_cap_and_picks_dtype(tmp_path: Path, vocab: int, dtype: str) -> None:
    tokens = np.arange(2500) * (vocab // 2500)
    index_path = make_dataset(tmp_path / "ds", tokens, tokens[:10], vocab=vocab, shard_tokens=1000)
    index = json.loads(index_path.read_text())
    assert index["dtype"] == dtype
    train = [s for s in index["shards"] if s["split"] == "train"]
    assert [s["tokens"] for s in train] == [1000, 1000, 500]
    assert [s["name"] for s in train] == ["train-00000.bin", "train-00001.bin", "train-00002.bin"]
    ds = TokenDataset.open(index_path, vocab_size=vocab)
    assert np.array_equal(np.concatenate(ds.split("train").arrays), tokens)
    assert not list((tmp_path / "ds").glob(".*tmp*"))


# ---- open-time validation -------------------------------------------------------------------------


def _open_error(path: Path, vocab: int = VOCAB) -> DataError:
    with pytest.raises(DataError) as info:
        TokenDataset.open(path, vocab_size=vocab)
    assert info.value.exit_code == ExitCode.DATA == 3
    return info.value


def test_opens_clean_dataset(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    ds = TokenDataset.open(p.parent, vocab_size=VOCAB)  # a directory works too
    index = json.loads(p.read_text())
    assert ds.fingerprint == index["fingerprint"]
    assert ds.split("train").num_tokens == 5000 and ds.split("val").num_tokens == 2000
    assert isinstance(ds.split("train").arrays[0], np.memmap)


def test_missing_index(tmp_path: Path) -> None:
    err = _open_error(tmp_path / "index.json")
    assert "index.json" in str(err) and "prepare-data" in str(err)


def test_missing_shard(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    (p.parent / "val-00001.bin").unlink()
    err = _open_error(p)
    assert "val-00001.bin" in str(err) and "missing" in str(err)


def test_wrong_magic(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    shard = p.parent / "train-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[:8] = b"NOTALBOR"
    shard.write_bytes(bytes(raw))
    err = _open_error(p)
    assert "train-00001.bin" in str(err) and "magic" in str(err) and "prepare-data" in str(err)


def test_unknown_version(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    shard = p.parent / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[8:12] = struct.pack("<I", 99)
    shard.write_bytes(bytes(raw))
    err = _open_error(p)
    assert "train-00000.bin" in str(err) and "version 99" in str(err)


def test_truncated_shard(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    shard = p.parent / "train-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-7])
    err = _open_error(p)
    assert "train-00002.bin" in str(err) and "truncated" in str(err)


def test_open_reads_headers_only_and_leaves_content_to_verify(tmp_path: Path) -> None:
    """A changed token is not open's to find (it reads no tokens): albor.data.verify finds it."""
    p = arange_dataset(tmp_path)
    shard = p.parent / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[HEADER_SIZE + 10] ^= 0x01  # same size, same header, one token changed
    shard.write_bytes(bytes(raw))
    TokenDataset.open(p, vocab_size=VOCAB)
    from albor.data.verify import verify_dataset

    (problem,) = verify_dataset(p).problems
    assert problem.name == "train-00000.bin" and "sha256" in problem.message


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="reads /proc/self/io (Linux)")
def test_open_does_not_read_the_tokens_of_a_large_shard(tmp_path: Path) -> None:
    """Start-up is O(number of shards): a 1 GiB shard (sparse, so cheap to make) costs a header read."""
    ds = tmp_path / "ds"
    ds.mkdir()
    count = 1 << 29  # uint16: 1 GiB of tokens
    with open(ds / "train-00000.bin", "wb") as f:
        f.write(ShardHeader(FORMAT_VERSION, 1, count).pack())
        f.truncate(HEADER_SIZE + 2 * count)
    val = ShardWriter(ds, "val", dtype_code=1)
    val.write(np.arange(100))
    infos = [ShardInfo("train-00000.bin", "train", count, "0" * 64), *val.close()]  # a sha nobody computes here
    p = write_index(ds, build_index(infos, vocab_size=VOCAB, eos_id=0, tokenizer_sha="t" * 64))
    before = _bytes_read()
    dataset = TokenDataset.open(p, vocab_size=VOCAB)
    assert _bytes_read() - before < 1 << 20  # the index and two headers, not the 1 GiB
    assert dataset.split("train").num_tokens == count
    assert dataset.shard_names == ("train-00000.bin", "val-00000.bin")


def test_token_ids_beyond_model_vocab_are_refused_in_the_batch(tmp_path: Path) -> None:
    p = make_dataset(tmp_path / "ds", np.array([1, 2, 3, 4999, 5, 6, 7, 8, 9]), np.array([1, 2]), vocab=5000,
                     shard_tokens=4)
    TokenDataset.open(p, vocab_size=5000)
    # The index claims a 4096 vocab but a shard holds a larger id: open cannot see it (it reads no tokens),
    # the batch that holds it refuses it before the model sees it, and verify names it.
    index = json.loads(p.read_text())
    index["vocab_size"] = 4096
    p.write_text(json.dumps(index))
    split = TokenDataset.open(p, vocab_size=4096).split("train")
    assert split.batch(np.array([1]), 3)[0].tolist() == [[5, 6, 7]]  # tokens 4..7: shard 1 holds only ids < 4096
    with pytest.raises(DataError) as info:
        split.batch(np.array([1, 0]), 3)  # window 0 = tokens 0..3, with 4999 at token 3 of train-00000.bin
    assert info.value.exit_code == ExitCode.DATA
    assert "train-00000.bin" in str(info.value) and "4999 at token 3" in str(info.value) and "4096" in str(info.value)
    from albor.data.verify import verify_dataset

    (problem,) = verify_dataset(p, vocab_size=4096).problems
    assert problem.name == "train-00000.bin" and "4999" in problem.message and "4096" in problem.message


def test_index_vocab_larger_than_model(tmp_path: Path) -> None:
    p = make_dataset(tmp_path / "ds", np.array([1, 2, 3]), np.array([1, 2]), vocab=50257)
    err = _open_error(p, vocab=4096)
    assert "50257" in str(err) and "4096" in str(err)


@pytest.mark.parametrize("mutate", [
    lambda i: i.update(format_version=7),
    lambda i: i.pop("fingerprint"),
    lambda i: i.update(fingerprint="0" * 64),
    lambda i: i["shards"][0].update(tokens=5),
    lambda i: i["shards"][0].update(name="../etc/passwd"),
])
def test_bad_index(tmp_path: Path, mutate) -> None:
    p = arange_dataset(tmp_path)
    index = json.loads(p.read_text())
    mutate(index)
    p.write_text(json.dumps(index))
    err = _open_error(p)
    assert "index.json" in str(err)


def test_index_not_json(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    p.write_text("{")
    assert "not valid JSON" in str(_open_error(p))


# ---- windows --------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), seq_length=st.integers(1, 30))
def test_windows_cross_shards_exactly(sizes: list[int], seq_length: int) -> None:
    total = sum(sizes)
    full = np.arange(total)
    arrays = tuple(np.split(full, np.cumsum(sizes)[:-1]))
    split = Split("train", arrays, "f", np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
    n = seq_length + 1
    assert split.num_windows(seq_length) == total // n
    for i in range(split.num_windows(seq_length)):
        assert np.array_equal(split.window(i, seq_length), full[i * n : (i + 1) * n])


# ---- train loader ---------------------------------------------------------------------------------


def _loader(p: Path, **kw) -> TrainLoader:
    args = dict(micro_batch=2, seq_length=15, rank=0, world_size=1, seed=42) | kw
    return TrainLoader(TokenDataset.open(p, vocab_size=VOCAB).split("train"), **args)


def test_batch_shapes_and_shift(tmp_path: Path) -> None:
    tl = _loader(arange_dataset(tmp_path))
    x, y = tl.next_batch()
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (2, 15)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert tl.tokens_per_global_batch == 2 * 15


def test_deterministic_order(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    a, b, c = _loader(p), _loader(p), _loader(p, seed=43)
    batches_a = [a.next_batch()[0] for _ in range(10)]
    batches_b = [b.next_batch()[0] for _ in range(10)]
    batches_c = [c.next_batch()[0] for _ in range(10)]
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    assert not all(torch.equal(x, y) for x, y in zip(batches_a, batches_c))
    # A shuffled order, not the file order.
    ids = [w for x in batches_a for w in window_ids(x, 15)]
    assert ids != sorted(ids)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_disjoint_and_cover_global_batch(tmp_path: Path, world_size: int) -> None:
    p = arange_dataset(tmp_path)
    loaders = [_loader(p, rank=r, world_size=world_size, micro_batch=3) for r in range(world_size)]
    single = _loader(p, micro_batch=3 * world_size)  # the same global batches, one rank
    for _ in range(5):
        parts = [window_ids(ld.next_batch()[0], 15) for ld in loaders]
        flat = [w for part in parts for w in part]
        assert len(set(flat)) == len(flat) == 3 * world_size
        assert flat == window_ids(single.next_batch()[0], 15)


def test_cursor_resume_gives_identical_batches(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path, n_train=800)  # 50 windows, 25 batches per data epoch
    a = _loader(p)
    for _ in range(20):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON / checkpoint round trip
    assert {"data_epoch", "position", "seed"} <= state.keys()
    expected = [a.next_batch() for _ in range(12)]  # crosses into data epoch 1
    assert a.data_epoch == 1
    b = _loader(p, seed=7)  # the saved seed wins
    b.load_state_dict(state)
    for (x, y), (bx, by) in zip(expected, (b.next_batch() for _ in range(12))):
        assert torch.equal(x, bx) and torch.equal(y, by)
    assert b.state_dict() == a.state_dict()


def test_resume_rejects_other_dataset_or_shape(tmp_path: Path) -> None:
    a = _loader(arange_dataset(tmp_path))
    state = a.state_dict()
    other = make_dataset(tmp_path / "other", np.arange(5000) + 1, np.arange(100))
    with pytest.raises(DataError, match="another dataset"):
        _loader(other).load_state_dict(state)
    with pytest.raises(ConfigError, match="seq_length"):
        _loader(arange_dataset(tmp_path), seq_length=31).load_state_dict(state)
    with pytest.raises(DataError, match="lacks fingerprint"):
        _loader(arange_dataset(tmp_path)).load_state_dict({k: v for k, v in state.items() if k != "fingerprint"})


def test_data_epoch_rollover_new_order_real_tokens(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path, n_train=16 * 21 + 5)  # 21 windows, 10 batches of 2, 1 window spare
    tl = _loader(p)
    assert tl.batches_per_epoch == 10
    epochs: list[list[int]] = [[], []]
    for _ in range(20):
        x, y = tl.next_batch()
        ids = window_ids(x, 15)
        for row, w in zip(x, ids):  # real tokens of window w, never zeros or repeats
            assert torch.equal(row, torch.arange(w * 16, w * 16 + 15))
        epochs[tl.data_epoch] += ids
    assert tl.data_epoch == 1
    # Each data epoch sees 20 distinct windows of the 21; a new order each epoch.
    assert len(set(epochs[0])) == len(set(epochs[1])) == 20
    assert epochs[0] != epochs[1]
    tl.next_batch()
    assert tl.data_epoch == 2 and tl.state_dict()["position"] == 1


def test_corpus_too_small(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path, n_train=100)
    with pytest.raises(DataError) as info:
        _loader(p, micro_batch=4, seq_length=15, world_size=2)
    msg = str(info.value)
    assert info.value.exit_code == 3
    assert "100 tokens" in msg and "128" in msg and "--batch-size" in msg and "--seq-length" in msg


def test_bad_rank(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        _loader(arange_dataset(tmp_path), rank=2, world_size=2)


@settings(max_examples=100, deadline=None)
@given(micro_batch=st.integers(1, 8), world_size=st.integers(1, 8), data=st.data())
def test_rank_slices_partition_the_global_batch(micro_batch: int, world_size: int, data) -> None:
    g = np.array(data.draw(st.permutations(range(micro_batch * world_size))))
    parts = [rank_slice(g, micro_batch, r) for r in range(world_size)]
    assert all(len(p) == micro_batch for p in parts)
    assert np.array_equal(np.concatenate(parts), g)


# ---- validation loader ----------------------------------------------------------------------------


def test_validation_same_every_epoch_and_rank_disjoint(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path)
    val = TokenDataset.open(p, vocab_size=VOCAB).split("val")
    loaders = [ValidationLoader(val, micro_batch=2, seq_length=15, rank=r, world_size=3, max_batches=None)
               for r in range(3)]
    assert loaders[0].num_batches == 2000 // 16 // 6 == 20
    first = [[x for x, _ in ld] for ld in loaders]
    second = [[x for x, _ in ld] for ld in loaders]
    assert all(torch.equal(a, b) for r in range(3) for a, b in zip(first[r], second[r]))
    seen = [w for r in range(3) for x in first[r] for w in window_ids(x - 40000, 15)]
    assert sorted(seen) == list(range(120))
    capped = ValidationLoader(val, micro_batch=2, seq_length=15, rank=0, world_size=3, max_batches=4)
    assert len(list(capped)) == 4


def test_validation_too_small(tmp_path: Path) -> None:
    p = arange_dataset(tmp_path, n_val=20)
    val = TokenDataset.open(p, vocab_size=VOCAB).split("val")
    with pytest.raises(DataError, match="--val-fraction") as info:
        ValidationLoader(val, micro_batch=2, seq_length=15, rank=0, world_size=1, max_batches=None)
    assert "20 tokens" in str(info.value)


# ---- the tokenizer a dataset ships --------------------------------------------------------------


def shipped_tokenizer_dataset(tmp_path: Path, tokenizer: str = "tokenizer") -> Path:
    """A dataset with its tokenizer inside, as ``prepare-data --builtin`` writes it; returns index.json."""
    from tokenizers import ByteLevelBPETokenizer

    ds = tmp_path / "ds"
    tok = ds / "tokenizer"
    tok.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["hello tokenizer world\n"] * 5, vocab_size=280, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    bpe.save_model(str(tok))
    sha = tokenizer_sha256(tok)
    shards = []
    for split in ("train", "val"):
        w = ShardWriter(ds, split, dtype_code=1)
        w.write(np.arange(50) % 280)
        shards += w.close()
    return write_index(ds, build_index(shards, vocab_size=280, eos_id=0, tokenizer_sha=sha, extra={"tokenizer": tokenizer}))


def test_shipped_tokenizer_unchanged_or_absent_opens(tmp_path: Path) -> None:
    import shutil

    p = shipped_tokenizer_dataset(tmp_path)
    TokenDataset.open(p, vocab_size=280)
    shutil.rmtree(p.parent / "tokenizer")  # a dataset copied without its tokenizer: the tokens are all a run needs
    TokenDataset.open(p, vocab_size=280)


@pytest.mark.parametrize("change,needle", [
    (lambda d: (d / "merges.txt").write_text((d / "merges.txt").read_text() + "h e\n"), "has sha256"),
    (lambda d: (d / "vocab.json").write_text((d / "vocab.json").read_text().replace('"h"', '"H"')), "has sha256"),
    (lambda d: (d / "merges.txt").unlink(), "merges.txt is missing"),
])
def test_shipped_tokenizer_changed_after_prepare_is_refused(tmp_path: Path, change, needle: str) -> None:
    """README: the tokenizer's sha256 in index.json is checked when a run opens a dataset."""
    p = shipped_tokenizer_dataset(tmp_path)
    tok = p.parent / "tokenizer"
    made_with = tokenizer_sha256(tok)
    change(tok)
    msg = str(_open_error(p, vocab=280))
    assert f"dataset {p}" in msg and needle in msg and made_with in msg and "prepare-data" in msg
    if needle == "has sha256":
        assert tokenizer_sha256(tok) in msg  # both shas


@pytest.mark.parametrize("name", ["/elsewhere/tok", "../tok", "."])
def test_a_tokenizer_outside_the_dataset_is_not_checked(tmp_path: Path, name: str) -> None:
    """Only a tokenizer shipped inside the dataset is compared; a path recorded from elsewhere may
    have been reused for another tokenizer since, which says nothing about these tokens."""
    p = shipped_tokenizer_dataset(tmp_path, tokenizer=name)
    (p.parent / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "tok").mkdir()
    TokenDataset.open(p, vocab_size=280)


def test_a_json_that_is_not_an_index(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"lr": 1}')
    msg = str(_open_error(tmp_path / "config.json"))
    assert "config.json is not an albor dataset index" in msg and "index.json" in msg and "regenerate" not in msg


def test_an_unreadable_shard_is_one_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = arange_dataset(tmp_path)

    def unreadable(path, header):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("albor.data.loader.open_tokens", unreadable)  # root reads any file: simulate the error
    msg = str(_open_error(p))
    assert "train-00000.bin cannot be read (Permission denied)" in msg and "permissions" in msg
    monkeypatch.setattr("albor.data.shards.open", lambda *a, **k: unreadable(a[0], None), raising=False)
    from albor.data.verify import verify_dataset

    problems = verify_dataset(p).problems  # the full check reports each unreadable shard, in index order
    assert [q.name for q in problems] == [f"train-0000{i}.bin" for i in range(5)] + [f"val-0000{i}.bin" for i in range(2)]
    assert "train-00000.bin: cannot be read (Permission denied)" in problems[0].message
