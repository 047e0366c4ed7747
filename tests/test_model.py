"""Unit tests of albor.model: config, presets, counts, forward, init, HF naming."""

from __future__ import annotations

import math

import pytest
import torch

from albor.errors import ConfigError
from albor.model import (
    PRESETS,
    AlborLlama,
    ModelConfig,
    flops_per_token,
    load_hf_state_dict,
    model_preset,
    non_embedding_parameters,
    num_parameters,
    to_hf_state_dict,
)

VOCAB = 512  # small vocab keeps the tiny model's logits cheap


def tiny(**changes: object) -> ModelConfig:
    return model_preset("tiny", vocab_size=VOCAB).replace(**changes)


def module_count(model: torch.nn.Module) -> int:
    # parameters() deduplicates shared tensors, so a tied head counts once.
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- config


def test_albor_370m_preset_matches_readme() -> None:
    cfg = model_preset("albor-370m")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (1024, 24, 16, 4)
    assert (cfg.head_dim, cfg.intermediate_size) == (64, 2816)
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.rope_theta == 10000.0
    assert cfg.vocab_size == 50257
    assert cfg.max_position_embeddings == 4096
    assert cfg.tie_embeddings is True


def test_tiny_preset_has_gqa_and_tying() -> None:
    cfg = model_preset("tiny")
    assert cfg.num_kv_heads < cfg.num_heads
    assert cfg.tie_embeddings is True
    assert cfg.hidden_size == cfg.num_heads * cfg.head_dim
    assert set(PRESETS) == {"albor-370m", "tiny"}


def test_vocab_override_changes_only_vocab() -> None:
    base = model_preset("albor-370m")
    cfg = model_preset("albor-370m", vocab_size=32000)
    assert cfg.vocab_size == 32000
    assert cfg.replace(vocab_size=base.vocab_size) == base


def test_unknown_preset_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="albor-370m") as err:
        model_preset("albor-7b")
    assert "tiny" in str(err.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"hidden_size": 100}, "hidden_size"),
        ({"num_layers": 0}, "num_layers"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"num_layers": True}, "num_layers"),
        ({"head_dim": 2.0}, "head_dim"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"rope_theta": float("nan")}, "rope_theta"),
        ({"tie_embeddings": 1}, "tie_embeddings"),
        ({"num_heads": 3, "num_kv_heads": 1, "head_dim": 33, "hidden_size": 99}, "head_dim"),
    ],
)
def test_invalid_config_names_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}"):
        tiny(**changes)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        tiny().num_layers = 2  # type: ignore[misc]


# ---------------------------------------------------------------- counts


def test_370m_parameter_count_on_meta_device() -> None:
    cfg = model_preset("albor-370m")
    with torch.device("meta"):
        model = AlborLlama(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = module_count(model)
    with_head = unique + model.lm_head.weight.numel()
    assert unique == num_parameters(cfg, count_tied_head=False)
    assert with_head == num_parameters(cfg, count_tied_head=True)
    assert 366_000_000 <= with_head <= 374_000_000
    # Hand count: embed 50257*1024; layer 2*1024^2 + 2*1024*256 + 3*1024*2816 + 2*1024; final norm 1024.
    assert unique == 322_045_952
    assert with_head == 373_509_120


@pytest.mark.parametrize("tie", [True, False])
def test_formula_equals_module_count_tiny(tie: bool) -> None:
    cfg = tiny(tie_embeddings=tie)
    model = AlborLlama(cfg)
    assert module_count(model) == num_parameters(cfg, count_tied_head=False)
    head = cfg.vocab_size * cfg.hidden_size
    assert num_parameters(cfg, count_tied_head=True) == module_count(model) + (head if tie else 0)


def test_flops_per_token_hand_example() -> None:
    cfg = ModelConfig(
        hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
        intermediate_size=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        vocab_size=10, max_position_embeddings=32, tie_embeddings=True,
    )  # fmt: skip
    # layer: q 64 + k,v 2*32 + o 64 + mlp 3*8*16=384 + norms 16 = 592
    assert num_parameters(cfg, count_tied_head=False) == 80 + 2 * 592 + 8
    assert num_parameters(cfg, count_tied_head=True) == 80 + 2 * 592 + 8 + 80
    # N drops the input embedding (a lookup), keeps the head matmul.
    assert non_embedding_parameters(cfg) == 2 * 592 + 8 + 80 == 1272
    # 6*1272 + 12 * L2 * H2 * Q4 * T16
    assert flops_per_token(cfg, 16) == 7632 + 3072 == 10704
    with pytest.raises(ValueError):
        flops_per_token(cfg, 0)


# ---------------------------------------------------------------- forward


def test_forward_shape_and_dtype() -> None:
    torch.manual_seed(0)
    model = AlborLlama(tiny())
    ids = torch.randint(0, VOCAB, (3, 17))
    logits = model(ids)
    assert logits.shape == (3, 17, VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    model = model.to(torch.bfloat16)
    assert model(ids).dtype == torch.bfloat16
    # the RoPE table must survive the cast in float32
    assert model.model.rotary_emb.cos.dtype == torch.float32


def test_causality() -> None:
    torch.manual_seed(0)
    model = AlborLlama(tiny()).eval()
    ids = torch.randint(0, VOCAB, (2, 32))
    k = 20
    changed = ids.clone()
    changed[:, k] = (changed[:, k] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=1e-6)
    assert (a[:, k:] - b[:, k:]).abs().amax() > 1e-3  # the change is visible downstream


def test_sequence_longer_than_max_positions_is_rejected() -> None:
    model = AlborLlama(tiny(max_position_embeddings=16))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_meta_build_then_materialise() -> None:
    with torch.device("meta"):
        model = AlborLlama(tiny())
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    # to_empty() unties the head (each module gets its own fresh tensor; the head's is garbage):
    # init_weights ties it again, or the logits would come from uninitialised memory, now and then.
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 8)))).all()
    ref = AlborLlama(tiny())
    torch.testing.assert_close(model.model.rotary_emb.cos, ref.model.rotary_emb.cos, rtol=0, atol=0)


