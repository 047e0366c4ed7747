"""``--init-from FILE.apr``: start a new run (fresh optimizer, step 0) from a model file.

The file is checked before any weight is copied: magic, version, header and
footer CRC (albor.apr.read_apr), then the architecture its metadata records
(albor.model.config.from_apr_metadata) against the run's model, then every
tensor's name and shape (albor.export.model_file.model_tensors, as ``albor
export`` checks them). A file that does not fit is one clear error, before
anything is built; the weights then go into the built engine's fp32 master
partitions (albor.distributed.resume.load_fp32_masters).

Exit codes: a file that cannot be read as an APR v2 file is 3 (data), as
everywhere. One that reads but is not a model of the run's ``--model`` (another
architecture, other sizes, tensors that do not fit) is 2 (usage, as
docs/exit-codes.md lists it): the file is checked against a model the user
chose, and the fix is a flag, another file or another ``--model``. ``albor
export`` has no run's model to compare with, so there the same file is a
damaged or foreign one: 3.
"""

from __future__ import annotations

from pathlib import Path

import torch

from albor.apr import read_apr
from albor.errors import ConfigError
from albor.export.model_file import model_tensors
from albor.model import ModelConfig
from albor.model.config import from_apr_metadata, to_apr_metadata

# Not compared: the longest sequence the rotary embedding serves fixes no tensor's shape or meaning.
_NOT_IN_THE_WEIGHTS = ("max_position_embeddings",)


def read_model_file(path: Path, cfg: ModelConfig, *, model_name: str) -> dict[str, torch.Tensor]:
    """The weights of the ``.apr`` at ``path`` (HF names) for a model of ``cfg``; ConfigError/DataError if it does not fit."""
    metadata, tensors = read_apr(path)  # DataError (exit 3) for a malformed or corrupted file
    try:
        theirs = to_apr_metadata(from_apr_metadata(metadata))
    except ConfigError as e:
        raise ConfigError(f"--init-from {path}: {e}; pass a model file albor's training wrote") from None
    ours = to_apr_metadata(cfg)
    differ = [
        f"{key} {theirs[key]!r} (the run's {ours[key]!r})"
        for key in ours
        if key not in _NOT_IN_THE_WEIGHTS and theirs[key] != ours[key]
    ]
    if differ:
        raise ConfigError(
            f"--init-from {path} does not fit the run's model {model_name!r}: {'; '.join(differ)}; pass the --model "
            "preset and the dataset (its tokenizer sets the vocabulary) the file was trained with"
        )
    weights = model_tensors(cfg, tensors)  # names and shapes (ConfigError), before anything is built
    return {name: t.clone() for name, t in weights.items()}  # own storage, not views of the file's buffer
