"""``--init-from FILE.apr``: the file's format, architecture, names and shapes are checked before its weights are used."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from albor.apr import write_apr
from albor.errors import ConfigError, DataError
from albor.init_from import read_model_file
from albor.model import AlborLlama, load_hf_state_dict, model_preset, to_hf_state_dict


def model_file_metadata(cfg) -> dict:
    """What albor's checkpoint writer records about the architecture (written out here, independently)."""
    return {
        "architecture": "llama", "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "intermediate_size": cfg.intermediate_size, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings, "epoch": 3,
    }


@pytest.fixture
def trained_file(tmp_path):
    cfg = model_preset("tiny", vocab_size=128)
    torch.manual_seed(1)
    source = AlborLlama(cfg)
    path = tmp_path / "epoch-003.apr"
    write_apr(path, to_hf_state_dict(source), model_file_metadata(cfg))
    return path, source, cfg


def test_weights_come_from_the_file(trained_file):
    path, source, cfg = trained_file
    torch.manual_seed(2)  # another init: every tensor differs before the load
    model = AlborLlama(cfg)
    assert not torch.equal(model.model.embed_tokens.weight, source.model.embed_tokens.weight)
    load_hf_state_dict(model, read_model_file(path, cfg, model_name="tiny"))
    for (name, got), want in zip(model.state_dict().items(), source.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(tokens), source(tokens))


def test_another_architecture_is_refused_naming_the_fields(trained_file):
    path, _, cfg = trained_file
    with pytest.raises(ConfigError, match=r"vocab_size 128 \(the run's 256\)") as e:
        read_model_file(path, dataclasses.replace(cfg, vocab_size=256), model_name="tiny")
    assert e.value.exit_code == 2 and "\n" not in str(e.value) and "--model" in str(e.value)


def test_a_damaged_file_is_refused_before_any_weight_is_copied(trained_file):
    path, _, cfg = trained_file
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in the tensor data: the footer CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="not a valid APR v2 checkpoint") as e:
        read_model_file(path, cfg, model_name="tiny")
    assert e.value.exit_code == 3


def test_a_missing_tensor_is_refused(trained_file):
    path, source, cfg = trained_file
    tensors = to_hf_state_dict(source)
    del tensors["model.norm.weight"]
    write_apr(path, tensors, model_file_metadata(cfg))
    with pytest.raises(ConfigError, match="model.norm.weight"):
        read_model_file(path, cfg, model_name="tiny")


def test_a_file_of_no_architecture_albor_builds_is_refused_as_usage(trained_file):
    """Exit 2 like any file that is not the run's --model (albor export, with no run to compare, says 3)."""
    path, source, cfg = trained_file
    write_apr(path, to_hf_state_dict(source), {**model_file_metadata(cfg), "architecture": "gpt2"})
    with pytest.raises(ConfigError, match=r"'gpt2', not 'llama'") as e:
        read_model_file(path, cfg, model_name="tiny")
    assert e.value.exit_code == 2 and str(path) in str(e.value) and "\n" not in str(e.value)