# ---------------------------------------------------------------- init


def test_init_is_deterministic_under_seed() -> None:
    torch.manual_seed(1234)
    a = AlborLlama(tiny()).state_dict()
    torch.manual_seed(1234)
    b = AlborLlama(tiny()).state_dict()
    torch.manual_seed(4321)
    c = AlborLlama(tiny()).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


def test_init_with_generator_is_deterministic() -> None:
    a, b = AlborLlama(tiny()), AlborLlama(tiny())
    a.init_weights(torch.Generator().manual_seed(7))
    b.init_weights(torch.Generator().manual_seed(7))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_init_statistics() -> None:
    torch.manual_seed(0)
    cfg = tiny()
    model = AlborLlama(cfg)
    layer = model.model.layers[1]
    residual = 0.02 / math.sqrt(2 * cfg.num_layers)
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(cfg.hidden_size))
    assert torch.equal(model.model.norm.weight, torch.ones(cfg.hidden_size))


# ---------------------------------------------------------------- HF names


def expected_hf_names(n_layers: int) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for n in range(n_layers):
        p = f"model.layers.{n}."
        names |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    return names


def test_state_dict_keys_are_hf_names() -> None:
    model = AlborLlama(tiny())
    assert set(model.state_dict()) == expected_hf_names(4)
    assert set(to_hf_state_dict(model)) == expected_hf_names(4) - {"lm_head.weight"}
    assert set(to_hf_state_dict(model, include_tied_head=True)) == expected_hf_names(4)
    untied = AlborLlama(tiny(tie_embeddings=False))
    assert set(to_hf_state_dict(untied)) == expected_hf_names(4)


def test_load_round_trip_with_and_without_head() -> None:
    torch.manual_seed(0)
    src = AlborLlama(tiny())
    ids = torch.randint(0, VOCAB, (1, 8))
    for include in (False, True):
        dst = AlborLlama(tiny())
        load_hf_state_dict(dst, to_hf_state_dict(src, include_tied_head=include))
        assert dst.lm_head.weight is dst.model.embed_tokens.weight  # still tied
        torch.testing.assert_close(dst(ids), src(ids), rtol=0, atol=0)


def test_load_rejects_mismatches() -> None:
    model = AlborLlama(tiny())
    sd = to_hf_state_dict(AlborLlama(tiny()))
    with pytest.raises(ConfigError, match="unknown 1: model.layers.9.mlp.up_proj.weight"):
        load_hf_state_dict(model, {**sd, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    partial = dict(sd)
    del partial["model.norm.weight"]
    with pytest.raises(ConfigError, match="missing 1: model.norm.weight"):
        load_hf_state_dict(model, partial)
    with pytest.raises(ConfigError, match="shape"):
        load_hf_state_dict(model, {**sd, "model.norm.weight": torch.ones(3)})
    untied = {**sd, "lm_head.weight": torch.randn_like(sd["model.embed_tokens.weight"])}
    with pytest.raises(ConfigError, match="tie_embeddings"):
        load_hf_state_dict(model, untied)
    # an untied model needs its head
    with pytest.raises(ConfigError, match="missing 1: lm_head.weight"):
        load_hf_state_dict(AlborLlama(tiny(tie_embeddings=False)), sd)
