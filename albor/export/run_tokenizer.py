"""The tokenizer a run was trained with: found from what the run recorded, then checked.

A run's ``config.yaml`` names its dataset, and its tokenizer when one was
passed (a raw corpus needs one). Its ``index.json`` is found by the rule the
run itself followed (albor.data.resolve.run_index): a prepared dataset's own,
or the raw corpus's tokenized cache ``RUN_DIR/data-cache/``. It names the
tokenizer it was made with (``prepare-data --builtin`` ships it inside the
dataset as ``tokenizer/``; ``prepare-data --tokenizer`` and a run's raw-corpus
cache ``RUN_DIR/data-cache/`` record its absolute path), and that tokenizer's
sha256. The epoch's metadata records the dataset's fingerprint, which ties the
index to the run: only an index with that fingerprint vouches for a tokenizer.
A tokenizer that hashes otherwise is refused (exit 3): it would turn the
model's ids into other text than the text it was trained on
(albor.data.tokenizer_match, the check training makes of ``--tokenizer``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from albor.config import read_yaml
from albor.data.resolve import run_index
from albor.data.shards import read_index
from albor.data.tokenizer import Tokenizer, load_tokenizer
from albor.data.tokenizer_match import check_tokenizer_matches, index_tokenizer_dir
from albor.errors import AlborError, ConfigError, DataError
from albor.model import ModelConfig
from albor.run_files import CONFIG_FILE


def run_tokenizer(run_dir: Path, checkpoint_metadata: Mapping[str, Any], given: Path | None) -> Tokenizer:
    """The run's tokenizer (``given`` when not None), checked against the run's dataset where it can be."""
    config, why_not = _run_config(run_dir)
    index_path, index = None, None
    if config is not None:
        index_path, index, why_not = _run_index(run_dir, config, checkpoint_metadata.get("dataset_fingerprint"))
    found = None if index_path is None or index is None else index_tokenizer_dir(index_path, index)
    directory = given or _recorded_path(config, "tokenizer") or found
    if directory is None:
        why_not = why_not or f"its dataset {index_path} names no tokenizer directory that is still there"
        raise ConfigError(
            f"cannot find the tokenizer run {run_dir} was trained with ({why_not}); pass --tokenizer DIR "
            "(the directory with its vocab.json and merges.txt)"
        )
    tokenizer = load_tokenizer(directory)  # hashed once, here
    if index_path is not None and index is not None:
        made = f"run {run_dir} was trained with"
        if given is not None:
            check_tokenizer_matches(tokenizer, index_path, index, made=made, fix="pass that one, or drop --tokenizer")
        else:
            check_tokenizer_matches(tokenizer, index_path, index, named="tokenizer", made=made,
                                    fix="its files changed since: restore them, or pass --tokenizer DIR")
    return tokenizer


def check_tokenizer_fits(tokenizer: Tokenizer, cfg: ModelConfig) -> None:
    """DataError when the tokenizer makes ids the model has no embedding for."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.directory} has {tokenizer.vocab_size} tokens, but the model embeds only "
            f"{cfg.vocab_size}; pass the tokenizer the model was trained with (--tokenizer DIR)"
        )


def _run_config(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """(the run's config.yaml, or None; why not)."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None, f"it has no {CONFIG_FILE}"
    try:
        return read_yaml(path), ""
    except ConfigError as e:
        return None, str(e)


def _recorded_path(config: Mapping[str, Any] | None, key: str) -> Path | None:
    value = None if config is None else config.get(key)
    return Path(value) if isinstance(value, str) and value else None


def _run_index(
    run_dir: Path, config: Mapping[str, Any], fingerprint: str | None
) -> tuple[Path | None, dict[str, Any] | None, str]:
    """(index.json of the run's dataset, its contents, "") when it is still the run's; else (None, None, why)."""
    dataset = _recorded_path(config, "dataset")
    if dataset is None:
        return None, None, f"its {CONFIG_FILE} names no dataset"
    path, cached = run_index(dataset, run_dir)  # the rule the run itself followed
    if not path.is_file():
        if cached and dataset.exists():
            return None, None, f"its raw corpus {dataset} was tokenized into {path.parent}, which is gone"
        return None, None, f"its dataset {dataset} (from {CONFIG_FILE}) is not there"
    try:
        index = read_index(path)
    except AlborError as e:
        return None, None, str(e)
    if fingerprint is not None and index["fingerprint"] != fingerprint:
        return None, None, f"dataset {path} is no longer the one the run trained on (its fingerprint changed)"
    return path, index, ""
