"""Building a run's parts: its data (:func:`open_data`), then the engine and the loop (:func:`build_run`).

``albor.train`` and the overhead benchmark build a run the same way, from here,
so the benchmark measures exactly what ``albor pretrain`` runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from albor.config import PretrainConfig
from albor.data.loader import TokenDataset, TrainLoader, ValidationLoader, index_vocab_size
from albor.data.resolve import resolve_dataset
from albor.determinism import apply_determinism
from albor.distributed.checkpoint import Checkpointer
from albor.distributed.engine import build_engine
from albor.distributed.process_group import DistEnv
from albor.distributed.resume import load_fp32_masters
from albor.distributed.step import DeepSpeedStep
from albor.distributed.validation import DeepSpeedValidation
from albor.errors import AlborError, DataError
from albor.faults import FaultPlan
from albor.loop import PretrainLoop
from albor.model import AlborLlama, ModelConfig, flops_per_token, model_preset
from albor.resume_plan import run_fields
from albor.run_files import RunFiles
from albor.stop_signal import StopSignals
from albor.telemetry import GpuUtilization, peak_flops

log = logging.getLogger("albor")


@dataclasses.dataclass(frozen=True)
class OpenedData:
    """The dataset a run trains on, the model shape it implies, and this rank's loaders."""

    model_cfg: ModelConfig
    dataset: TokenDataset
    train_loader: TrainLoader
    val_loader: ValidationLoader


def open_data(config: PretrainConfig, env: DistEnv) -> OpenedData:
    """Dataset, model shape and loaders; every rank learns how every rank fared.

    A shard corrupted on one node's disk must not leave that node's ranks exiting
    while the others wait in the next collective: one vote, then every rank raises
    an error with the same exit code (the highest any rank met).
    """
    error: AlborError | None = None
    try:
        index_path = resolve_dataset(config.dataset, config.tokenizer, config.output_dir, log=log.info)
        model_cfg = model_preset(config.model, vocab_size=index_vocab_size(index_path))
        dataset = TokenDataset.open(index_path, vocab_size=model_cfg.vocab_size)
        train_loader = TrainLoader(
            dataset.split("train"), micro_batch=config.batch_size, seq_length=config.seq_length,
            rank=env.rank, world_size=env.world_size, seed=config.seed,
        )
        val_loader = ValidationLoader(
            dataset.split("val"), micro_batch=config.batch_size, seq_length=config.seq_length,
            rank=env.rank, world_size=env.world_size, max_batches=config.val_batches,
        )
    except AlborError as e:
        error = e
    except Exception as e:  # unreadable file, out of memory…: still reach the vote
        error = DataError(f"opening the dataset failed: {type(e).__name__}: {e}")
    env.raise_together(error, "opening the dataset")
    return OpenedData(model_cfg, dataset, train_loader, val_loader)


@dataclasses.dataclass(frozen=True)
class RunParts:
    """Everything a run's loop drives, built on every rank."""

    engine: Any  # deepspeed.DeepSpeedEngine
    data: OpenedData
    step_fn: DeepSpeedStep
    val_fn: DeepSpeedValidation
    checkpoint: Checkpointer
    gpu: GpuUtilization
    device_name: str | None  # None on a CPU
    peak_flops: float | None  # of one device; None where unknown (CPUs)

    def loop(
        self, config: PretrainConfig, env: DistEnv, files: RunFiles, *,
        on_step: Callable[[dict], None] | None = None, status_extra: dict[str, Any] | None = None,
        preemption_guard: Callable[[], Any] | None = None,
    ) -> PretrainLoop:
        """The contract loop over these parts, writing through ``files``."""
        model_cfg = self.data.model_cfg
        return PretrainLoop(
            config, self.step_fn, self.val_fn, self.checkpoint,
            vocab_size=model_cfg.vocab_size,
            files=files,
            on_step=on_step,
            metadata_extra={
                "world_size": env.world_size,
                "model": config.model,
                "dataset_fingerprint": self.data.dataset.fingerprint,
                "deterministic": config.deterministic,
                "loss_chunk_tokens": config.loss_chunk_tokens,
                "vocab_size": model_cfg.vocab_size, "regime": config.regime.value,  # albor report: gate 005's epoch-0 cap
                "run": run_fields(
                    config, global_batch=config.batch_size * self.engine.gradient_accumulation_steps() * env.world_size,
                    dataset_fingerprint=self.data.dataset.fingerprint,
                ),
            },
            status_extra={**(status_extra or {}), "deterministic": config.deterministic},
            **({"preemption_guard": preemption_guard} if preemption_guard is not None else {}),
            flops_per_token=flops_per_token(model_cfg, config.seq_length),
            peak_flops=self.peak_flops * env.world_size if self.peak_flops else None,
        )


def _gpu_identity(env: DistEnv) -> tuple[str | None, str | None]:
    """(device name, UUID) of this rank's GPU, or (None, None) on a CPU."""
    if env.device.type != "cuda":
        return None, None
    props = torch.cuda.get_device_properties(env.device)
    return props.name, str(getattr(props, "uuid", "")) or None


def build_run(
    config: PretrainConfig,
    env: DistEnv,
    ds_config: dict[str, Any],
    data: OpenedData,
    *,
    init_weights: Mapping[str, torch.Tensor] | None = None,
    faults: FaultPlan | None = None,
    stop: StopSignals | None = None,
) -> RunParts:
    """Model (from ``init_weights``, an ``--init-from`` file, when given), engine, step, validation, checkpoint writer."""
    # Before the model's first kernel: cuBLAS reads its workspace setting when it creates its handle.
    determinism = apply_determinism(config.deterministic, env.device.type)
    log.info("albor: determinism %s", determinism)
    torch.manual_seed(config.seed)  # identical init on every rank and in every rerun (gate 006)
    model = AlborLlama(data.model_cfg)
    engine = build_engine(model, ds_config, env, lr=config.lr_max, weight_decay=config.weight_decay)
    if init_weights is not None:  # after the build: under bf16 the fp32 masters must come from the file, not the module
        load_fp32_masters(engine, env, init_weights)
    device_name, uuid = _gpu_identity(env)
    gpu = GpuUtilization(uuid)
    step_fn = DeepSpeedStep(
        engine, data.train_loader, env, grad_accumulation=ds_config["gradient_accumulation_steps"], gpu=gpu,
        faults=faults, stop=stop, loss_chunk_tokens=config.loss_chunk_tokens,
    )
    return RunParts(
        engine=engine,
        data=data,
        step_fn=step_fn,
        val_fn=DeepSpeedValidation(engine, data.val_loader, env, faults=faults, loss_chunk_tokens=config.loss_chunk_tokens),
        checkpoint=Checkpointer(engine, env, data.model_cfg, data.train_loader, config.output_dir, seed=config.seed),
        gpu=gpu,
        device_name=device_name,
        peak_flops=peak_flops(device_name),
    )
