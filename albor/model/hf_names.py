"""Weights and config in Hugging Face Llama terms.

:class:`AlborLlama`'s module tree already produces the HF tensor names, so the
mapping is the identity, plus two things:

- the tied output head: HF's ``save_pretrained`` drops ``lm_head.weight`` when
  it is tied, and a live ``LlamaForCausalLM``'s ``state_dict()`` lists it; both
  are accepted here;
- the padded vocabulary (``AlborLlama(vocab_multiple=...)``): the embedding and
  the head hold ``padded_vocab_size`` rows inside the model, and
  ``config.vocab_size`` rows everywhere outside it. This module is that
  boundary: :func:`to_hf_state_dict` cuts the padded rows off, and
  :func:`load_hf_state_dict` takes real rows and pads them with zeros.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from albor.errors import ConfigError
from albor.model.config import ModelConfig
from albor.model.llama import AlborLlama

TIED_HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"

# Old HF checkpoints stored RoPE inverse frequencies as persistent buffers;
# they are a function of the config, so they are ignored rather than rejected.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``transformers.LlamaConfig`` (also a valid ``config.json`` body)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # transformers >= 5 reads theta from rope_parameters; 4.x reads rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
    }


VOCAB_ROWS = (EMBED, TIED_HEAD)
"""The tensors with one row per vocabulary entry: padded inside the model, real rows in every file."""


def real_rows(model: AlborLlama, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (the model's parameter `name`, or its fp32 master) cut to the rows a file holds: a view."""
    return tensor[: model.config.vocab_size] if name in VOCAB_ROWS else tensor


def padded_rows(model: AlborLlama, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A file's ``tensor`` for parameter `name`, with zero rows appended up to the model's padded vocabulary.

    Zeros, as :meth:`AlborLlama.init_weights` sets them: the rows are never
    predicted, so what they hold changes no output, and zeros stay finite
    (and stay zeros) under AdamW.
    """
    extra = model.padded_vocab_size - model.config.vocab_size
    if name not in VOCAB_ROWS or extra == 0:
        return tensor
    return torch.cat((tensor, tensor.new_zeros((extra, *tensor.shape[1:]))))


def to_hf_state_dict(model: AlborLlama, include_tied_head: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights under their HF names (detached, sharing storage with the model).

    The vocabulary tensors hold the real ``config.vocab_size`` rows only (a
    padded model's extra rows cut off). With tied embeddings ``lm_head.weight``
    is left out, as HF's ``save_pretrained`` does, unless `include_tied_head`
    (for a strict ``LlamaForCausalLM.load_state_dict``).
    """
    sd = {name: real_rows(model, name, t) for name, t in model.state_dict().items()}
    if model.config.tie_embeddings and not include_tied_head:
        sd.pop(TIED_HEAD, None)
    return sd


def load_hf_state_dict(model: AlborLlama, sd: Mapping[str, torch.Tensor]) -> None:
    """Copy HF-named weights `sd` into `model`, in place.

    The vocabulary tensors hold ``config.vocab_size`` rows, as in every file;
    a padded model's extra rows are set to zero. ``lm_head.weight`` is optional
    when the model is tied (and must then equal the embedding). Unknown names,
    missing names and shape mismatches raise :class:`ConfigError` before
    anything is copied.
    """
    tied = model.config.tie_embeddings
    expected = to_hf_state_dict(model, include_tied_head=True)  # the shapes a file holds
    given = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}

    unknown = sorted(set(given) - set(expected))
    missing = sorted(set(expected) - set(given) - ({TIED_HEAD} if tied else set()))
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_names(missing)}")
        if unknown:
            parts.append(f"unknown {len(unknown)}: {_names(unknown)}")
        raise ConfigError(
            "state dict does not match the model config ("
            + "; ".join(parts)
            + "); load it into a model built with the checkpoint's config"
        )
    for name, tensor in given.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConfigError(
                f"tensor {name} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[name].shape)}; load it into a model built with the checkpoint's config"
            )
    if tied and TIED_HEAD in given and not torch.equal(
        given[TIED_HEAD].to(given[EMBED].device), given[EMBED]
    ):
        raise ConfigError(
            "state dict has an lm_head.weight different from model.embed_tokens.weight, "
            "but ModelConfig.tie_embeddings=True; set tie_embeddings=False to load an untied checkpoint"
        )
    full = {name: padded_rows(model, name, t) for name, t in given.items()}
    if tied:
        full[TIED_HEAD] = full[EMBED]
    model.load_state_dict(full, strict=True)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
