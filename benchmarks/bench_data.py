"""Data pipeline throughput on the built-in python-stdlib corpus.

Prints:
  * prepare-data MB/s (read files, split hash, encode, write shards + sha256)
    against ``tokenizers``' own ``encode_batch`` MB/s on the same text, and the ratio;
  * TrainLoader tokens/s for micro-batch 16 x seq 1024 on one rank.

Usage: python benchmarks/bench_data.py [--max-bytes 8000000] [--vocab-size 4096] [--batches 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from albor.data import builtin
from albor.data.tokenizing import BATCH_BYTES, prepare_corpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-bytes", type=int, default=builtin.DEFAULT_MAX_BYTES)
    ap.add_argument("--vocab-size", type=int, default=builtin.DEFAULT_VOCAB_SIZE)
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"cores: {os.cpu_count()}  TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        index = builtin.prepare_builtin("python-stdlib", tmp_path / "stdlib", vocab_size=args.vocab_size,
                                        max_bytes=args.max_bytes)
        print(f"builtin python-stdlib (train BPE {args.vocab_size} + tokenize): {time.perf_counter() - t0:.2f} s")

        sources = builtin.stdlib_sources(args.max_bytes)
        files = [builtin.stdlib_root() / rel for rel, _ in sources]
        mb = sum(len(d.data) for _, d in sources) / 1e6
        tok_dir = tmp_path / "stdlib" / "tokenizer"

        from albor.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
        backend = tokenizer.backend
        texts = [d.text for _, d in sources]
        batches, cur, size = [], [], 0
        for t in texts:  # the same batching prepare-data uses
            cur.append(t)
            size += len(t)
            if size >= BATCH_BYTES:
                batches.append(cur)
                cur, size = [], 0
        batches.append(cur)

        def raw() -> None:
            for b in batches:
                backend.encode_batch(b, add_special_tokens=False)

        def ours() -> None:
            prepare_corpus(files, tokenizer, tmp_path / "bench-out", source="python-stdlib", val_fraction=0.02)

        raw()  # warm the thread pool and page cache
        # Interleaved, best of N: other processes on a small machine add noise to both alike.
        times = [(_timed(raw), _timed(ours)) for _ in range(args.repeats)]
        best_raw, best_ours = min(t[0] for t in times), min(t[1] for t in times)
        print(f"corpus: {len(files)} files, {mb:.2f} MB")
        print(f"tokenizers encode_batch : {mb / best_raw:7.2f} MB/s")
        print(f"albor prepare-data      : {mb / best_ours:7.2f} MB/s  "
              f"(ratio {best_raw / best_ours:.2f} of encode_batch)")

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


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
