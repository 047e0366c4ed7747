"""The albor decoder: a Llama causal LM in plain PyTorch.

The module tree mirrors ``transformers.LlamaForCausalLM``, so ``state_dict()``
keys are the Hugging Face names (``model.layers.{n}.self_attn.q_proj.weight``,
row-major ``[out, in]``) and weights map one-to-one onto it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from albor.errors import ConfigError
from albor.model.config import ModelConfig, padded_vocab_size
from albor.model.rope import RotaryEmbedding, apply_rope

INIT_STD = 0.02
"""Std of the normal init of every linear and embedding weight (GPT-2, Megatron)."""


class RMSNorm(nn.Module):
    """RMSNorm as HF Llama computes it: normalise in float32, cast back, then scale."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        # bf16 has too few mantissa bits for a stable mean of squares.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE; K/V are never repeated in memory."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """HF's ``LlamaModel``: embeddings, layers, final norm (the ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary_emb(input_ids.shape[1])  # (T, D) each
        h = self.embed_tokens(input_ids)  # (B, T, C)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.norm(h)


class AlborLlama(nn.Module):
    """Llama causal LM; ``forward(input_ids (B, T)) -> logits (B, T, V)`` in the param dtype.

    ``vocab_multiple`` > 1 pads the embedding and the head to
    ``padded_vocab_size`` rows (a multiple of it: 50257 -> 50304 at 64) so the
    head's matmul has no ragged edge on a GPU. The padded rows are never
    predicted: ``forward`` returns the real ``config.vocab_size`` columns only,
    and albor.loss leaves them out of the softmax, so they get no gradient; the
    data holds no id past ``vocab_size`` (checked on read), so no lookup reaches
    them either. Every file holds the real rows only (albor.model.hf_names cuts
    and pads at that boundary). docs/model.md.

    Init (from scratch, GPT-2/Megatron style): every linear and embedding
    weight ~ N(0, 0.02); the residual output projections (``o_proj``,
    ``down_proj``) ~ N(0, 0.02 / sqrt(2 * num_layers)) so the residual stream's
    variance does not grow with depth; norm weights = 1; padded vocabulary rows
    = 0. Construction draws from the global RNG (deterministic under
    ``torch.manual_seed``, and the same draws whatever ``vocab_multiple``); call
    :meth:`init_weights` with a ``torch.Generator`` to seed it explicitly.
    """

    def __init__(self, cfg: ModelConfig, *, vocab_multiple: int = 1) -> None:
        super().__init__()
        self.config = cfg
        self.vocab_multiple = vocab_multiple
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, vocab_multiple)
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.padded_vocab_size > cfg.vocab_size:
            # Grown after a build at the real size: construction then draws the same random numbers
            # whatever the padding, and init_weights (which redraws every weight) continues from the
            # same RNG state, so a padded model's real weights equal an unpadded one's.
            _grow_rows(self.model.embed_tokens, "num_embeddings", self.padded_vocab_size)
            _grow_rows(self.lm_head, "out_features", self.padded_vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise every weight as the class docstring says, and the RoPE tables."""
        cfg = self.config
        if cfg.tie_embeddings and self.lm_head.weight is not self.model.embed_tokens.weight:
            # ``to_empty()`` after a meta-device build gives each module its own fresh tensor, untying
            # the head from the embedding: tie them again, or the head would keep uninitialised memory.
            self.lm_head.weight = self.model.embed_tokens.weight
        residual_std = INIT_STD / math.sqrt(2 * cfg.num_layers)

        def normal(w: torch.Tensor, std: float) -> None:
            if w.is_meta:  # a meta-device build has no storage to fill
                return
            nn.init.normal_(w, mean=0.0, std=std, generator=generator)

        def vocab_rows(w: torch.Tensor) -> None:
            # The real rows draw exactly what an unpadded model draws (a contiguous view of the same
            # numel), so padding changes no real weight and no later draw. The padded rows are 0:
            # finite, and with no gradient AdamW's decay and update leave them 0 for good.
            normal(w[: cfg.vocab_size], INIT_STD)
            if not w.is_meta:
                w[cfg.vocab_size:].zero_()

        vocab_rows(self.model.embed_tokens.weight)
        if not cfg.tie_embeddings:
            vocab_rows(self.lm_head.weight)
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                normal(lin.weight, INIT_STD)
            normal(attn.o_proj.weight, residual_std)
            normal(mlp.down_proj.weight, residual_std)
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        self.model.norm.weight.fill_(1.0)
        self.model.rotary_emb.reset_tables()

    def forward(self, input_ids: torch.Tensor, *, hidden_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for `input_ids` (B, T), positions 0..T-1; V is the real vocab_size, padded or not.

        ``hidden_only``: the final-norm hidden states (B, T, C) instead, for a loss
        that applies ``lm_head`` itself, a chunk at a time (albor.loss).
        """
        t = input_ids.shape[1]
        if t > self.config.max_position_embeddings:
            raise ConfigError(
                f"sequence length {t} exceeds ModelConfig.max_position_embeddings="
                f"{self.config.max_position_embeddings}; shorten seq_len or raise the limit"
            )
        h = self.model(input_ids)  # (B, T, C)
        if hidden_only:
            return h
        logits = self.lm_head(h)  # (B, T, Vp): the matmul over the padded rows, the shape GPUs like
        # A view, not a copy: the loss's float32 upcast copies the real columns only, and the view's
        # backward hands lm_head a gradient that is 0 in the padded columns.
        return logits if self.padded_vocab_size == self.config.vocab_size else logits[..., : self.config.vocab_size]


def _grow_rows(module: nn.Module, size_attr: str, rows: int) -> None:
    """Give ``module`` (an embedding or a linear) a weight of ``rows`` rows: its own, then zeros."""
    w = module.weight.detach()
    module.weight = nn.Parameter(torch.cat((w, w.new_zeros((rows - w.size(0), *w.shape[1:])))))
    setattr(module, size_attr, rows)
