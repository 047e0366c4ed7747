"""Building a run's parts: its data (:func:`open_data`), then the engine and the loop (:func:`build_run`).

``albor.train`` and the overhead benchmark build a run the same way, from here,
so the benchmark measures exactly what ``albor pretrain`` runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from albor.config import PretrainConfig
from albor.data.loader import TokenDataset, TrainLoader, ValidationLoader, index_vocab_size
from albor.data.resolve import resolve_dataset, run_index
from albor.data.verify import BackgroundVerification, ShardProblem, VerifyReport, default_workers
from albor.determinism import apply_determinism
from albor.distributed.checkpoint import Checkpointer
from albor.distributed.engine import build_engine
from albor.distributed.data_verdict import DataVerdict
from albor.distributed.process_group import STARTUP_TIMEOUT_S, DistEnv
from albor.distributed.resume import load_fp32_masters
from albor.distributed.step import DeepSpeedStep
from albor.distributed.validation import DeepSpeedValidation
from albor.errors import AlborError, DataError
from albor.faults import FaultPlan
from albor.loop import PretrainLoop
from albor.model import AlborLlama, ModelConfig, flops_per_token, model_preset
from albor.model_compile import compile_layers, resolve_compile
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
    verdict: DataVerdict  # the full verification's progress and vote (docs/data-verification.md)


#: What --dataset is on this rank's node, for the presence vote.
_MISSING, _RAW_CORPUS, _PREPARED = 0, 1, 2


def check_dataset_everywhere(config: PretrainConfig, env: DistEnv) -> None:
    """Every rank sees the same kind of --dataset, or every rank fails with 3 at once, naming the ranks that lack it.

    Config validation leaves a multi-rank run's dataset to this vote (albor.config): a node without
    the dataset must not exit before the process group while the others wait for it until the start-up
    timeout. Missing on every rank is a plain usage error, reported by resolve_dataset.
    """
    dataset = config.dataset
    kind = _MISSING if not dataset.exists() else _RAW_CORPUS if run_index(dataset, config.output_dir).cached else _PREPARED
    kinds = [int(k) for k in env.per_rank(kind)]
    if len(set(kinds)) == 1:
        return
    names = {_MISSING: "missing", _RAW_CORPUS: "a raw corpus (no index.json)", _PREPARED: "a prepared dataset"}
    seen = "; ".join(
        f"{names[k]} on rank(s) {', '.join(str(r) for r, kr in enumerate(kinds) if kr == k)}"
        for k in sorted(set(kinds), reverse=True)
    )
    raise DataError(
        f"--dataset {dataset} is {seen}: a multi-node run needs the prepared dataset at the same path on every "
        "node (shared storage, or a copy on each); copy it there, or pass a path every node sees"
    )


def open_data(config: PretrainConfig, env: DistEnv) -> OpenedData:
    """Dataset, model shape and loaders; every rank learns how every rank fared.

    A shard corrupted on one node's disk must not leave that node's ranks exiting
    while the others wait in the next collective: one vote, then every rank raises
    an error with the same exit code (the highest any rank met). Opening reads
    headers only; local rank 0 of each node then verifies its node's copy in full
    in the background (:class:`DataVerdict`).
    """
    check_dataset_everywhere(config, env)
    error: AlborError | None = None
    try:
        # A rank waiting for another to tokenize a raw corpus waits as long as the first collective would.
        index_path = resolve_dataset(config.dataset, config.tokenizer, config.output_dir, log=log.info,
                                     lock_timeout_s=STARTUP_TIMEOUT_S)
        model_cfg = model_preset(config.model, vocab_size=index_vocab_size(index_path))
        dataset = TokenDataset.open(index_path, vocab_size=model_cfg.vocab_size)
        # prefetch: the next batch read while a step runs, pinned for a GPU's non-blocking copy.
        pin = config.prefetch and env.device.type == "cuda"
        train_loader = TrainLoader(
            dataset.split("train"), micro_batch=config.batch_size, seq_length=config.seq_length,
            rank=env.rank, world_size=env.world_size, seed=config.seed, prefetch=config.prefetch, pin_memory=pin,
        )
        val_loader = ValidationLoader(
            dataset.split("val"), micro_batch=config.batch_size, seq_length=config.seq_length,
            rank=env.rank, world_size=env.world_size, max_batches=config.val_batches,
            prefetch=config.prefetch, pin_memory=pin,
        )
    except AlborError as e:
        error = e
    except Exception as e:  # unreadable file, out of memory…: still reach the vote
        error = DataError(f"opening the dataset failed: {type(e).__name__}: {e}")
    env.raise_together(error, "opening the dataset")
    verification = None
    if env.local_rank == 0:
        verification = start_verification(dataset, model_cfg.vocab_size, env)
    verdict = DataVerdict(verification, rank=env.rank, shard_names=dataset.shard_names, per_rank=env.per_rank,
                          slow_phase=env.startup_timeout)
    return OpenedData(model_cfg, dataset, train_loader, val_loader, verdict)


def start_verification(dataset: TokenDataset, vocab_size: int, env: DistEnv) -> BackgroundVerification:
    """This node's full check of ``dataset``, on a share of the node's cores, while training starts."""
    # Each local rank, this one included, keeps a core busy feeding its device; the verification takes the rest.
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    workers = max(1, default_workers() - local_ranks)
    assert dataset.index_path is not None

    def done(report: VerifyReport | None, problem: ShardProblem | None) -> None:
        if report is not None and problem is None:
            log.info("dataset: verified %d shard(s), %.1f MB, in %.1f s on rank %d (sha256 and token ids match %s)",
                     report.shards, report.bytes / 1e6, report.seconds, env.rank, report.index_path)

    log.info("dataset: verifying every shard of %s in the background on %d thread(s), one rank per node; "
             "the first checkpoint waits for it", dataset.index_path, workers)
    return BackgroundVerification(dataset.index_path, vocab_size=vocab_size, workers=workers, on_done=done).start()


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
    compiled: bool = False  # the decoder layers run torch.compile'd (config.compile, resolved; albor.model_compile)

    def loop(
        self, config: PretrainConfig, env: DistEnv, files: RunFiles, *,
        on_step: Callable[[dict], None] | None = None, status_extra: dict[str, Any] | None = None,
        preemption_guard: Callable[[], Any] | None = None,
    ) -> PretrainLoop:
        """The contract loop over these parts, writing through ``files``."""
        model_cfg = self.data.model_cfg
        return PretrainLoop(
            config, self.step_fn, self.val_fn, self.checkpoint,
            data_verified=self.data.verdict.settle,
            vocab_size=model_cfg.vocab_size,
            files=files,
            on_step=on_step,
            metadata_extra={
                "world_size": env.world_size,
                "model": config.model,
                "dataset_fingerprint": self.data.dataset.fingerprint,
                "deterministic": config.deterministic,
                "loss_chunk_tokens": config.loss_chunk_tokens,
                "compile": self.compiled, "prefetch": config.prefetch,  # the speed levers, as resolved
                "vocab_multiple": config.vocab_multiple,  # the model's padded rows; the .apr holds vocab_size rows
                "vocab_size": model_cfg.vocab_size, "regime": config.regime.value,  # albor report: gate 005's epoch-0 cap
                "run": run_fields(
                    config, global_batch=config.batch_size * self.engine.gradient_accumulation_steps() * env.world_size,
                    dataset_fingerprint=self.data.dataset.fingerprint,
                ),
            },
            status_extra={**(status_extra or {}), "deterministic": config.deterministic,
                          "compile": self.compiled, "prefetch": config.prefetch,
                          "vocab_multiple": config.vocab_multiple},
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
    model = AlborLlama(data.model_cfg, vocab_multiple=config.vocab_multiple)
    compiled = resolve_compile(config.compile, env.device.type)  # forced on where it cannot run: refused (exit 6) in preflight already
    if compiled:  # lazily, on the first forward; before the engine so DeepSpeed wraps the same modules
        log.info("albor: torch.compile of %d decoder layers (on the first step)",
                 compile_layers(model, deterministic=config.deterministic))
    engine = build_engine(model, ds_config, env, lr=config.lr_max, weight_decay=config.weight_decay)
    if init_weights is not None:  # after the build: under bf16 the fp32 masters must come from the file, not the module
        load_fp32_masters(engine, env, init_weights)
    device_name, uuid = _gpu_identity(env)
    gpu = GpuUtilization(uuid)
    step_fn = DeepSpeedStep(
        engine, data.train_loader, env, grad_accumulation=ds_config["gradient_accumulation_steps"], gpu=gpu,
        faults=faults, stop=stop, loss_chunk_tokens=config.loss_chunk_tokens, data_verdict=data.verdict,
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
        compiled=compiled,
    )
