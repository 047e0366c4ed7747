"""Start-up on a 1 GiB dataset: the old full scan at open against the header-only open, and albor verify-data's MB/s.

Writes a dataset of random uint16 tokens with ShardWriter (prepare-data's shard writer, 64M-token
shards by default), then times, in this process:
  * before: what ``TokenDataset.open`` used to do on every rank, a full sha256 + largest-id scan of
    every shard, one after the other: exactly ``verify_dataset(workers=1)``;
  * after: ``TokenDataset.open`` as it is now (index, headers, sizes, memory maps);
  * ``verify_dataset`` (what ``albor verify-data`` and a run's background check do) on 1 thread and
    on every core.
The shards were just written, so they are in the page cache: these are hashing rates, not disk rates
(a cold disk makes the old scan slower still, and the ratio larger). The dataset is deleted at the end.

Usage: python benchmarks/bench_startup.py [--gib 1.0] [--shard-tokens 67108864] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from albor.data.loader import TokenDataset
from albor.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter, build_index, write_index
from albor.data.verify import default_workers, verify_dataset

VOCAB = 50257


def write_dataset(directory: Path, tokens: int, shard_tokens: int) -> Path:
    """``tokens`` random ids in train shards, plus a small val split; returns the index.json."""
    rng = np.random.default_rng(0)
    train = ShardWriter(directory, "train", dtype_code=1, shard_tokens=shard_tokens)
    left = tokens
    while left:
        n = min(left, 16 << 20)
        train.write(rng.integers(0, VOCAB, n, dtype=np.uint16))
        left -= n
    val = ShardWriter(directory, "val", dtype_code=1, shard_tokens=shard_tokens)
    val.write(rng.integers(0, VOCAB, 1 << 20, dtype=np.uint16))
    shards = train.close() + val.close()
    return write_index(directory, build_index(shards, vocab_size=VOCAB, eos_id=0, tokenizer_sha="0" * 64))


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0, help="GiB of train tokens to write (uint16: 2 bytes a token)")
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the dataset (default: a temporary directory)")
    args = ap.parse_args()
    cores = default_workers()
    tokens = int(args.gib * (1 << 30)) // 2

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="albor-bench-startup-") as tmp:
        t0 = time.perf_counter()
        index = write_dataset(Path(tmp), tokens, args.shard_tokens)
        files = sorted(Path(tmp).glob("*.bin"))
        total = sum(f.stat().st_size for f in files)
        print(f"dataset: {tokens:,} train tokens + {1 << 20:,} val, {len(files)} shards, {total / 1e9:.2f} GB, "
              f"written in {time.perf_counter() - t0:.1f} s; {cores} core(s)")

        print("== start-up: TokenDataset.open, before (full scan of every shard) and after (headers only)")
        before = best_of(args.repeats, lambda: verify_dataset(index, workers=1))
        opened = []
        after = statistics.median(
            best_of(1, lambda: opened.append(TokenDataset.open(index, vocab_size=VOCAB))) for _ in range(max(5, args.repeats))
        )
        assert opened[-1].split("train").num_tokens == tokens
        print(f"before: full sha256 + max-id scan at open: {before:.3f} s ({total / 1e6 / before:,.0f} MB/s), on every rank")
        print(f"after:  header-only open: {after * 1e3:.2f} ms")
        print(f"ratio full_scan/header_open: {before / after:,.0f}x")

        print("== albor verify-data: MB/s on 1 thread and on every core")
        one = best_of(args.repeats, lambda: verify_dataset(index, workers=1))
        report = verify_dataset(index, workers=cores)
        assert report.ok, report.problems
        many = best_of(args.repeats, lambda: verify_dataset(index, workers=cores))
        print(f"1 thread: {total / 1e6 / one:,.0f} MB/s")
        print(f"{cores} threads: {total / 1e6 / many:,.0f} MB/s")
        print(f"ratio threads_all/threads_1: {one / many:.2f}x (ideal {min(cores, len(files))}x)")

        print("== summary")
        print(f"start-up on {total / 1e9:.2f} GB of tokens: {before:.2f} s -> {after * 1e3:.2f} ms "
              f"({before / after:,.0f}x); verify-data {total / 1e6 / many:,.0f} MB/s on {cores} threads "
              f"({one / many:.2f}x one thread)")


if __name__ == "__main__":
    main()
