"""Per-epoch checkpoints: the model as ``.apr`` plus DeepSpeed's sharded state for resuming.

Every rank calls :meth:`EpochCheckpoint.save` (DeepSpeed's save is collective).
Rank 0 writes the ``.apr`` atomically; every rank writes its optimizer shard.
The ranks then agree on success with one small all-reduce, so a failure on
any rank stops every rank the same way, and the epoch's metadata (the
completion marker, written by the loop afterwards) is never written for it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from albor.apr import write_apr
from albor.contract import EpochArtifact
from albor.data.loader import TrainLoader
from albor.distributed.process_group import DistEnv
from albor.loop import CheckpointError
from albor.model import ModelConfig, to_hf_state_dict

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

    def save(self, epoch: int, artifact: EpochArtifact) -> None:
        tag = f"epoch-{epoch:03d}"
        error: str | None = None
        with self.env.patient():  # writing GBs can outlast the step timeout
            try:
                if self.env.is_main:
                    artifact.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
                    tensors = to_hf_state_dict(self.engine.module)
                    write_apr(artifact.checkpoint_path, tensors, apr_metadata(self.model_cfg, {"epoch": epoch}))
            except Exception as e:  # disk full, permissions…: still join the collective save below
                error = f"{type(e).__name__}: {e}"
            try:
                self.engine.save_checkpoint(
                    str(self.ds_dir),
                    tag=tag,
                    client_state={
                        "epoch": epoch,
                        "seed": self.seed,
                        "data_cursor": self.loader.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                    },
                )
            except Exception as e:
                error = error or f"{type(e).__name__}: {e}"
            failed = self.env.any_rank(error is not None)
        if failed:
            if error is not None:
                log.error("rank %d: checkpoint for epoch %d failed: %s", self.env.rank, epoch, error)
            raise CheckpointError(f"writing {tag} failed on rank(s) {', '.join(map(str, failed))}: {error or 'see that rank'}")
        if self.env.is_main:
            self._prune(keep=KEEP_DEEPSPEED_STATES)

    def _prune(self, keep: int) -> None:
        tags = sorted(p for p in self.ds_dir.glob("epoch-*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
