"""The built-in ``python-stdlib`` corpus: the running interpreter's own sources.

It exists so that ``albor pretrain`` has real code to train on with nothing
to download. Collection is deterministic: files are walked in sorted order
of their POSIX path relative to the stdlib root and taken until the next one
would pass ``max_bytes``. A byte-level BPE is trained on them (tokenizers'
BPE trainer breaks count ties by pair, which makes it deterministic across
runs and thread counts; a test checks the whole output byte for byte).
"""

from __future__ import annotations

import os
import platform
import sysconfig
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer

from albor.atomic_files import write_bytes_atomic
from albor.data.corpus import Document
from albor.data.shards import DEFAULT_SHARD_TOKENS
from albor.data.tokenizer import EOS_TOKEN, MERGES_FILE, VOCAB_FILE, load_tokenizer
from albor.data.tokenizing import tokenize_corpus
from albor.errors import ConfigError

BUILTINS = ("python-stdlib",)
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MAX_BYTES = 8_000_000
# Stdlib modules are few (~435 within 8 MB) and large: at 2% the hash split can
# pick no file at all. 5% gives ~13 files, ~42k validation tokens at the default cap.
BUILTIN_VAL_FRACTION = 0.05
TOKENIZER_SUBDIR = "tokenizer"
# Tests are huge and repetitive; idlelib/lib2to3/turtledemo are apps, not library code.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
_MIN_VOCAB = 257  # 256 byte symbols + <|endoftext|>


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(max_bytes: int) -> list[tuple[str, Document]]:
    """(relative path, document) of stdlib .py files, sorted, at most ``max_bytes`` in total."""
    root = stdlib_root()
    paths: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                p = Path(dirpath, name)
                paths.append((p.relative_to(root).as_posix(), p))
    paths.sort()
    out: list[tuple[str, Document]] = []
    total = 0
    for rel, p in paths:
        data = p.read_bytes()
        if total + len(data) > max_bytes:
            break
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a few stdlib files are latin-1 on purpose; skipping them is deterministic
        if text:
            out.append((rel, Document(text, data)))
            total += len(data)
    if not out:
        # The corpus is the interpreter's own: only the flag can be wrong.
        raise ConfigError(f"no usable .py sources under {root} within --max-bytes {max_bytes}; raise --max-bytes")
    return out


def train_tokenizer(texts: list[str], vocab_size: int, directory: Path) -> None:
    """Train a byte-level BPE on ``texts`` and write vocab.json + merges.txt atomically."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
                            show_progress=False)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".staging-{os.getpid()}"
    staging.mkdir(exist_ok=True)
    try:
        bpe.save_model(str(staging))
        for name in (VOCAB_FILE, MERGES_FILE):
            write_bytes_atomic(directory / name, (staging / name).read_bytes())
    finally:
        for p in staging.iterdir():
            p.unlink()
        staging.rmdir()


def check_builtin_args(name: str, *, vocab_size: int, max_bytes: int) -> None:
    """ConfigError for a built-in corpus, vocabulary or byte cap that cannot work."""
    if name not in BUILTINS:
        raise ConfigError(f"unknown built-in corpus {name!r}; choose one of {', '.join(BUILTINS)}")
    if vocab_size < _MIN_VOCAB:
        raise ConfigError(
            f"--vocab-size {vocab_size} is below {_MIN_VOCAB} (256 bytes + {EOS_TOKEN}); use e.g. {DEFAULT_VOCAB_SIZE}"
        )
    if max_bytes < 1:
        raise ConfigError(f"--max-bytes {max_bytes} must be positive; use e.g. {DEFAULT_MAX_BYTES}")


def prepare_builtin(
    name: str,
    output: Path,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    val_fraction: float = BUILTIN_VAL_FRACTION,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
) -> Path:
    """Build the named built-in dataset into ``output``; returns the path of index.json.

    ``workers`` tokenize it (default: every core this process may use).
    """
    check_builtin_args(name, vocab_size=vocab_size, max_bytes=max_bytes)
    sources = stdlib_sources(max_bytes)
    docs = [d for _, d in sources]
    output.mkdir(parents=True, exist_ok=True)
    tok_dir = output / TOKENIZER_SUBDIR
    train_tokenizer([d.text for d in docs], vocab_size, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    total = sum(len(d.data) for d in docs)
    extra = {
        # Relative, and no timestamps: two runs must give byte-identical files.
        "tokenizer": TOKENIZER_SUBDIR,
        "source": {"builtin": name, "python": platform.python_version(), "max_bytes": max_bytes,
                   "files": len(docs), "bytes": total},
    }
    # The files themselves are tokenized, by the workers; they are the documents just collected.
    files = [stdlib_root() / rel for rel, _ in sources]
    return tokenize_corpus(files, tokenizer, output, source=f"built-in {name}", val_fraction=val_fraction,
                           shard_tokens=shard_tokens, extra=extra, workers=workers)
