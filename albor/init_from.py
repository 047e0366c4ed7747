"""``--init-from FILE.apr``: start a new run (fresh optimizer, step 0) from a model file.

The file is checked before any weight is copied: magic, version, header and
footer CRC (albor.apr.read_apr), then the architecture its metadata records
against the run's model, then every tensor's name and shape
(albor.model.load_hf_state_dict). A file that does not fit is one clear error,
before anything is built; the weights then go into the built engine's fp32
master partitions (albor.distributed.resume.load_fp32_masters).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from albor.apr import read_apr
from albor.errors import ConfigError
import torch

from albor.model import AlborLlama, ModelConfig, load_hf_state_dict

# .apr metadata key -> ModelConfig field, for every number that fixes the tensors' meaning.
_ARCHITECTURE_FIELDS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_layers",
    "num_heads": "num_heads",
    "num_kv_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
    "intermediate_size": "intermediate_size",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_embeddings",
}


def read_model_file(path: Path, cfg: ModelConfig, *, model_name: str) -> dict[str, torch.Tensor]:
    """The weights of the ``.apr`` at ``path`` (HF names) for a model of ``cfg``; ConfigError/DataError if it does not fit."""
    metadata, tensors = read_apr(path)  # DataError (exit 3) for a malformed or corrupted file
    if metadata.get("architecture") != "llama":
        raise ConfigError(f"--init-from {path}: architecture {metadata.get('architecture')!r}, albor trains 'llama'")
    differ = [
        f"{key} {metadata.get(key)!r} (the run's {getattr(cfg, field)!r})"
        for key, field in _ARCHITECTURE_FIELDS.items()
        if metadata.get(key) != getattr(cfg, field)
    ]
    if differ:
        raise ConfigError(
            f"--init-from {path} does not fit the run's model {model_name!r}: {'; '.join(differ)}; pass the --model "
            "preset and the dataset (its tokenizer sets the vocabulary) the file was trained with"
        )
    weights = {name: t.clone() for name, t in tensors.items()}  # own storage, not views of the file's buffer
    with torch.device("meta"):  # shapes only: costs no memory
        shape_check = AlborLlama(cfg)
    with warnings.catch_warnings():  # copying into meta tensors is a no-op by design here, and torch says so
        warnings.simplefilter("ignore", UserWarning)
        load_hf_state_dict(shape_check, weights)  # names and shapes (ConfigError), before anything is built
    return weights
