"""The model an export takes: a run's best epoch (or ``--epoch N``), or an ``.apr`` as given; checked whole.

A run's best epoch is the one with the lowest val_loss among its complete epoch
checkpoints (albor.resume_plan.scan_checkpoints: the metadata marker exists and
reads back) whose ``.apr`` is still there. The earliest wins a tie, as the
training loop's own ``best`` does (albor.loop: a later epoch must be strictly lower).

The file is checked before anything is written: magic, version, header and
footer CRC (albor.apr.read_apr), the architecture its metadata records, and
every tensor's name and shape against that architecture
(albor.model.load_hf_state_dict), its dtype and its values.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from albor.apr import read_apr
from albor.errors import ConfigError, DataError
from albor.model import AlborLlama, ModelConfig, load_hf_state_dict, to_hf_state_dict
from albor.resume_plan import CheckpointOnDisk, best_epoch, scan_checkpoints

# ModelConfig field -> its .apr metadata key, where the checkpoint writer
# (albor.distributed.checkpoint.apr_metadata) uses Hugging Face's name instead.
_APR_KEYS = {"tie_embeddings": "tie_word_embeddings"}
_FROM_A_RUN = "export a .apr that albor's training wrote (RUN_DIR/ckpt/epoch-NNN.apr), or the run directory itself"


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A checked model file: its architecture and its weights under Hugging Face names."""

    path: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # the tied lm_head.weight left out, as HF's save_pretrained does
    epoch: int | None  # the epoch its metadata records, if any
    val_loss: float | None  # the epoch's val_loss when the file came from a run

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.weights.values())).dtype

    @property
    def dtype_name(self) -> str:
        """The dtype as config.json and the console name it: "float32"."""
        return str(self.dtype).removeprefix("torch.")

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.weights.values())


def epochs_with_model_file(run_dir: Path) -> list[CheckpointOnDisk]:
    """The run's complete epoch checkpoints whose ``.apr`` is still there, by epoch."""
    scan = scan_checkpoints(run_dir)
    found = [c for c in scan.resumable + scan.complete_not_resumable if c.kind == "epoch" and c.apr_path is not None]
    return sorted(found, key=lambda c: c.epoch)


def choose_epoch(run_dir: Path, epoch: int | None) -> CheckpointOnDisk:
    """The epoch ``epoch``, or the one with the lowest val_loss; ConfigError naming what there is otherwise."""
    found = epochs_with_model_file(run_dir)
    if not found:
        raise ConfigError(
            f"run {run_dir} has no complete epoch checkpoint with a model file (ckpt/epoch-NNN.apr and its "
            f".metadata.json); export a run that finished at least one epoch, or pass a .apr file"
        )
    listed = ", ".join(str(c.epoch) for c in found)
    if epoch is not None:
        for c in found:
            if c.epoch == epoch:
                return c
        raise ConfigError(
            f"--epoch {epoch}: run {run_dir} has no complete epoch {epoch} with its model file; "
            f"pass one of the epochs it has: {listed}"
        )
    if (best := best_epoch(found)) is None:
        raise ConfigError(f"no epoch of run {run_dir} records a finite val_loss; pick one with --epoch N (of {listed})")
    return best


def model_config_from_metadata(path: Path, metadata: Mapping[str, Any]) -> ModelConfig:
    """The architecture a ``.apr``'s metadata records; DataError when it records none albor can build."""
    if metadata.get("architecture") != "llama":
        raise DataError(f"{path}: its metadata names architecture {metadata.get('architecture')!r}, not 'llama'; "
                        + _FROM_A_RUN)
    keys = {f.name: _APR_KEYS.get(f.name, f.name) for f in dataclasses.fields(ModelConfig)}
    missing = [key for key in keys.values() if key not in metadata]
    if missing:
        raise DataError(f"{path}: its metadata lacks {', '.join(missing)}; " + _FROM_A_RUN)
    try:
        return ModelConfig(**{name: metadata[key] for name, key in keys.items()})
    except ConfigError as e:
        raise DataError(f"{path}: its metadata describes no valid model ({e}); " + _FROM_A_RUN) from None


def load_model_file(path: Path, *, val_loss: float | None = None) -> ModelFile:
    """Read ``path`` and check all of it; DataError (exit 3) naming the first problem."""
    path = Path(path)
    metadata, tensors = read_apr(path)  # magic, version, both CRCs, layout
    cfg = model_config_from_metadata(path, metadata)
    with torch.device("meta"):  # shapes only: costs no memory
        shape_check = AlborLlama(cfg)
    with warnings.catch_warnings():  # copying into meta tensors is a no-op by design here, and torch says so
        warnings.simplefilter("ignore", UserWarning)
        try:
            load_hf_state_dict(shape_check, tensors)  # names, shapes, a tied head equal to the embedding
        except ConfigError as e:
            raise DataError(f"{path}: its tensors do not fit the architecture its metadata records: {e}") from None
    # Only the model's own tensors, under the names save_pretrained writes (HF re-ties the head on load).
    weights = {name: tensors[name] for name in to_hf_state_dict(shape_check)}
    dtypes = {t.dtype for t in weights.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise DataError(f"{path}: its weights have dtypes {sorted(map(str, dtypes))}; an export needs one floating "
                        "dtype (albor writes float32)")
    for name, t in weights.items():
        if not torch.isfinite(t).all():
            raise DataError(f"{path}: tensor {name} holds NaN or Inf; export an earlier epoch (--epoch N)")
    epoch = metadata.get("epoch")
    return ModelFile(path, cfg, weights, epoch if isinstance(epoch, int) else None, val_loss)
