"""The training loss: mean token cross-entropy, computed in float32.

:func:`token_loss` takes the model's full ``(B, T, V)`` logits. At vocab 50257
those logits, their float32 copy and its gradient dominate a step's memory, so
:func:`chunked_token_loss` takes the final hidden states and the head weight
instead and never holds more than ``chunk_tokens`` rows of logits: the forward
keeps only each token's log-sum-exp, and the backward recomputes one chunk of
logits at a time. Each logit is the same number either way (the head's matmul
in the compute dtype, then upcast); only the order of the final sums differs.

A padded head (``AlborLlama(vocab_multiple=...)``: more rows than the
vocabulary) is never predicted: :func:`token_loss` gets the model's logits with
the padded columns already sliced off, and :func:`chunked_token_loss` takes the
real ``vocab_size`` and slices each chunk's logits the same way. Slicing, not
masking with -inf: the view costs nothing, the float32 upcast then copies only
the real columns, no -inf ever enters a sum, and the loss is exactly the real
vocabulary's. The matmuls still run over every row (the aligned shape is what
the padding is for); the padded columns of the softmax gradient are zero, so
the padded head rows get a gradient of exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the batch's tokens, computed in float32."""
    # logits (B, T, V), targets (B, T)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def chunked_token_loss(
    hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
    *, vocab_size: int | None = None,
) -> torch.Tensor:
    """``token_loss((hidden @ head_weight.T)[..., :vocab_size], targets)``, ``chunk_tokens`` tokens of logits at a time.

    hidden (B, T, C) and head_weight (Vp, C) in the compute dtype; targets (B, T).
    ``vocab_size``: the real vocabulary when the head is padded (Vp > V rows; the
    model's ``config.vocab_size``); None: every row is a real token.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be >= 1 (got {chunk_tokens})")
    rows = head_weight.size(0)
    vocab = rows if vocab_size is None else vocab_size
    if not 0 < vocab <= rows:
        raise ValueError(f"vocab_size must be in [1, {rows}] (the head's rows), got {vocab_size}")
    c = hidden.size(-1)
    return _ChunkedLinearCrossEntropy.apply(
        hidden.reshape(-1, c), head_weight, targets.reshape(-1), chunk_tokens, vocab
    )


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, vocab: int) -> torch.Tensor:
    """One chunk's logits, first ``vocab`` columns: the matmul in the compute dtype (as ``lm_head``), then float32."""
    logits = h @ weight.t()  # (chunk, Vp): all rows, the aligned shape
    return (logits[:, :vocab] if vocab < logits.size(1) else logits).float()


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE of ``h @ W.T``; saves h, W and one float per token, recomputes logits in backward."""

    @staticmethod
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, vocab: int
    ) -> torch.Tensor:
        n = h.size(0)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = _chunk_logits(h[start:stop], weight, vocab)  # (chunk, V): the padded columns left out
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[start:stop, None]).squeeze(1)
            total += (lse[start:stop] - picked).sum()
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk = chunk
        ctx.vocab = vocab
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        h, weight, targets, lse = ctx.saved_tensors
        n, chunk, vocab = h.size(0), ctx.chunk, ctx.vocab
        scale = grad_out.float() / n
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        # float32 accumulation over chunks: a bf16 weight's gradient is rounded once, at the end.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            h_c = h[start:stop]
            # d(lse - logit[t]) / d logits = softmax - onehot(t); in place: one chunk-sized buffer,
            # all Vp columns, so the two matmuls below keep the padded (aligned) shape.
            g = _chunk_logits(h_c, weight, weight.size(0)).sub_(lse[start:stop, None]).exp_()
            if vocab < g.size(1):
                g[:, vocab:] = 0.0  # never predicted: no gradient (overwrites, so an overflow there cannot leak)
            rows = torch.arange(stop - start, device=g.device)
            g[rows, targets[start:stop]] -= 1.0  # unique (row, col) pairs: a plain, deterministic index_put
            g = g.mul_(scale).to(h.dtype)  # back to the compute dtype, as autograd through lm_head would be
            if need_h:
                torch.mm(g, weight, out=grad_h[start:stop])
            if need_w:
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.t(), h_c)
                else:  # a (V, C) product in the compute dtype, summed in float32
                    grad_w += g.t() @ h_c
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None
