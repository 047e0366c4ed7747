"""Read and write `.apr` checkpoints (APR v2, docs/checkpoints.md), as aprender writes them.

Layout (all integers little-endian)::

    [header 64 B][JSON metadata, zero-padded to 64][tensor index, zero-padded to 64]
    [tensor data, each tensor zero-padded to 64][footer CRC32 u32]

Decisions, each matching aprender's own v2 writer so either side reads the other:

- Tensors are written sorted by name (Python ``str`` order, which equals UTF-8
  byte order), index and data alike; aprender's reader rejects an unsorted index.
- A tensor's index ``offset`` is relative to ``data_offset`` (the start of the
  data section), so the tensor lives at ``data_offset + offset``.
- ``metadata_size`` is the JSON length before padding; the tensor index starts
  at the next 64-byte boundary.
- The file ends with a CRC32 of every byte before it (aprender's footer), which
  lets the reader reject a truncated or bit-flipped payload, not just a bad header.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from albor.errors import DataError

MAGIC = b"APR\x00"
VERSION_MAJOR, VERSION_MINOR = 2, 0
HEADER_SIZE = 64
ALIGN = 64
MAX_NDIM = 8
MAX_NAME_BYTES = 256  # aprender truncates longer names silently; we refuse them

FLAG_LAYOUT_ROW_MAJOR = 0x0400
# Flags that change how the payload must be decoded; we cannot honour any of them.
FLAGS_UNSUPPORTED = {0x0001: "LZ4-compressed", 0x0002: "zstd-compressed",
                     0x0004: "encrypted", 0x0800: "column-major"}

# Header field byte offsets (the table in docs/checkpoints.md):
# magic 0..4, major 4, minor 5, flags 6..8, tensor_count 8..12,
# metadata_offset 12..20, metadata_size 20..24, tensor_index_offset 24..32,
# data_offset 32..40, header_crc32 40..44, reserved 44..64 (zero).
OFF_HEADER_CRC = 40
# One struct for bytes 0..40; "<" means little-endian with no implicit padding.
_HEADER_FIELDS = struct.Struct("<4sBBHIQIQQ")
assert _HEADER_FIELDS.size == OFF_HEADER_CRC

_CODE_OF_DTYPE: dict[torch.dtype, int] = {
    torch.float32: 0, torch.float16: 1, torch.float64: 3, torch.int32: 4,
    torch.int64: 5, torch.int8: 6, torch.uint8: 7, torch.bfloat16: 30,
}
_DTYPE_OF_CODE = {code: dtype for dtype, code in _CODE_OF_DTYPE.items()}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _header_crc(header: bytes | bytearray) -> int:
    return zlib.crc32(header[OFF_HEADER_CRC + 4:HEADER_SIZE], zlib.crc32(header[:OFF_HEADER_CRC]))


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Row-major little-endian bytes of ``tensor`` without copying a contiguous CPU tensor."""
    t = tensor.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16; the bit pattern is what we store
    arr = t.numpy().reshape(-1)
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)  # no-op on little-endian hosts
    return memoryview(arr.view(np.uint8))


