"""On-disk token shards and the ``index.json`` that lists them.

Shard layout (little-endian), a 32-byte header then the tokens::

    offset  size  field
    0       8     magic b"ALBORTOK"
    8       4     format version, u32 (currently 1)
    12      4     dtype code, u32 (1 = uint16, 2 = uint32)
    16      8     token count, u64
    24      8     reserved, zero

The file size is therefore exactly ``32 + count * itemsize``; anything else is
a truncated or corrupt shard. ``index.json`` is written last and is the
completion marker of a dataset directory (as OLMo-core does for checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from albor.atomic_files import write_bytes_atomic
from albor.errors import DataError

REGENERATE = "regenerate it with `albor prepare-data`"

MAGIC = b"ALBORTOK"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")
HEADER_SIZE = HEADER.size  # 32
DTYPES: dict[int, np.dtype] = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
INDEX_NAME = "index.json"
DEFAULT_SHARD_TOKENS = 64 * 1024 * 1024
SPLITS = ("train", "val")
_CHUNK = 16 * 1024 * 1024  # bytes per read when hashing; a multiple of every itemsize


def dtype_code_for_vocab(vocab_size: int) -> int:
    """uint16 while every id fits (vocab <= 65536), uint32 beyond."""
    return 1 if vocab_size <= 65536 else 2


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype_code: int
    count: int

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.dtype_code]

    def pack(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.dtype_code, self.count)


def read_header(path: Path) -> ShardHeader:
    """Parse and check a shard header, including the file size it implies."""
    regenerate = "regenerate the dataset with `albor prepare-data`"
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing; {regenerate}") from None
    if len(raw) < HEADER_SIZE:
        raise DataError(f"shard {path} is truncated: {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header; {regenerate}")
    magic, version, dtype_code, count = HEADER.unpack(raw)
    if magic != MAGIC:
        raise DataError(f"shard {path} is not an albor token shard (magic {magic!r}, expected {MAGIC!r}); {regenerate}")
    if version != FORMAT_VERSION:
        raise DataError(
            f"shard {path} has format version {version}, this albor reads version {FORMAT_VERSION}; "
            f"{regenerate} or use a matching albor release"
        )
    if dtype_code not in DTYPES:
        raise DataError(f"shard {path} has unknown dtype code {dtype_code}; {regenerate}")
    header = ShardHeader(version, dtype_code, count)
    expected = HEADER_SIZE + count * header.dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(
            f"shard {path} is truncated or corrupt: its header promises {count} tokens ({expected} bytes) "
            f"but the file has {actual} bytes; {regenerate}"
        )
    return header


def scan_shard(path: Path, header: ShardHeader, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
    """One pass over the file: its sha256 and the largest token id (-1 if empty).

    Reads into one reused buffer; hashlib and numpy's max both release the GIL
    on buffers this large, so shards scan in parallel on threads
    (albor.data.verify). ``on_bytes`` hears how many bytes each read covered.
    """
    h = hashlib.sha256()
    max_id = -1
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
        h.update(head)
        if on_bytes is not None:
            on_bytes(len(head))
        while n := f.readinto(buffer):
            h.update(view[:n])
            tokens = np.frombuffer(buffer, dtype=header.dtype, count=n // header.dtype.itemsize)
            if tokens.size:
                max_id = max(max_id, int(tokens.max()))
            if on_bytes is not None:
                on_bytes(n)
    return h.hexdigest(), max_id


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def open_tokens(path: Path, header: ShardHeader) -> np.ndarray:
    """Memory-map a shard's tokens read-only; no copy into RAM."""
    if header.count == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.count,))


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


@dataclass(frozen=True)
class ShardInfo:
    name: str
    split: str
    tokens: int
    sha256: str


