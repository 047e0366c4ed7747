"""The run configuration: typed, layered (defaults < mode < YAML < flags), validated.

Everything a user can get wrong here is reported together, in one message,
before anything expensive is built (no model, no process group, no files).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from albor.contract import Regime
from albor.errors import ConfigError

#: Gate 009: a mode sets lr, warmup, target and regime together.
MODE_PRESETS: dict[str, dict[str, Any]] = {
    "finetune": {"lr_max": 5e-5, "warmup_steps": 100, "target_val_loss": 2.2, "regime": Regime.FINETUNE},
    "from-scratch": {"lr_max": 3e-4, "warmup_steps": 1000, "target_val_loss": 3.0, "regime": Regime.FROM_SCRATCH},
}


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Every knob of a pretraining run; defaults are the contract's finetune recipe."""

    dataset: Path | None = None  # token index (or its dir), or a raw corpus
    tokenizer: Path | None = None  # dir with vocab.json + merges.txt; needed for a raw corpus
    output_dir: Path = Path("runs/albor")
    model: str = "albor-370m"  # a preset of albor.model
    ds_config: Path | None = None  # DeepSpeed JSON; None picks one by device
    lr_max: float = 5e-5
    lr_min: float = 1e-6
    warmup_steps: int = 100
    total_steps: int = 1000
    batch_size: int = 16  # micro-batch per rank
    seq_length: int = 1024
    steps_per_epoch: int = 100
    val_batches: int = 20  # validation micro-batches per rank per epoch
    seed: int = 42
    grad_clip: float = 1.0
    weight_decay: float = 0.01
    target_val_loss: float = 2.2
    patience_epochs: int = 2
    min_epochs_before_early_stop: int = 3
    regime: Regime = Regime.FINETUNE
    resume: str | None = None  # "auto" (the newest resumable checkpoint, or a fresh start) or a checkpoint
    init_from: Path | None = None  # a .apr model file a new run starts from (fresh optimizer, step 0)
    preempt_grace_s: float = 120.0  # how long a preemption checkpoint may take before the job ends without it
    tensorboard: bool = False  # also write each step's record to {output_dir}/tensorboard (the tensorboard extra)
    deterministic: bool = True  # deterministic kernels (gate 006); off lets torch pick faster, unordered ones
    loss_chunk_tokens: int = 4096  # tokens per chunk of the head + cross-entropy (albor.loss); 0 = the whole batch at once
    compile: bool | None = None  # torch.compile each decoder layer; None: where it pays (a CUDA device), not on CPUs
    vocab_multiple: int = 64  # embedding and head rows padded to a multiple of this inside the model (1: none); files keep vocab_size
    prefetch: bool = True  # the next batch read (into pinned memory on a GPU) while the current step runs

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    @property
    def num_epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe values, in field order."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Regime):
                value = value.value
            out[f.name] = value
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(PretrainConfig))


def _problems(c: PretrainConfig) -> list[str]:
    p: list[str] = []

    def positive(name: str) -> None:
        value = getattr(c, name)
        if not (value > 0 and math.isfinite(value)):
            p.append(f"{name} must be > 0 (got {value})")

    def non_negative(name: str) -> None:
        value = getattr(c, name)
        if not (value >= 0 and math.isfinite(value)):
            p.append(f"{name} must be >= 0 (got {value})")

    for name in (
        "lr_max", "total_steps", "batch_size", "seq_length", "val_batches", "grad_clip", "target_val_loss", "preempt_grace_s",
    ):
        positive(name)
    for name in ("lr_min", "warmup_steps", "seed", "weight_decay", "patience_epochs", "min_epochs_before_early_stop"):
        non_negative(name)
    if c.steps_per_epoch <= 0:
        p.append(f"steps_per_epoch must be >= 1 (got {c.steps_per_epoch})")
    if isinstance(c.vocab_multiple, bool) or not isinstance(c.vocab_multiple, int) or c.vocab_multiple < 1:
        p.append(f"vocab_multiple must be an integer >= 1, 1 for no padding (got {c.vocab_multiple!r})")
    if c.loss_chunk_tokens < 0:
        p.append(f"loss_chunk_tokens must be an integer >= 0, 0 for no chunking (got {c.loss_chunk_tokens!r})")
    if c.warmup_steps > c.total_steps:
        p.append(f"warmup_steps ({c.warmup_steps}) > total_steps ({c.total_steps}): lower --warmup-steps or raise --total-steps")
    if c.lr_min > c.lr_max:
        p.append(f"lr_min ({c.lr_min}) > lr_max ({c.lr_max}): lr_min must not exceed lr_max")
    if c.seed >= 2**63:
        p.append(f"seed must be < 2**63 (got {c.seed})")
    if c.dataset is None:
        p.append("dataset is required: pass --dataset (a token index, its directory, or a raw corpus)")
    elif _launched_ranks() > 1:
        # Where the dataset is and what it is may differ between nodes: a node that lacks it must not exit
        # before the process group while the others wait for it; the ranks vote on it (run_setup.open_data).
        pass
    elif not c.dataset.exists():
        p.append(f"dataset {c.dataset} does not exist: check --dataset, or run 'albor prepare-data' first")
    elif c.tokenizer is None and not _is_token_index(c.dataset):
        p.append(
            f"dataset {c.dataset} is a raw corpus (no index.json): pass --tokenizer DIR to tokenize it, "
            "or run 'albor prepare-data' first and pass its output"
        )
    if c.tokenizer is not None and not c.tokenizer.is_dir():
        p.append(f"tokenizer {c.tokenizer} is not a directory: pass the directory holding vocab.json and merges.txt")
    if c.ds_config is not None and not c.ds_config.is_file():
        p.append(f"ds_config {c.ds_config} is not a file: pass a DeepSpeed JSON config, or omit --ds-config")
    if c.output_dir.exists() and not c.output_dir.is_dir():
        p.append(f"output_dir {c.output_dir} is a file: choose a directory for --output-dir")
    elif c.output_dir.exists() and (c.output_dir / "metrics.jsonl").exists() and c.resume is None:
        p.append(
            f"output_dir {c.output_dir} already holds a run: choose a new --output-dir, remove the old one, "
            "or pass --resume auto to continue it"
        )
    if c.resume not in (None, "auto") and c.init_from is not None:
        p.append(
            f"--resume {c.resume} and --init-from are exclusive: that checkpoint holds the run's weights; "
            "pass --init-from only to start a new run, or with --resume auto (used when there is no checkpoint yet)"
        )
    if c.init_from is not None and not c.init_from.is_file():
        p.append(f"init_from {c.init_from} is not a file: pass a model file (.apr) to --init-from")
    if c.resume is not None and c.resume != "auto":
        from albor.resume_plan import resume_target_exists  # file-system checks only, no torch

        if not c.resume:
            p.append("resume is empty: pass --resume auto, or a checkpoint of the run in --output-dir")
        elif not resume_target_exists(c.output_dir, c.resume):
            p.append(
                f"resume {c.resume} does not exist: pass --resume auto, or a checkpoint of {c.output_dir} "
                "(its .metadata.json, .apr, DeepSpeed tag directory or tag)"
            )
    if c.tensorboard and importlib.util.find_spec("tensorboard") is None:
        p.append(
            "tensorboard is on but the tensorboard package is not installed: "
            "pip install 'albor[tensorboard]', or drop --tensorboard"
        )
    from albor.model.config import PRESETS  # a plain dataclass table: cheap, no torch

    if c.model not in PRESETS:
        p.append(f"model {c.model!r} is not a known preset: choose one of {', '.join(sorted(PRESETS))}")
    return p


