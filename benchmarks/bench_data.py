"""Data pipeline throughput on the built-in python-stdlib corpus.

Prints:
  * the time of ``prepare-data --builtin python-stdlib`` (train the BPE, tokenize);
  * TrainLoader tokens/s for micro-batch 16 x seq 1024 on one rank.

prepare-data's MB/s against ``tokenizers``' own ``encode_batch``, on one
worker and on every core, is bench_prepare.py's.

Usage: python benchmarks/bench_data.py [--max-bytes 8000000] [--vocab-size 4096] [--batches 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from albor.data import builtin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-bytes", type=int, default=builtin.DEFAULT_MAX_BYTES)
    ap.add_argument("--vocab-size", type=int, default=builtin.DEFAULT_VOCAB_SIZE)
    ap.add_argument("--batches", type=int, default=300)
    args = ap.parse_args()
    print(f"cores: {len(os.sched_getaffinity(0))} (prepare-data's default --workers)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        index = builtin.prepare_builtin("python-stdlib", tmp_path / "stdlib", vocab_size=args.vocab_size,
                                        max_bytes=args.max_bytes)
        print(f"builtin python-stdlib (train BPE {args.vocab_size} + tokenize): {time.perf_counter() - t0:.2f} s")

        from albor.data.loader import TokenDataset, TrainLoader

        t0 = time.perf_counter()
        ds = TokenDataset.open(index, vocab_size=args.vocab_size)
        print(f"TokenDataset.open (validate + sha256): {time.perf_counter() - t0:.3f} s")
        loader = TrainLoader(ds.split("train"), micro_batch=16, seq_length=1024, rank=0, world_size=1, seed=42)
        loader.next_batch()
        t0 = time.perf_counter()
        for _ in range(args.batches):
            loader.next_batch()
        dt = time.perf_counter() - t0
        print(f"TrainLoader 16 x 1024, 1 rank: {args.batches * loader.tokens_per_global_batch / dt / 1e6:.2f} M tokens/s "
              f"({dt / args.batches * 1e3:.2f} ms/batch, {loader.batches_per_epoch} batches per data epoch, "
              f"ended in data epoch {loader.data_epoch})")


if __name__ == "__main__":
    main()