class ShardWriter:
    """Streams tokens of one split into ``{split}-00000.bin``, ... capped at ``shard_tokens``.

    Each shard is written under a temporary name and renamed once complete,
    so a crash never leaves a half-written file under a final name.
    """

    def __init__(self, directory: Path, split: str, *, dtype_code: int, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        assert split in SPLITS and shard_tokens > 0
        self.directory, self.split = directory, split
        self.dtype_code, self.dtype = dtype_code, DTYPES[dtype_code]
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self._file: Any = None
        self._tmp: Path | None = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        while tokens.size:
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._count
            part, tokens = tokens[:room], tokens[room:]
            self._file.write(part.astype(self.dtype, copy=False).tobytes())
            self._count += part.size
            if self._count == self.shard_tokens:
                self._close()

    def close(self) -> list[ShardInfo]:
        # A split always has at least one shard file, even an empty one, so
        # readers never have to special-case a missing split.
        if self._file is None and not self.shards:
            self._open()
        if self._file is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.directory / f".{name}.tmp-{os.getpid()}"
        self._file = open(self._tmp, "wb")
        self._file.write(ShardHeader(FORMAT_VERSION, self.dtype_code, 0).pack())
        self._count = 0

    def _close(self) -> None:
        assert self._file is not None and self._tmp is not None
        self._file.seek(0)
        self._file.write(ShardHeader(FORMAT_VERSION, self.dtype_code, self._count).pack())
        self._file.close()
        self._file = None
        name = shard_name(self.split, len(self.shards))
        sha = file_sha256(self._tmp)  # re-read from the page cache: the header is only final now
        _fsync_replace(self._tmp, self.directory / name)
        self._tmp = None
        self.shards.append(ShardInfo(name, self.split, self._count, sha))


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.bin"


def dataset_fingerprint(shards: list[ShardInfo], tokenizer_sha: str, version: int = FORMAT_VERSION) -> str:
    """One hash naming the exact token stream: format version, tokenizer, every shard."""
    h = hashlib.sha256(f"albor-tokens v{version}\ntokenizer {tokenizer_sha}\n".encode())
    for s in shards:
        h.update(f"{s.split} {s.name} {s.sha256}\n".encode())
    return h.hexdigest()


def build_index(
    shards: list[ShardInfo], *, vocab_size: int, eos_id: int, tokenizer_sha: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    index: dict[str, Any] = {
        "format": "albor-tokens",
        "format_version": FORMAT_VERSION,
        "dtype": DTYPES[dtype_code_for_vocab(vocab_size)].name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer_sha256": tokenizer_sha,
        "fingerprint": dataset_fingerprint(shards, tokenizer_sha),
        "tokens": {split: sum(s.tokens for s in shards if s.split == split) for split in SPLITS},
        "shards": [{"name": s.name, "split": s.split, "tokens": s.tokens, "sha256": s.sha256} for s in shards],
    }
    index.update(extra or {})
    return index


def write_index(directory: Path, index: dict[str, Any]) -> Path:
    path = directory / INDEX_NAME
    write_bytes_atomic(path, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    return path


def index_path(dataset: str | Path) -> Path:
    """The index.json of a dataset given as the file itself or its directory."""
    path = Path(dataset)
    return path / INDEX_NAME if path.is_dir() else path


def read_index(path: Path) -> dict[str, Any]:
    """Parse ``index.json`` and check its shape (not its shards); DataError naming the problem."""
    if not path.is_file():
        raise DataError(
            f"dataset index {path} does not exist; run `albor prepare-data ... --output {path.parent}` "
            "(an unfinished prepare-data leaves no index.json)"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"dataset index {path} is not valid JSON ({e}); {REGENERATE}") from None
    except OSError as e:
        raise DataError(f"dataset index {path} cannot be read ({e.strerror or e}); check its permissions") from None
    if not isinstance(index, dict) or index.get("format") != "albor-tokens":
        raise DataError(
            f"{path} is not an albor dataset index; pass the index.json `albor prepare-data` wrote, or its directory"
        )
    if index.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"dataset index {path} has format version {index.get('format_version')}, this albor reads "
            f"{FORMAT_VERSION}; {REGENERATE}"
        )
    required = {"vocab_size": int, "eos_id": int, "tokenizer_sha256": str, "fingerprint": str, "shards": list}
    for key, typ in required.items():
        if not isinstance(index.get(key), typ) or isinstance(index.get(key), bool):
            raise DataError(f"dataset index {path} lacks a valid {key!r}; {REGENERATE}")
    if index["vocab_size"] < 1:
        raise DataError(f"dataset index {path} has vocab_size {index['vocab_size']}; {REGENERATE}")
    for entry in index["shards"]:
        ok = (
            isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry.get("split") in SPLITS
            and isinstance(entry.get("tokens"), int) and isinstance(entry.get("sha256"), str)
            and "/" not in entry["name"] and "\\" not in entry["name"] and entry["name"] not in ("", ".", "..")
        )
        if not ok:
            raise DataError(f"dataset index {path} has a malformed shard entry {entry!r}; {REGENERATE}")
    return index