def _launched_ranks() -> int:
    """The world size a launcher announced (1 without one); the environment only, no torch."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _is_token_index(dataset: Path) -> bool:
    """An index.json (any .json file), or a directory holding one: what prepare-data writes."""
    return (dataset.is_file() and dataset.suffix == ".json") or (dataset / "index.json").is_file()


def _coerce(name: str, raw: Any, problems: list[str]) -> Any:
    """Turn a YAML or flag value into the field's type, or note why not."""
    hint = typing.get_type_hints(PretrainConfig)[name]
    if isinstance(hint, types.UnionType):  # X | None
        if raw is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is Regime:
            return Regime(raw)
        if hint is bool:  # only a real boolean: YAML's true/false, a store_true flag
            if not isinstance(raw, bool):
                raise TypeError
            return raw
        if isinstance(raw, bool):
            raise TypeError
        if hint is int:
            if isinstance(raw, float) and not raw.is_integer():
                raise TypeError
            return int(raw)
        if hint is float:
            return float(raw)  # PyYAML reads '3e-4' as a string: accept it
        if hint is Path:
            return Path(str(raw))
        return hint(raw)
    except (TypeError, ValueError):
        allowed = ", ".join(r.value for r in Regime) if hint is Regime else hint.__name__
        problems.append(f"{name}: {raw!r} is not a valid {allowed}")
        return dataclasses.MISSING


def read_yaml(path: Path) -> dict[str, Any]:
    """Load a YAML config file as a mapping (unchecked keys)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}: check --config") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config {path} is not valid YAML{where}: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of field: value, not a {type(data).__name__}")
    return data


def resolve_config(
    *, mode: str | None = None, file_values: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None
) -> PretrainConfig:
    """Build the config from the layers: defaults < ``mode`` < file < flags.

    ``file_values`` may carry a ``mode`` key of its own; a ``mode`` argument wins.
    All problems are collected and raised together as one ConfigError.
    """
    file_values = dict(file_values or {})
    problems: list[str] = []
    mode = mode if mode is not None else file_values.pop("mode", None)
    file_values.pop("mode", None)
    unknown = sorted(set(file_values) - set(FIELD_NAMES))
    if unknown:
        problems.append(f"unknown config key(s) {', '.join(unknown)}: valid keys are {', '.join(FIELD_NAMES)}, mode")
    values: dict[str, Any] = {}
    if mode is not None:
        if mode not in MODE_PRESETS:
            problems.append(f"unknown mode {mode!r}: choose one of {', '.join(MODE_PRESETS)}")
        else:
            values.update(MODE_PRESETS[mode])
    flags = flags or {}
    for layer in (file_values, flags):
        for name, raw in layer.items():
            if name in FIELD_NAMES and raw is not None:
                value = _coerce(name, raw, problems)
                if value is not dataclasses.MISSING:
                    values[name] = value
    # resume and init_from answer one question (where the weights come from). resume: auto keeps
    # init_from as the answer for a run directory with no checkpoint yet (a requeued job's first start);
    # any other flag that answers it replaces the config file's answer (--init-from: a new run;
    # --resume PATH: that checkpoint).
    for chosen, other in (("resume", "init_from"), ("init_from", "resume")):
        if flags.get(chosen) not in (None, "auto") and flags.get(other) is None:
            values.pop(other, None)
    if problems:
        try:  # also report what the well-formed values get wrong, all in one message
            PretrainConfig(**values)
        except ConfigError as e:
            problems.append(str(e).removeprefix("invalid configuration: "))
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return PretrainConfig(**values)
