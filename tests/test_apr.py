"""Tests for albor.apr: the byte layout (docs/checkpoints.md, "The `.apr` file"), validation, and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch

from albor import apr
from albor.errors import DataError

META = {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2, "vocab_size": 128, "intermediate_size": 172,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),  # f32 2-d
        "model.norm.weight": torch.randn(5, generator=g, dtype=torch.float64),  # 1-d, odd size
        "lm_head.weight": torch.randn(3, 4, 5, generator=g).to(torch.bfloat16),  # 3-d bf16
        "h": torch.randn(7, generator=g).half(),
        "i32": torch.tensor(-3, dtype=torch.int32),  # 0-d
        "i64": torch.arange(-5, 6, dtype=torch.int64),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([[0, 255]], dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
        "noncontig": torch.arange(12.0).reshape(3, 4).t(),
    }


def _write(tmp_path: Path, tensors=None, meta=None) -> tuple[Path, str]:
    path = tmp_path / "epoch-000.apr"
    sha = apr.write_apr(path, _tensors() if tensors is None else tensors, META if meta is None else meta)
    return path, sha


def _header(raw: bytes) -> dict:
    """Parse the header with plain struct reads at the documented offsets, not via apr."""
    return {
        "magic": raw[0:4], "major": raw[4], "minor": raw[5],
        "flags": struct.unpack("<H", raw[6:8])[0],
        "tensor_count": struct.unpack("<I", raw[8:12])[0],
        "metadata_offset": struct.unpack("<Q", raw[12:20])[0],
        "metadata_size": struct.unpack("<I", raw[20:24])[0],
        "tensor_index_offset": struct.unpack("<Q", raw[24:32])[0],
        "data_offset": struct.unpack("<Q", raw[32:40])[0],
        "crc": struct.unpack("<I", raw[40:44])[0],
        "reserved": raw[44:64],
    }


def _index(raw: bytes, h: dict) -> list[tuple[str, int, tuple[int, ...], int, int]]:
    pos, out = h["tensor_index_offset"], []
    for _ in range(h["tensor_count"]):
        (n,) = struct.unpack_from("<H", raw, pos)
        name = raw[pos + 2:pos + 2 + n].decode()
        pos += 2 + n
        code, ndim = raw[pos], raw[pos + 1]
        pos += 2
        shape = struct.unpack_from(f"<{ndim}Q", raw, pos)
        pos += 8 * ndim
        off, size = struct.unpack_from("<QQ", raw, pos)
        pos += 16
        out.append((name, code, shape, off, size))
    return out


def test_round_trip_every_dtype_and_rank(tmp_path):
    src = _tensors()
    path, _ = _write(tmp_path)
    meta, got = apr.read_apr(path)
    assert meta == META
    assert set(got) == set(src)
    for name, t in src.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def test_header_fields_at_exact_offsets(tmp_path):
    path, _ = _write(tmp_path)
    raw = path.read_bytes()
    h = _header(raw)
    assert h["magic"] == b"APR\x00"
    assert (h["major"], h["minor"]) == (2, 0)
    assert h["flags"] & 0x400
    assert h["tensor_count"] == len(_tensors())
    assert h["metadata_offset"] == 64
    meta_json = raw[64:64 + h["metadata_size"]]
    assert json.loads(meta_json) == META
    assert meta_json == json.dumps(META, sort_keys=True, separators=(",", ":")).encode()
    assert h["reserved"] == bytes(20)
    assert h["data_offset"] > h["tensor_index_offset"] >= 64 + h["metadata_size"]
    # Footer: CRC32 over every byte before it.
    assert struct.unpack("<I", raw[-4:])[0] == zlib.crc32(raw[:-4])


def test_index_entries_and_dtype_codes(tmp_path):
    src = _tensors()
    path, _ = _write(tmp_path)
    raw = path.read_bytes()
    entries = _index(raw, _header(raw))
    codes = {torch.float32: 0, torch.float16: 1, torch.float64: 3, torch.int32: 4,
             torch.int64: 5, torch.int8: 6, torch.uint8: 7, torch.bfloat16: 30}
    assert [e[0] for e in entries] == sorted(src)  # sorted by name
    for name, code, shape, _off, size in entries:
        assert code == codes[src[name].dtype], name
        assert shape == tuple(src[name].shape), name
        assert size == src[name].numel() * src[name].element_size(), name


def test_bf16_bytes_are_the_raw_bit_patterns(tmp_path):
    t = torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16)  # 0x3F80, 0xC000, 0x3F00
    path, _ = _write(tmp_path, {"w": t}, {})
    raw = path.read_bytes()
    h = _header(raw)
    (_, _, _, off, size), = _index(raw, h)
    start = h["data_offset"] + off
    assert raw[start:start + size] == struct.pack("<3H", 0x3F80, 0xC000, 0x3F00)


def test_alignment_of_sections_and_every_tensor(tmp_path):
    path, _ = _write(tmp_path)
    raw = path.read_bytes()
    h = _header(raw)
    assert h["tensor_index_offset"] % 64 == 0  # metadata end padded to 64
    assert h["data_offset"] % 64 == 0
    entries = _index(raw, h)
    for name, _c, _s, off, _size in entries:
        assert (h["data_offset"] + off) % 64 == 0, name
    # Offsets are relative to data_offset and pack tensors in index order.
    assert entries[0][3] == 0
    for prev, cur in zip(entries, entries[1:]):
        assert cur[3] == prev[3] + (prev[4] + 63) // 64 * 64
    last = entries[-1]
    assert len(raw) == h["data_offset"] + last[3] + (last[4] + 63) // 64 * 64 + 4


def test_header_crc_is_correct(tmp_path):
    path, _ = _write(tmp_path)
    raw = path.read_bytes()
    assert _header(raw)["crc"] == zlib.crc32(raw[0:40] + raw[44:64])


@pytest.mark.parametrize("byte", [0, 5, 9, 13, 30, 40, 50])
def test_flipped_header_byte_is_rejected(tmp_path, byte):
    path, _ = _write(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[byte] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=str(path.name)):
        apr.read_apr(path)


def test_flipped_data_byte_is_rejected(tmp_path):
    path, _ = _write(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[_header(raw)["data_offset"] + 3] ^= 0x80
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="footer CRC32"):
        apr.read_apr(path)


@pytest.mark.parametrize("keep", [0, 10, 63, 64, 200, -1, -4, -5])
def test_truncated_file_is_rejected(tmp_path, keep):
    path, _ = _write(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    with pytest.raises(DataError, match=str(path.name)):
        apr.read_apr(path)


def _rewrite_header(path: Path, **fields) -> None:
    """Patch header fields and recompute both CRCs, so only the patched check can fire."""
    raw = bytearray(path.read_bytes())
    for off, fmt, value in fields.values():
        struct.pack_into(fmt, raw, off, value)
    struct.pack_into("<I", raw, 40, zlib.crc32(bytes(raw[0:40]) + bytes(raw[44:64])))
    struct.pack_into("<I", raw, len(raw) - 4, zlib.crc32(bytes(raw[:-4])))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("patch, message", [
    ({"major": (4, "<B", 3)}, "version"),
    ({"flags": (6, "<H", 0x401)}, "compressed"),
    ({"count": (8, "<I", 999)}, "tensor_count 999"),
    ({"data": (32, "<Q", 10**9)}, "offsets"),
    ({"msize": (20, "<I", 10**6)}, "offsets"),
])
def test_bad_header_values_are_rejected(tmp_path, patch, message):
    path, _ = _write(tmp_path)
    _rewrite_header(path, **patch)
    with pytest.raises(DataError, match=message):
        apr.read_apr(path)


def _patch_first_entry(path: Path, field: str, value: int) -> None:
    raw = bytearray(path.read_bytes())
    h = _header(raw)
    pos = h["tensor_index_offset"]
    (n,) = struct.unpack_from("<H", raw, pos)
    pos += 2 + n
    if field == "dtype":
        raw[pos] = value
    elif field == "ndim":
        raw[pos + 1] = value
    elif field == "offset":
        ndim = raw[pos + 1]
        struct.pack_into("<Q", raw, pos + 2 + 8 * ndim, value)
    struct.pack_into("<I", raw, len(raw) - 4, zlib.crc32(bytes(raw[:-4])))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("field, value, message", [
    ("dtype", 2, "dtype code"), ("ndim", 9, "ndim"),
    ("offset", 8, "aligned"), ("offset", 10**9, "past the payload"),
])
def test_bad_index_entries_are_rejected(tmp_path, field, value, message):
    path, _ = _write(tmp_path)
    _patch_first_entry(path, field, value)
    with pytest.raises(DataError, match=message):
        apr.read_apr(path)


def test_returned_sha_matches_file(tmp_path):
    path, sha = _write(tmp_path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()


def test_output_is_deterministic_and_order_independent(tmp_path):
    src = _tensors()
    a = apr.write_apr(tmp_path / "a.apr", src, META)
    b = apr.write_apr(tmp_path / "b.apr", dict(reversed(list(src.items()))), dict(reversed(list(META.items()))))
    assert a == b


def _assert_untouched(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    assert not path.with_suffix(path.suffix + ".tmp").exists()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_unsupported_dtype_leaves_previous_file_untouched(tmp_path):
    path, _ = _write(tmp_path)
    before = path.read_bytes()
    bad = {"a.good": torch.ones(3), "z.bad": torch.ones(3, dtype=torch.complex64)}
    with pytest.raises(ValueError, match="complex64"):
        apr.write_apr(path, bad, META)
    _assert_untouched(path, before)


def test_failure_midway_through_data_leaves_previous_file_untouched(tmp_path, monkeypatch):
    path, _ = _write(tmp_path)
    before = path.read_bytes()
    real, calls = apr._tensor_bytes, []

    def fail_on_second(t):
        calls.append(t)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(t)

    monkeypatch.setattr(apr, "_tensor_bytes", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        apr.write_apr(path, _tensors(), META)
    assert len(calls) == 2
    _assert_untouched(path, before)


def test_failing_rename_leaves_previous_file_untouched(tmp_path, monkeypatch):
    path, _ = _write(tmp_path)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="rename failed"):
        apr.write_apr(path, {"x": torch.zeros(2)}, {})
    _assert_untouched(path, before)


@pytest.mark.parametrize("tensors, meta, exc", [
    ({"x": torch.zeros([1] * 9)}, {}, ValueError),
    ({"x": [1.0]}, {}, TypeError),
    ({"x": torch.zeros(1)}, {"lr": float("nan")}, ValueError),
    ({"x": torch.zeros(1, dtype=torch.bool)}, {}, ValueError),
])
def test_writer_rejects_what_the_format_cannot_hold(tmp_path, tensors, meta, exc):
    with pytest.raises(exc):
        apr.write_apr(tmp_path / "x.apr", tensors, meta)
    assert list(tmp_path.iterdir()) == []


def test_empty_checkpoint_round_trips(tmp_path):
    path = tmp_path / "e.apr"
    apr.write_apr(path, {}, {})
    assert apr.read_apr(path) == ({}, {})
