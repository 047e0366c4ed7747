"""Turn a ``--dataset`` argument into the path of an ``index.json``.

Accepted: an ``index.json`` (any ``.json`` file is taken as an index); a directory holding one; or a raw corpus (a
.txt/.py/.jsonl file or a directory of them), which is tokenized once into
``{run_dir}/data-cache/`` and reused while the corpus and tokenizer are
unchanged. Every rank may call this: an exclusive file lock makes the first
caller build the cache and the others wait for it and reuse it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from albor.data.prepare import DEFAULT_VAL_FRACTION, find_corpus_files, prepare_corpus
from albor.data.shards import FORMAT_VERSION, INDEX_NAME
from albor.data.tokenizer import load_tokenizer
from albor.errors import ConfigError

CACHE_DIR = "data-cache"


def corpus_fingerprint(files: list[Path], tokenizer_sha: str, val_fraction: float) -> str:
    """Content hash of the corpus files in order, plus everything else that shapes the shards."""
    h = hashlib.sha256(f"albor-corpus v{FORMAT_VERSION}\n{tokenizer_sha}\n{val_fraction!r}\n".encode())
    for p in files:
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                fh.update(chunk)
        h.update(f"{p.suffix} {fh.hexdigest()}\n".encode())
    return h.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _cached_fingerprint(index_path: Path) -> str | None:
    try:
        return json.loads(index_path.read_text())["source"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_dataset(
    dataset: Path, tokenizer_dir: Path | None, run_dir: Path, *, log: Callable[[str], None]
) -> Path:
    """Path of the index.json to train on; tokenizes a raw corpus into the run's cache first."""
    dataset = Path(dataset)
    if dataset.is_file() and dataset.suffix == ".json":  # an index, maybe renamed; opening validates it
        return dataset
    if dataset.is_dir() and (dataset / INDEX_NAME).is_file():
        return dataset / INDEX_NAME
    if not dataset.exists():
        raise ConfigError(
            f"--dataset {dataset} does not exist; pass an index.json, a directory made by `albor prepare-data`, "
            "or a corpus of .txt/.py/.jsonl files"
        )
    files = find_corpus_files([dataset])  # DataError if there is nothing to tokenize
    if tokenizer_dir is None:
        raise ConfigError(
            f"--dataset {dataset} is a raw corpus and needs --tokenizer DIR (vocab.json + merges.txt) to "
            "tokenize it; or run `albor prepare-data` first and pass its index.json"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    cache = Path(run_dir) / CACHE_DIR
    with _locked(Path(run_dir) / f".{CACHE_DIR}.lock"):
        fingerprint = corpus_fingerprint(files, tokenizer.sha256, DEFAULT_VAL_FRACTION)
        index_path = cache / INDEX_NAME
        if _cached_fingerprint(index_path) == fingerprint:
            log(f"dataset: reusing tokenized cache {index_path} for corpus {dataset}")
            return index_path
        if cache.exists():
            log(f"dataset: {cache} is incomplete or was built from another corpus or tokenizer; rebuilding it")
            shutil.rmtree(cache)
        log(f"dataset: tokenizing raw corpus {dataset} ({len(files)} files) once into {cache}")
        path = prepare_corpus(
            [dataset], tokenizer_dir, cache, val_fraction=DEFAULT_VAL_FRACTION,
            extra={"source": {"corpus": str(dataset.resolve()), "files": len(files), "fingerprint": fingerprint}},
        )
        log(f"dataset: wrote {path}")
        return path
