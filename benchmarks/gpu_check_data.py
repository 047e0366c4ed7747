"""The GPU check's dataset: a prepared albor dataset's tokens, their ids moved into a larger vocabulary.

albor-370m's speed depends on its 50257-row embedding and head, but the built-in
corpus trains a 4096-id BPE (a few MB of text cannot fill 50257). A fixed
permutation sends each source id to its own id below ``vocab_size``: the token
stream keeps its structure (the model learns as it would on the source) and the
model gets the contract's shape. The result is an ordinary albor dataset
(shards, sha256s, index.json) that ``albor pretrain --dataset`` opens as any
other; its index names the source and the permutation's seed.

    python benchmarks/gpu_check_data.py SOURCE_DIR OUTPUT_DIR --vocab-size 50257
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

from albor.data.shards import (
    SPLITS, ShardWriter, build_index, dtype_code_for_vocab, index_path, open_tokens, read_header, read_index,
    write_index,
)


def id_map(source_vocab: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """``map[i]``: the id source id ``i`` becomes; distinct, each below ``vocab_size``."""
    if vocab_size < source_vocab:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the source's {source_vocab}")
    return np.random.default_rng(seed).permutation(vocab_size)[:source_vocab]


def remap_dataset(source: Path, output: Path, vocab_size: int, *, seed: int = 0) -> Path:
    """Write ``source``'s splits into ``output`` with every id mapped by :func:`id_map`; returns the new index.json."""
    src_index_path = index_path(source)
    index = read_index(src_index_path)
    ids = id_map(index["vocab_size"], vocab_size, seed)
    output.mkdir(parents=True, exist_ok=True)
    shards = []
    for split in SPLITS:
        writer = ShardWriter(output, split, dtype_code=dtype_code_for_vocab(vocab_size))
        for entry in (e for e in index["shards"] if e["split"] == split):
            path = src_index_path.parent / entry["name"]
            writer.write(ids[open_tokens(path, read_header(path))])
        shards += writer.close()
    # No tokenizer decodes these ids: the index says so rather than naming the source's.
    what = f"{index['tokenizer_sha256']} ids permuted into {vocab_size} (seed {seed})"
    return write_index(output, build_index(
        shards, vocab_size=vocab_size, eos_id=int(ids[index["eos_id"]]),
        tokenizer_sha=hashlib.sha256(what.encode()).hexdigest(),
        extra={"source": {"remapped_from": str(src_index_path), "fingerprint": index["fingerprint"],
                          "vocab_size": index["vocab_size"], "seed": seed}},
    ))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="a prepared albor dataset (index.json or its directory)")
    ap.add_argument("output", type=Path, help="directory to write")
    ap.add_argument("--vocab-size", type=int, default=50257)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(remap_dataset(args.source, args.output, args.vocab_size, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
