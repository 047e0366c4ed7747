"""Data: tokenizer, token shards, prepare-data, dataset resolution, loaders.

Names are imported lazily so that ``albor prepare-data`` does not pay for
importing torch (only the loader needs it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Split": "albor.data.loader",
    "TokenDataset": "albor.data.loader",
    "TrainLoader": "albor.data.loader",
    "ValidationLoader": "albor.data.loader",
    "resolve_dataset": "albor.data.resolve",
    "Tokenizer": "albor.data.tokenizer",
    "load_tokenizer": "albor.data.tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'albor.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
