"""Parameter and FLOP counts from the config alone (no model is built).

Every count uses the real ``vocab_size``, never a padded one: the rows
``AlborLlama(vocab_multiple=...)`` adds inside the model are neither parameters
of the model users get (no file holds them) nor useful work. So the FLOPs per
token, and with them MFU, are the same whatever ``vocab_multiple``: padding
shows as a higher MFU only if it makes the step faster. For albor-370m N is
322.0M (issue 9's "N = 322M"); counting the 47 padded rows of 50304 would add
48,128 parameters (0.015%).
"""

from __future__ import annotations

from albor.model.config import ModelConfig


def _layer_parameters(cfg: ModelConfig) -> int:
    q = cfg.hidden_size * cfg.num_heads * cfg.head_dim
    kv = 2 * cfg.hidden_size * cfg.num_kv_heads * cfg.head_dim
    o = cfg.num_heads * cfg.head_dim * cfg.hidden_size
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size  # gate, up, down
    norms = 2 * cfg.hidden_size
    return q + kv + o + mlp + norms


def num_parameters(cfg: ModelConfig, count_tied_head: bool) -> int:
    """Parameters of :class:`AlborLlama` built from `cfg` (unpadded: ``vocab_multiple`` 1).

    With tied embeddings the output head is the embedding matrix; it is counted
    a second time only if `count_tied_head` (the "370M" figure counts it, the
    ≈322M unique figure does not). An untied head is always counted.
    """
    embed = cfg.vocab_size * cfg.hidden_size
    head = embed if (count_tied_head or not cfg.tie_embeddings) else 0
    final_norm = cfg.hidden_size
    return embed + cfg.num_layers * _layer_parameters(cfg) + final_norm + head


def non_embedding_parameters(cfg: ModelConfig) -> int:
    """N of the PaLM FLOP formula: every parameter except the input embedding table.

    The input embedding is a lookup and costs no FLOPs, so it is left out (as
    PaLM and torchtitan do). The output head is a real (V x hidden) matmul per
    token, so it stays in once, tied or not.
    """
    return num_parameters(cfg, count_tied_head=True) - cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, PaLM convention: ``6*N + 12*L*H*Q*T``.

    N is :func:`non_embedding_parameters`, L layers, H query heads, Q head dim,
    T `seq_len`. The attention term counts the full T x T score matrix (no
    discount for the causal mask), as PaLM and nanoGPT do, so MFU figures are
    comparable with theirs.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    n = non_embedding_parameters(cfg)
    attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6 * n + attn
