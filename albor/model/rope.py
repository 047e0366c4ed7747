"""Rotary position embeddings, Hugging Face Llama's default ("rotate_half") convention."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim, split in halves (HF's layout, not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, heads, T, D) by the angles whose cos/sin are (T, D)."""
    # HF casts the table to the activation dtype before the product; do the
    # same so bf16 runs round exactly as the reference does.
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_positions), float32, non-persistent.

    Not in ``state_dict()``: the tables are a pure function of the config, and
    Hugging Face checkpoints do not carry them either.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = float(theta)
        device = torch.empty(0).device  # honours a surrounding `with torch.device(...)`
        cos, sin = self._tables(device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Same float32 ops, in the same order, as HF's compute_default_rope_parameters
        # and LlamaRotaryEmbedding.forward, so the tables agree bit for bit.
        d = self.head_dim
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d)
        )  # (D/2,)
        pos = torch.arange(self.max_positions, dtype=torch.int64, device=device).float()  # (P,)
        freqs = pos[:, None] * inv_freq[None, :]  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
        return emb.cos(), emb.sin()

    def reset_tables(self) -> None:
        """Recompute the tables in float32 on the module's current device."""
        cos, sin = self._tables(self.cos.device)
        self.cos = cos
        self.sin = sin

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        # `model.to(torch.bfloat16)` (and DeepSpeed's `.half()`) would round the
        # tables, and `to_empty()` after a meta-device build would leave garbage:
        # after any move or cast, rebuild them in float32 on the new device.
        out = super()._apply(fn, *args, **kwargs)
        self.reset_tables()
        return out

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions [0, seq_len), each (T, D) float32."""
        return self.cos[:seq_len], self.sin[:seq_len]
