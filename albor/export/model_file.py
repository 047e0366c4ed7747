"""The model an export takes: a run's best epoch (or ``--epoch N``), or an ``.apr`` as given; checked whole.

A run's best epoch is the one with the lowest val_loss among its complete epoch
checkpoints (albor.resume_plan.scan_checkpoints: the metadata marker exists and
reads back) whose ``.apr`` is still there. The earliest wins a tie, as the
training loop's own ``best`` does (albor.loop: a later epoch must be strictly lower).

The file is checked before anything is written: magic, version, header and
footer CRC (albor.apr.read_apr), the architecture its metadata records
(albor.model.config.from_apr_metadata), every tensor's name and shape against
that architecture (:func:`model_tensors`, which ``--init-from`` uses too:
albor.init_from), its dtype and its values.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from albor.apr import read_apr
from albor.errors import ConfigError, DataError
from albor.model import AlborLlama, ModelConfig, load_hf_state_dict, to_hf_state_dict
from albor.model.config import from_apr_metadata
from albor.resume_plan import CheckpointOnDisk, best_epoch, scan_checkpoints

_FROM_A_RUN = "export a .apr that albor's training wrote (RUN_DIR/ckpt/epoch-NNN.apr), or the run directory itself"


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A checked model file: its architecture and its weights under Hugging Face names."""

    path: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # the tied lm_head.weight left out, as HF's save_pretrained does
    epoch: int | None  # the epoch its metadata records, if any

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


def model_tensors(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own tensors of ``tensors``, once each name and shape is checked against a model of ``cfg``.

    The names are albor.model.to_hf_state_dict's, those save_pretrained writes: a
    tied ``lm_head.weight`` is left out (it must equal the embedding; HF ties it
    again on load). The model is built on the meta device, which costs no
    memory. ConfigError (albor.model.load_hf_state_dict's) naming what does not fit.
    """
    with torch.device("meta"):
        shape_check = AlborLlama(cfg)
    with warnings.catch_warnings():  # copying into meta tensors is a no-op by design here, and torch says so
        warnings.simplefilter("ignore", UserWarning)
        load_hf_state_dict(shape_check, tensors)  # names, shapes, a tied head equal to the embedding
    return {name: tensors[name] for name in to_hf_state_dict(shape_check)}


def load_model_file(path: Path) -> ModelFile:
    """Read ``path`` and check all of it; DataError (exit 3) naming the first problem.

    Everything here is about the file alone (there is no run's model to compare
    it with, as ``--init-from`` has), so a file that does not fit the
    architecture it records is a damaged or foreign file: exit 3.
    """
    path = Path(path)
    metadata, tensors = read_apr(path)  # magic, version, both CRCs, layout
    try:
        cfg = from_apr_metadata(metadata)
    except ConfigError as e:
        raise DataError(f"{path}: {e}; {_FROM_A_RUN}") from None
    try:
        weights = model_tensors(cfg, tensors)
    except ConfigError as e:
        raise DataError(f"{path}: its tensors do not fit the architecture its metadata records: {e}") from None
    dtypes = {t.dtype for t in weights.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise DataError(f"{path}: its weights have dtypes {sorted(map(str, dtypes))}; an export needs one floating "
                        "dtype (albor writes float32)")
    for name, t in weights.items():
        if not torch.isfinite(t).all():
            raise DataError(f"{path}: tensor {name} holds NaN or Inf; export an earlier epoch (--epoch N)")
    epoch = metadata.get("epoch")
    return ModelFile(path, cfg, weights, epoch if isinstance(epoch, int) else None)
