"""prepare-data throughput on 1 worker and on every core, against tokenizers' encode_batch, and its peak memory.

On a generated corpus of JSON Lines files made from the python-stdlib sources
(the built-in corpus, about 8 MB, cut into several units), with a 4096-token
byte-level BPE trained here on a third of it. Each prepare runs as
``albor prepare-data`` in its own process, timed from start to exit (so
start-up, the worker pool and writing the shards count), while its process
tree's RSS is sampled every 20 ms:

  * MB/s with 1 worker and with every core, and their ratio (goal: at least
    0.8 x the cores);
  * MB/s of tokenizers' own ``encode_batch`` on the same texts, in the same
    batches, on one thread and on all (its Rayon pool), and albor's ratio to each;
  * peak RSS of the main process and its workers, summed, on the corpus 1x and
    10x the built-in one: it must not grow with the corpus.

Usage: python benchmarks/bench_prepare.py [--max-bytes 8000000] [--scale 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from albor.data import builtin
from albor.data.corpus import find_corpus_files
from albor.data.tokenizer import load_tokenizer
from albor.data.unit_worker import BATCH_BYTES, default_workers

FILES_PER_COPY = 8  # JSONL files per copy of the stdlib sources: several units each


def write_corpus(directory: Path, texts: list[str], copies: int) -> float:
    """``copies`` of ``texts`` as JSONL files (each copy's documents made distinct); returns its MB of text."""
    directory.mkdir(parents=True)
    size = 0
    per_file = -(-len(texts) // FILES_PER_COPY)
    for c in range(copies):
        for f in range(FILES_PER_COPY):
            with open(directory / f"c{c:03d}-{f}.jsonl", "w") as out:
                for t in texts[f * per_file:(f + 1) * per_file]:
                    text = t if c == 0 else f"# copy {c}\n{t}"
                    size += len(text.encode())
                    out.write(json.dumps({"text": text}) + "\n")
    return size / 1e6


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def encode_batch_seconds(backend, texts: list[str], parallel: bool) -> float:
    """tokenizers' encode_batch over ``texts`` in batches of BATCH_BYTES, as prepare-data's workers batch them."""
    batches, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t.encode())
        if size >= BATCH_BYTES:
            batches.append(cur)
            cur, size = [], 0
    batches.append(cur)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if parallel else "false"  # read by tokenizers at every call
    try:
        return timed(lambda: [backend.encode_batch(b, add_special_tokens=False) for b in batches])
    finally:
        del os.environ["TOKENIZERS_PARALLELISM"]


def peak_rss(argv: list[str]) -> tuple[float, int, int, int]:
    """Run ``argv``; (seconds, peak summed RSS, peak main RSS, peak RSS of one worker) of its process tree."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    root = psutil.Process(proc.pid)
    peaks = {"sum": 0, "main": 0, "worker": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                main = root.memory_info().rss
                children = [c.memory_info().rss for c in root.children(recursive=True)]
            except psutil.Error:  # a process ended between listing and reading
                continue
            peaks["sum"] = max(peaks["sum"], main + sum(children))
            peaks["main"] = max(peaks["main"], main)
            peaks["worker"] = max([peaks["worker"], *children])
            done.wait(0.02)

    t0 = time.perf_counter()
    sampler = threading.Thread(target=sample)
    sampler.start()
    code = proc.wait()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if code:
        raise SystemExit(f"{' '.join(argv)} exited {code}")
    return seconds, peaks["sum"], peaks["main"], peaks["worker"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-bytes", type=int, default=builtin.DEFAULT_MAX_BYTES, help="stdlib bytes in one copy")
    ap.add_argument("--scale", type=int, default=10, help="copies in the large corpus of the memory test")
    ap.add_argument("--vocab-size", type=int, default=builtin.DEFAULT_VOCAB_SIZE)
    args = ap.parse_args()
    cores = default_workers()
    print(f"cores: {cores} (os.sched_getaffinity)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        texts = [d.text for _, d in builtin.stdlib_sources(args.max_bytes)]
        tok_dir = tmp_path / "tokenizer"
        builtin.train_tokenizer(texts[: len(texts) // 3], args.vocab_size, tok_dir)
        tokenizer = load_tokenizer(tok_dir)
        small_mb = write_corpus(tmp_path / "x1", texts, 1)
        large_mb = write_corpus(tmp_path / f"x{args.scale}", texts, args.scale)
        files = find_corpus_files([tmp_path / "x1"])

        def prepare(corpus: Path, workers: int) -> tuple[float, int, int, int]:
            return peak_rss([sys.executable, "-m", "albor.cli", "prepare-data", str(corpus), "--tokenizer",
                             str(tok_dir), "--output", str(tmp_path / f"out-{corpus.name}-w{workers}"),
                             "--workers", str(workers)])

        print("\n== throughput: prepare-data on 1 worker and on every core, and tokenizers' encode_batch ==")
        print(f"corpus: {len(files)} JSONL files, {small_mb:.2f} MB of text, vocab {tokenizer.vocab_size}")
        runs = {workers: prepare(tmp_path / "x1", workers) for workers in (1, cores)}
        base = {p: encode_batch_seconds(tokenizer.backend, texts, parallel=p) for p in (False, True)}
        rate = {k: small_mb / v[0] for k, v in runs.items()}
        print(f"albor prepare-data, 1 worker         : {rate[1]:7.2f} MB/s")
        print(f"albor prepare-data, {cores} workers        : {rate[cores]:7.2f} MB/s")
        print(f"tokenizers encode_batch, 1 thread    : {small_mb / base[False]:7.2f} MB/s")
        print(f"tokenizers encode_batch, all threads : {small_mb / base[True]:7.2f} MB/s")
        print(f"ratio all_workers/one_worker: {rate[cores] / rate[1]:.2f} (goal >= {0.8 * cores:.1f}, 0.8 x {cores} cores)")
        print(f"ratio one_worker/encode_batch_one_thread: {base[False] / runs[1][0]:.2f}")
        print(f"ratio all_workers/encode_batch_all_threads: {base[True] / runs[cores][0]:.2f}")

        print(f"\n== memory: peak RSS of `albor prepare-data` (main + workers, summed), corpus 1x and {args.scale}x ==")
        runs_large = prepare(tmp_path / f"x{args.scale}", cores)
        rows = [("1x", 1, small_mb, runs[1]), ("1x", cores, small_mb, runs[cores]),
                (f"{args.scale}x", cores, large_mb, runs_large)]
        for name, workers, mb, (seconds, total, main_rss, worker) in rows:
            print(f"{name:>4}, {workers} worker{'s' if workers > 1 else ' '}: {mb:6.1f} MB in {seconds:5.1f} s "
                  f"({mb / seconds:5.2f} MB/s); peak RSS {total / 2**20:5.0f} MiB (main {main_rss / 2**20:.0f} MiB, "
                  f"largest worker {worker / 2**20:.0f} MiB)")
        small_rss, large_rss = runs[cores][1], runs_large[1]
        ratio = large_rss / small_rss
        print(f"ratio rss_large/rss_small: {ratio:.2f} for {large_mb / small_mb:.0f}x the text, {cores} workers")

        print("\n== summary ==")
        print(f"prepare-data: {rate[1]:.2f} MB/s on 1 worker, {rate[cores]:.2f} MB/s on {cores}: "
              f"{rate[cores] / rate[1]:.2f}x (goal {0.8 * cores:.1f}x); "
              f"{base[True] / runs[cores][0]:.2f} of tokenizers' encode_batch on all threads")
        print(f"peak RSS {small_rss / 2**20:.0f} MiB on {small_mb:.0f} MB, {large_rss / 2**20:.0f} MiB on "
              f"{large_mb:.0f} MB: {'does not grow' if ratio < 1.25 else 'GROWS'} with the corpus")


if __name__ == "__main__":
    main()
