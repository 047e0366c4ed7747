"""Per-epoch checkpoints: the model as ``.apr``, DeepSpeed's sharded state, then the metadata.

Every rank calls :meth:`EpochCheckpoint.save` (DeepSpeed's save is collective).
Rank 0 writes the ``.apr``, every rank its optimizer shard, and rank 0 then
writes the metadata (the completion marker) and DeepSpeed's ``latest``. One
small all-reduce afterwards tells every rank whether every part succeeded on
every rank; if not, rank 0 removes what it wrote for this epoch and every rank
raises :class:`CheckpointError` together. Earlier epochs are never touched,
except that DeepSpeed states older than the last two are pruned.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from albor.apr import write_apr
from albor.contract import EpochArtifact
from albor.data.loader import TrainLoader
from albor.distributed.compat import checkpoint_writes_through
from albor.distributed.process_group import DistEnv
from albor.loop import CheckpointError
from albor.model import ModelConfig, to_hf_state_dict
from albor.atomic_files import write_json_atomic, write_text_atomic

log = logging.getLogger("albor")

#: DeepSpeed states kept on disk (each is ~12 bytes a parameter); every .apr is kept.
KEEP_DEEPSPEED_STATES = 2


def apr_metadata(cfg: ModelConfig, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "architecture": "llama",
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        **extra,
    }


class EpochCheckpoint:
    """The loop's checkpoint writer for a DeepSpeed run."""

    def __init__(self, engine, env: DistEnv, model_cfg: ModelConfig, loader: TrainLoader, run_dir: Path, *, seed: int):
        self.engine = engine
        self.env = env
        self.model_cfg = model_cfg
        self.loader = loader
        self.ds_dir = Path(run_dir) / "ckpt" / "deepspeed"
        self.seed = seed

    def save(self, epoch: int, artifact: EpochArtifact, metadata: Mapping[str, Any]) -> None:
        tag = f"epoch-{epoch:03d}"
        latest = self.ds_dir / "latest"
        previous_latest: str | None = None
        errors: list[str] = []
        with self.env.startup_timeout():  # writing GBs can outlast the step timeout
            if self.env.is_main:
                try:
                    previous_latest = latest.read_text() if latest.is_file() else None
                except OSError as e:
                    errors.append(f"reading {latest}: {e}")
                _record(errors, lambda: artifact.checkpoint_path.parent.mkdir(parents=True, exist_ok=True))
                if not errors:
                    _record(errors, lambda: write_apr(
                        artifact.checkpoint_path, to_hf_state_dict(self.engine.module),
                        apr_metadata(self.model_cfg, {"epoch": epoch}),
                    ))
            # Every rank joins DeepSpeed's collective save, even after a local failure. The save
            # runs collectives (barriers, a tag check) between its file writes: a write that
            # raised on one rank would skip the rest and leave its peers in a barrier until the
            # timeout. Recorded instead, every rank finishes the same collectives and votes.
            with checkpoint_writes_through(self.engine, lambda write: _record(errors, write)):
                _record(errors, lambda: self.engine.save_checkpoint(
                    str(self.ds_dir), tag=tag, save_latest=False,
                    client_state={
                        "epoch": epoch,
                        "seed": self.seed,
                        "data_cursor": self.loader.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                    },
                ))
            if self.env.is_main and not errors:
                _record(errors, lambda: write_text_atomic(latest, tag))
                _record(errors, lambda: write_json_atomic(artifact.metadata_path, metadata))
            try:
                failed = self.env.ranks_where(bool(errors))
            except BaseException:  # a peer died mid-save: nothing of this epoch may look complete
                if self.env.is_main:
                    self._undo(artifact, tag, previous_latest)
                raise
        if failed:
            error = "; ".join(errors) or "see that rank's log"
            if errors:
                log.error("rank %d: checkpoint for epoch %d failed: %s", self.env.rank, epoch, error)
            if self.env.is_main:
                self._undo(artifact, tag, previous_latest)
            raise CheckpointError(f"writing {tag} failed on rank(s) {', '.join(map(str, failed))}: {error}")
        if self.env.is_main:
            self._prune(keep=KEEP_DEEPSPEED_STATES)

    def _undo(self, artifact: EpochArtifact, tag: str, previous_latest: str | None) -> None:
        """Remove this epoch's files, so no half-written epoch looks complete."""
        latest = self.ds_dir / "latest"
        for undo in (
            lambda: artifact.metadata_path.unlink(missing_ok=True),
            lambda: artifact.checkpoint_path.unlink(missing_ok=True),
            lambda: shutil.rmtree(self.ds_dir / tag, ignore_errors=True),
            (lambda: write_text_atomic(latest, previous_latest)) if previous_latest is not None
            else (lambda: latest.unlink(missing_ok=True)),
        ):
            if (problem := _attempt(undo)) is not None:  # the run stops anyway: report, go on undoing
                log.error("cleaning up the failed epoch: %s", problem)

    def _prune(self, keep: int) -> None:
        # By number: past epoch 999 the names stop sorting as text does ("epoch-1000" < "epoch-999").
        tags = sorted((p for p in self.ds_dir.glob("epoch-*") if p.is_dir() and p.name[6:].isdigit()),
                      key=lambda p: int(p.name[6:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _attempt(action) -> str | None:
    """Run ``action``; the error as text instead of an exception (a vote follows)."""
    try:
        action()
        return None
    except Exception as e:  # disk full, permissions, a failed collective…
        return f"{type(e).__name__}: {e}"


def _record(errors: list[str], action) -> None:
    if (problem := _attempt(action)) is not None:
        errors.append(problem)