def write_apr(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> str:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically; return the file's sha256 hex.

    The file is built at ``<path>.tmp`` in the same directory, fsynced, then renamed over
    ``path``: a crash or error never leaves a partial file under ``path`` and never harms
    a previous file there. Tensor bytes are streamed one tensor at a time.
    Raises ``ValueError``/``TypeError`` for inputs the format cannot hold, before any file is touched.
    """
    path = Path(path)
    names = sorted(tensors)
    entries: list[tuple[str, int, tuple[int, ...], int, int]] = []  # name, code, shape, offset, size
    offset = 0
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name {name!r} must be a non-empty str")
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in _CODE_OF_DTYPE:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which APR v2 cannot store; "
                             f"convert it to one of {sorted(str(d) for d in _CODE_OF_DTYPE)}")
        if t.dim() > MAX_NDIM:
            raise ValueError(f"tensor {name!r} has {t.dim()} dims; APR v2 allows at most {MAX_NDIM}")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(f"tensor name {name!r} is longer than {MAX_NAME_BYTES} UTF-8 bytes")
        size = t.numel() * t.element_size()
        entries.append((name, _CODE_OF_DTYPE[t.dtype], tuple(t.shape), offset, size))
        offset += _align(size)

    meta = json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")
    if len(meta) >= 2**32:
        raise ValueError(f"metadata is {len(meta)} bytes of JSON; APR v2 allows < 4 GiB")

    index = bytearray()
    for name, code, shape, off, size in entries:
        raw = name.encode("utf-8")
        index += struct.pack(f"<H{len(raw)}sBB{len(shape)}QQQ", len(raw), raw, code, len(shape),
                             *shape, off, size)
    metadata_offset = HEADER_SIZE
    index_offset = metadata_offset + _align(len(meta))
    data_offset = index_offset + _align(len(index))

    header = bytearray(HEADER_SIZE)
    _HEADER_FIELDS.pack_into(header, 0, MAGIC, VERSION_MAJOR, VERSION_MINOR, FLAG_LAYOUT_ROW_MAJOR,
                             len(entries), metadata_offset, len(meta), index_offset, data_offset)
    struct.pack_into("<I", header, OFF_HEADER_CRC, _header_crc(header))

    tmp = path.with_suffix(path.suffix + ".tmp")
    sha = hashlib.sha256()
    crc = 0
    try:
        with open(tmp, "wb") as f:

            def emit(chunk: bytes | bytearray | memoryview) -> None:
                nonlocal crc
                f.write(chunk)
                sha.update(chunk)
                crc = zlib.crc32(chunk, crc)

            emit(header)
            emit(meta + bytes(index_offset - metadata_offset - len(meta)))
            emit(index + bytes(data_offset - index_offset - len(index)))
            for name, _code, _shape, _off, size in entries:
                data = _tensor_bytes(tensors[name])
                assert len(data) == size, (name, len(data), size)
                emit(data)
                emit(bytes(_align(size) - size))
            emit(struct.pack("<I", crc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return sha.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_apr(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read an `.apr` file into ``(metadata, tensors)``; raise ``DataError`` if it is malformed.

    Checks magic, major version, header CRC, unsupported flags, every offset and size
    against the file length, dtype codes, ndim, and the footer CRC over the whole file.
    Tensors come back in file (name) order as views into one buffer holding the whole file,
    so loading costs one copy of the file in memory; ``.clone()`` a tensor to detach it.
    """
    path = Path(path)

    def bad(why: str) -> DataError:
        return DataError(f"{path}: not a valid APR v2 checkpoint: {why}")

    try:
        with open(path, "rb") as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            if f.readinto(buf) != len(buf):
                raise bad("file changed size while being read")
    except OSError as e:
        raise DataError(f"{path}: cannot read APR checkpoint: {e}") from e

    if len(buf) < HEADER_SIZE + 4:
        raise bad(f"file is {len(buf)} bytes, shorter than the 64-byte header and footer (truncated?)")
    magic, major, minor, flags, count, meta_off, meta_size, index_off, data_off = \
        _HEADER_FIELDS.unpack_from(buf, 0)
    if magic != MAGIC:
        raise bad(f"magic is {bytes(magic)!r}, expected {MAGIC!r}")
    if major != VERSION_MAJOR:
        raise bad(f"format version {major}.{minor}, this reader handles {VERSION_MAJOR}.x")
    (stored_crc,) = struct.unpack_from("<I", buf, OFF_HEADER_CRC)
    if stored_crc != _header_crc(buf[:HEADER_SIZE]):
        raise bad(f"header CRC32 is {stored_crc:#010x}, computed {_header_crc(buf[:HEADER_SIZE]):#010x}")
    for bit, what in FLAGS_UNSUPPORTED.items():
        if flags & bit:
            raise bad(f"flag {bit:#06x} ({what}) is set; albor reads only plain row-major files")
    end = len(buf) - 4  # start of the footer
    (stored_footer,) = struct.unpack_from("<I", buf, end)
    if stored_footer != zlib.crc32(memoryview(buf)[:end]):
        raise bad("footer CRC32 does not match the file contents (truncated or corrupted)")
    if not (HEADER_SIZE <= meta_off and meta_off + meta_size <= index_off <= data_off <= end):
        raise bad(f"section offsets out of order or past the end: metadata {meta_off}+{meta_size}, "
                  f"index {index_off}, data {data_off}, payload ends at {end}")

    if count * 20 > data_off - index_off:  # 20 = smallest entry: u16 + dtype + ndim + 2×u64
        raise bad(f"tensor_count {count} cannot fit in the {data_off - index_off}-byte tensor index")
    try:
        metadata = json.loads(buf[meta_off:meta_off + meta_size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"metadata is not UTF-8 JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise bad(f"metadata is a JSON {type(metadata).__name__}, expected an object")

    tensors: dict[str, torch.Tensor] = {}
    pos = index_off
    for i in range(count):
        def take(fmt: str) -> tuple:
            nonlocal pos
            n = struct.calcsize(fmt)
            if pos + n > data_off:
                raise bad(f"tensor index entry {i} runs past the start of the data section")
            out = struct.unpack_from(fmt, buf, pos)
            pos += n
            return out

        (name_len,) = take("<H")
        (raw_name,) = take(f"<{name_len}s")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError as e:
            raise bad(f"tensor index entry {i} has a name that is not UTF-8") from e
        code, ndim = take("<BB")
        if code not in _DTYPE_OF_CODE:
            raise bad(f"tensor {name!r} has dtype code {code}; known codes {sorted(_DTYPE_OF_CODE)}")
        if ndim > MAX_NDIM:
            raise bad(f"tensor {name!r} has ndim {ndim} > {MAX_NDIM}")
        shape = take(f"<{ndim}Q")
        off, size = take("<QQ")
        dtype = _DTYPE_OF_CODE[code]
        if name in tensors:
            raise bad(f"tensor {name!r} appears twice in the index")
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if size != expected:
            raise bad(f"tensor {name!r} declares {size} bytes but shape {list(shape)} of {dtype} "
                      f"needs {expected}")
        start = data_off + off
        if start % ALIGN:
            raise bad(f"tensor {name!r} data at byte {start} is not {ALIGN}-byte aligned")
        if start + size > end:
            raise bad(f"tensor {name!r} data [{start}, {start + size}) runs past the payload end {end}")
        if size == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=math.prod(shape),
                                             offset=start).reshape(shape)
    return metadata, tensors
