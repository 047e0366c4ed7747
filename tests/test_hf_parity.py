"""albor's decoder against transformers' LlamaForCausalLM on the same weights (float32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# A declared test dependency (pyproject's [test] extra): a broken install must fail
# this module, not skip it and drop the parity claim without a word.
import transformers

from albor.model import AlborLlama, hf_config_dict, load_hf_state_dict, model_preset, to_hf_state_dict

VOCAB = 1000
# Not transformers' default (10000): a theta that never reached LlamaConfig would
# leave HF at 10000 and move the logits by ~1e-2, far past the 1e-4 checked below.
ROPE_THETA = 500000.0
GRAD_NAMES = (
    "model.embed_tokens.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.2.mlp.down_proj.weight",
    "model.norm.weight",
)


def build_pair(attn: str) -> tuple[AlborLlama, torch.nn.Module]:
    cfg = model_preset("tiny", vocab_size=VOCAB).replace(rope_theta=ROPE_THETA)
    assert cfg.num_kv_heads < cfg.num_heads and cfg.tie_embeddings  # exercise GQA and tying
    torch.manual_seed(0)
    ours = AlborLlama(cfg)
    with torch.no_grad():
        # Norm weights of 1 would hide a misplaced scale; make every tensor random.
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf_cfg = transformers.LlamaConfig(**hf_config_dict(cfg), attn_implementation=attn)
    hf = transformers.LlamaForCausalLM(hf_cfg)
    # HF's own RoPE frequencies, against the closed form 1 / theta^(2i/d) for d = 32.
    expected_inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq.double(), expected_inv_freq, rtol=1e-6, atol=0)
    hf.load_state_dict(to_hf_state_dict(ours, include_tied_head=True), strict=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return ours.train(), hf.train()  # dropout is 0 in both; train() is what pretraining runs


def shifted_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_loss_and_grads_match_hf(attn: str) -> None:
    ours, hf = build_pair(attn)
    ids = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(1))

    ours_logits = ours(ids)  # (B, T, V)
    out = hf(input_ids=ids, labels=ids)
    assert (ours_logits - out.logits).abs().max().item() <= 1e-4

    # HF shifts labels inside; our training loss must use the same convention.
    ours_loss = shifted_ce(ours_logits, ids)
    assert abs(ours_loss.item() - out.loss.item()) <= 1e-5

    ours_loss.backward()
    out.loss.backward()
    ours_p, hf_p = dict(ours.named_parameters()), dict(hf.named_parameters())
    for name in GRAD_NAMES:
        g_ours, g_hf = ours_p[name].grad, hf_p[name].grad
        assert g_ours is not None and g_hf is not None, name
        assert g_ours.abs().max() > 0, name  # a zero gradient would pass trivially
        torch.testing.assert_close(g_ours, g_hf, rtol=1e-4, atol=1e-5, msg=name)


def test_round_trip_through_hf() -> None:
    ours, hf = build_pair("eager")
    with torch.no_grad():
        # Change HF's weights so the round trip has something to carry back.
        for p in hf.parameters():
            p.mul_(1.5)
    hf_sd = hf.state_dict()
    assert "lm_head.weight" in hf_sd  # a live HF model lists its tied head
    back = AlborLlama(ours.config)
    load_hf_state_dict(back, hf_sd)
    # Also the save_pretrained form, which drops the tied head.
    back2 = AlborLlama(ours.config)
    load_hf_state_dict(back2, {k: v for k, v in hf_sd.items() if k != "lm_head.weight"})

    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        for model in (back, back2):
            assert model.lm_head.weight is model.model.embed_tokens.weight
            assert (model(ids) - ref).abs().max().item() <= 1e-4
            for name, t in to_hf_state_dict(model, include_tied_head=True).items():
                assert torch.equal(t, hf_sd[name]), name
