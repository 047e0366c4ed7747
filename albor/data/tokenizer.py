"""Byte-level BPE tokenizer loaded from ``vocab.json`` + ``merges.txt``.

The wrapper exists so that every consumer sees the same three facts about a
tokenizer (vocabulary size, end-of-text id, content hash) and so that a bad
tokenizer directory fails with one clear :class:`DataError` instead of a Rust
panic message from deep inside ``tokenizers``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from albor.errors import ConfigError, DataError

EOS_TOKEN = "<|endoftext|>"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"


@dataclass(frozen=True)
class Tokenizer:
    """A loaded byte-level BPE tokenizer."""

    directory: Path
    vocab_size: int
    eos_id: int
    sha256: str
    backend: HFTokenizer

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; no special tokens are added."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]


def tokenizer_sha256(directory: Path) -> str:
    """sha256 over the bytes of vocab.json followed by merges.txt."""
    h = hashlib.sha256()
    for name in (VOCAB_FILE, MERGES_FILE):
        h.update((directory / name).read_bytes())
    return h.hexdigest()


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load and check the tokenizer in ``directory``.

    ConfigError (exit 2) when ``directory`` is not there or not a directory, DataError (exit 3) when
    its files are missing or unusable.
    """
    directory = Path(directory)
    fix = "point --tokenizer at a directory holding a byte-level BPE vocab.json and merges.txt"
    if not directory.exists():  # a path that does not exist is a usage error, like any other flag
        raise ConfigError(f"tokenizer directory {directory} does not exist; {fix}")
    if not directory.is_dir():
        raise ConfigError(f"tokenizer {directory} is not a directory; {fix}")
    vocab_path, merges_path = directory / VOCAB_FILE, directory / MERGES_FILE
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise DataError(f"tokenizer file {path} is missing; {fix}")
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"tokenizer file {vocab_path} cannot be read ({e.strerror or e}); check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"tokenizer file {vocab_path} is not valid JSON ({e}); regenerate it or {fix}") from e
    if not isinstance(vocab, dict) or not vocab:
        raise DataError(f"tokenizer file {vocab_path} holds no vocabulary (expected a non-empty JSON object token -> id); {fix}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vocab.values()):
        raise DataError(f"tokenizer file {vocab_path} maps some token to a non-integer or negative id; regenerate it")
    if EOS_TOKEN not in vocab:
        raise DataError(
            f"tokenizer file {vocab_path} has no {EOS_TOKEN} token, which albor uses to separate documents; "
            f"retrain the tokenizer with special_tokens=[{EOS_TOKEN!r}]"
        )
    try:
        model = models.BPE.from_file(str(vocab_path), str(merges_path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed merges
        raise DataError(f"tokenizer files in {directory} cannot be loaded ({e}); check that {merges_path} matches {vocab_path}") from e
    backend = HFTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # EOS is deliberately not registered as a special token: a literal
    # "<|endoftext|>" inside a source file must not become a document boundary.
    vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    return Tokenizer(
        directory=directory,
        vocab_size=vocab_size,
        eos_id=int(vocab[EOS_TOKEN]),
        sha256=tokenizer_sha256(directory),
        backend=backend,
    )
