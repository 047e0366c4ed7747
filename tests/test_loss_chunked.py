"""Issue 9, lever 2: the chunked head + cross-entropy equals the full-logits loss, gradients included."""

from __future__ import annotations

import pytest
import torch
import yaml

from albor.config import PretrainConfig
from albor.distributed.step import batch_loss
from albor.loss import chunked_token_loss, token_loss
from albor.model import AlborLlama, model_preset
from albor.pretrain import main

VOCAB = 97  # prime: no chunk size lines up with anything by accident


def _model():
    torch.manual_seed(0)
    return AlborLlama(model_preset("tiny", vocab_size=VOCAB))  # the same weights on every call


def _loss_and_grads(chunk: int, ids: torch.Tensor):
    model = _model()
    inputs, targets = ids[:, :-1], ids[:, 1:]
    if chunk == 0:
        loss = token_loss(model(inputs), targets)
    else:
        loss = chunked_token_loss(model(inputs, hidden_only=True), model.lm_head.weight, targets, chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 7, 16, 25, 32, 1000])  # 2 x 16 = 32 tokens: divides, does not, one, over
def test_loss_and_every_gradient_match_unchunked(chunk):
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))
    ref_loss, ref_grads = _loss_and_grads(0, ids)
    loss, grads = _loss_and_grads(chunk, ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    # The tied embedding (lm_head.weight) gets both its head and its lookup gradient.
    assert "model.embed_tokens.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_direct_gradients_of_hidden_and_weight():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(23, 8, generator=g, requires_grad=True)
    w = torch.randn(VOCAB, 8, generator=g, requires_grad=True)
    t = torch.randint(0, VOCAB, (23,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t)
    ref_h, ref_w = torch.autograd.grad(ref * 3.0, (h, w))  # a non-unit upstream gradient
    out = chunked_token_loss(h[None], w, t[None], 5)
    got_h, got_w = torch.autograd.grad(out * 3.0, (h, w))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_h, ref_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-7)


def test_bf16_logits_are_the_heads_own():
    """Under bf16 each chunk's logits are the bf16 matmul upcast, as lm_head + token_loss computes them."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 30, 16, generator=g).bfloat16()
    w = (torch.randn(VOCAB, 16, generator=g) * 0.2).bfloat16()
    t = torch.randint(0, VOCAB, (2, 30), generator=g)
    ref = token_loss(h @ w.t(), t)
    torch.testing.assert_close(chunked_token_loss(h, w, t, 7), ref, rtol=1e-5, atol=0)


def test_no_grad_validation_path():
    h, w = torch.randn(1, 9, 4), torch.randn(VOCAB, 4)
    t = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(chunked_token_loss(h, w, t, 4), token_loss(h @ w.t(), t), rtol=1e-5, atol=0)


def test_batch_loss_goes_through_the_engine_either_way():
    """The step and the validation call batch_loss: chunked and unchunked give the same number."""
    model = _model()
    engine = type("Engine", (), {"module": model, "__call__": lambda self, x, **kw: model(x, **kw)})()
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))
    full = batch_loss(engine, ids[:, :-1], ids[:, 1:], 0)
    torch.testing.assert_close(batch_loss(engine, ids[:, :-1], ids[:, 1:], 10), full, rtol=1e-5, atol=0)


def test_a_batch_within_one_chunk_takes_the_plain_path():
    """Chunking a batch that fits in one chunk would save nothing and recompute its logits in backward."""
    model, calls = _model(), []

    def forward(self, x, **kw):
        calls.append(kw)
        return model(x, **kw)

    engine = type("Engine", (), {"module": model, "__call__": forward})()
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(3))  # 32 target tokens
    batch_loss(engine, ids[:, :-1], ids[:, 1:], 32)
    batch_loss(engine, ids[:, :-1], ids[:, 1:], 31)
    assert calls == [{}, {"hidden_only": True}]


def test_flag_reaches_the_config(capsys, tmp_path):
    (tmp_path / "index.json").write_text("{}")
    assert main(["--dataset", str(tmp_path), "--loss-chunk-tokens", "0", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["loss_chunk_tokens"] == 0


def test_chunk_size_validated(tmp_path):
    (tmp_path / "index.json").write_text("{}")
    assert PretrainConfig(dataset=tmp_path).loss_chunk_tokens == 4096
    assert PretrainConfig(dataset=tmp_path, loss_chunk_tokens=0).loss_chunk_tokens == 0
    with pytest.raises(Exception, match="loss_chunk_tokens must be an integer >= 0"):
        PretrainConfig(dataset=tmp_path, loss_chunk_tokens=-1)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        chunked_token_loss(torch.zeros(1, 2, 4), torch.zeros(3, 4), torch.zeros(1, 2, dtype=torch.long), 0)
