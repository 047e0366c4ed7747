"""Continuing an interrupted run: choose the checkpoint, agree on it across ranks, check it fits, restore it.

Every rank reads the run directory itself (it must be on storage every rank
sees); the ranks then compare what they found in one small all-reduce, so a
node with a stale or missing copy stops the job with one clear error instead
of loading another state than its peers. docs/checkpoints.md describes what a
checkpoint holds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from albor.config import PretrainConfig
from albor.distributed.process_group import DistEnv
from albor.distributed.resume import restore
from albor.errors import AlborError, ConfigError, DataError
from albor.loop import PretrainLoop
from albor.resume_plan import (
    CheckpointOnDisk,
    check_compatible,
    find_resume_point,
    remove_debris,
    scan_checkpoints,
    truncate_metrics,
)
from albor.run_files import METRICS_FILE, clear_rank_records

log = logging.getLogger("albor")


def choose_checkpoint(
    config: PretrainConfig, env: DistEnv, identity: Mapping[str, Any], *, gradient_accumulation: int
) -> CheckpointOnDisk | None:
    """The checkpoint this run continues (None: a fresh start), the same on every rank, checked against the run."""
    point = find_resume_point(config.output_dir, config.resume)
    steps = env.per_rank(-1.0 if point is None else float(point.step))
    if len(set(steps)) > 1:
        seen = ", ".join(f"rank {r}: {'none' if s < 0 else f'step {int(s)}'}" for r, s in enumerate(steps))
        raise ConfigError(
            f"the ranks found different checkpoints in {config.output_dir / 'ckpt'} ({seen}): put --output-dir on "
            "storage every node shares, or copy the whole run directory to each node"
        )
    if point is None:
        log.info("resume: no complete checkpoint in %s; starting from step 0", config.output_dir / "ckpt")
        return None
    check_compatible(point, identity, world_size=env.world_size, gradient_accumulation=gradient_accumulation)
    log.info("resume: continuing from %s", point.describe())
    return point


def prepare_run_dir(config: PretrainConfig, env: DistEnv, point: CheckpointOnDisk | None) -> None:
    """Rank 0 removes debris and the metrics rows written after ``point``; every rank learns how that went."""
    error: AlborError | None = None
    if env.is_main:
        try:
            remove_debris(scan_checkpoints(config.output_dir).debris, log)
            # Rows the interrupted run wrote after its checkpoint: each step is logged once.
            dropped = truncate_metrics(config.output_dir / METRICS_FILE, keep_below_step=point.step if point else 0)
            if dropped:
                log.info("resume: dropped %d metrics.jsonl row(s) written after the checkpoint", dropped)
            # The earlier attempt's ranks said how they ended; this attempt's ranks (perhaps fewer) say it anew.
            clear_rank_records(config.output_dir)
        except AlborError as e:
            error = e
        except OSError as e:
            error = ConfigError(f"cannot prepare {config.output_dir} to resume ({e}): check its permissions and space")
    env.raise_together(error, "preparing the run directory")


def restore_run(parts, loop: PretrainLoop, env: DistEnv, point: CheckpointOnDisk) -> dict[str, Any]:
    """Load ``point`` into the engine, the data cursor, the RNGs and the loop (collective); what status.json says of it."""
    restore(parts.engine, env, point.ds_dir.parent, point.tag, saved_world_size=point.world_size,
            loader=parts.data.train_loader)
    loop.load_state_dict(point.loop_state)
    loaded = parts.step_fn.optimizer_state_sha()  # collective: the state this run starts from
    saved = point.metadata["optimizer_state_sha"]
    if loaded != saved:
        raise DataError(
            f"the optimizer state loaded from {point.tag} hashes to {loaded}, but the checkpoint recorded {saved}: "
            "its DeepSpeed files were changed or damaged; resume from another checkpoint (--resume PATH)"
        )
    log.info("resume: loaded optimizer state sha %s (matches %s)", loaded, point.tag)
    return {"tag": point.tag, "step": point.step, "optimizer_state_sha": loaded,
            "saved_world_size": point.world_size}
