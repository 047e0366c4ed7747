"""The model's shape: a validated, frozen config and its named presets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from albor.errors import ConfigError

_POSITIVE_INTS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-style decoder (pre-norm, RoPE, GQA, SwiGLU, RMSNorm, no biases).

    Validated at construction: an impossible shape raises
    :class:`albor.errors.ConfigError` naming the field and the fix.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    max_position_embeddings: int
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            # bool is an int subclass; True as a layer count is always a mistake.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"ModelConfig.{name}={value!r} is invalid: it must be a positive integer"
                )
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigError(
                    f"ModelConfig.{name}={value!r} is invalid: it must be a finite number > 0"
                )
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(
                f"ModelConfig.tie_embeddings={self.tie_embeddings!r} is invalid: use true or false"
            )
        if self.num_heads % self.num_kv_heads != 0:
            divisors = [d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]
            raise ConfigError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} does not divide "
                f"num_heads={self.num_heads}; set num_kv_heads to one of {divisors}"
            )
        if self.hidden_size != self.num_heads * self.head_dim:
            raise ConfigError(
                f"ModelConfig.hidden_size={self.hidden_size} must equal num_heads * head_dim "
                f"= {self.num_heads} * {self.head_dim} = {self.num_heads * self.head_dim}; "
                f"fix hidden_size, num_heads or head_dim"
            )
        if self.head_dim % 2 != 0:
            # rotate_half splits each head in two halves.
            raise ConfigError(
                f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings; "
                "use an even head_dim and set hidden_size = num_heads * head_dim"
            )

    def replace(self, **changes: object) -> ModelConfig:
        """A copy with `changes` applied, validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


_PRESETS: dict[str, ModelConfig] = {
    # C-LLAMA-370M: the contract's model (373.5M parameters with the head counted, 322.0M unique).
    "albor-370m": ModelConfig(
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=2816,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        vocab_size=50257,
        max_position_embeddings=4096,
        tie_embeddings=True,
    ),
    # For tests and laptops: same architecture (GQA, tied), seconds per step on 2 CPU cores.
    "tiny": ModelConfig(
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=352,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        vocab_size=50257,
        max_position_embeddings=1024,
        tie_embeddings=True,
    ),
}

PRESETS: tuple[str, ...] = tuple(_PRESETS)
"""Names accepted by :func:`model_preset`."""


def model_preset(name: str, vocab_size: int | None = None) -> ModelConfig:
    """The preset called `name`; `vocab_size` (the tokenizer's) replaces the preset's vocab."""
    try:
        cfg = _PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
    if vocab_size is not None:
        cfg = cfg.replace(vocab_size=vocab_size)
    return cfg


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (1: unchanged): the model's embedding and head rows.

    GPT-2's 50257 becomes 50304 at 64: a matmul dimension GPUs tile without a
    ragged edge. The extra rows exist only inside the model (albor.model.llama).
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ConfigError(f"vocab_multiple={multiple!r} is invalid: it must be an integer >= 1 (1: no padding)")
    return -(-vocab_size // multiple) * multiple


# --- the architecture an .apr model file records ------------------------------------------

APR_ARCHITECTURE = "llama"
# ModelConfig field -> its .apr metadata key, where the file uses Hugging Face's name instead.
_APR_KEYS = {"tie_embeddings": "tie_word_embeddings"}


def to_apr_metadata(cfg: ModelConfig) -> dict[str, object]:
    """The architecture as an ``.apr``'s metadata records it (albor.distributed.checkpoint writes it)."""
    return {
        "architecture": APR_ARCHITECTURE,
        **{_APR_KEYS.get(f.name, f.name): getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)},
    }


def from_apr_metadata(metadata: Mapping[str, object]) -> ModelConfig:
    """The architecture an ``.apr``'s metadata records; ConfigError saying why when it records none albor builds.

    The message speaks of "its metadata": the caller names the file, and picks
    the exit code (a file given to --init-from, or one to export).
    """
    if metadata.get("architecture") != APR_ARCHITECTURE:
        raise ConfigError(
            f"its metadata names architecture {metadata.get('architecture')!r}, not {APR_ARCHITECTURE!r}"
        )
    keys = {f.name: _APR_KEYS.get(f.name, f.name) for f in dataclasses.fields(ModelConfig)}
    missing = [key for key in keys.values() if key not in metadata]
    if missing:
        raise ConfigError(f"its metadata lacks {', '.join(missing)}")
    try:
        return ModelConfig(**{name: metadata[key] for name, key in keys.items()})  # type: ignore[arg-type]
    except ConfigError as e:
        raise ConfigError(f"its metadata describes no valid model ({e})") from None
