"""The real training path: data, model, DeepSpeed engine and the contract loop, wired together.

Everything that can be checked without a process group is checked first
(fault drill, DeepSpeed config, sequence length), so a bad flag costs
nothing and leaves nothing on disk.
"""

from __future__ import annotations

import logging
import traceback
import warnings

import torch

from albor.config import PretrainConfig
from albor.console import format_step, setup_logging
from albor.contract import AbortReason, ContractAbort
from albor.data.loader import TokenDataset, TrainLoader, ValidationLoader, index_vocab_size
from albor.data.resolve import resolve_dataset
from albor.distributed.checkpoint import EpochCheckpoint
from albor.distributed.ds_config import uses_bf16
from albor.distributed.engine import build_engine
from albor.distributed.process_group import DistEnv, init_distributed, shutdown
from albor.distributed.step import DeepSpeedStep
from albor.distributed.validation import DeepSpeedValidation
from albor.errors import AlborError, ConfigError, DataError, ExitCode
from albor.loop import PretrainLoop, RunResult, RunStatus
from albor.model import AlborLlama, flops_per_token, model_preset, num_parameters
from albor.preflight import preflight
from albor.run_files import RunFiles
from albor.telemetry import GpuUtilization, peak_flops

log = logging.getLogger("albor")


def _gpu_identity(env: DistEnv) -> tuple[str | None, str | None]:
    """(device name, UUID) of this rank's GPU, or (None, None) on a CPU."""
    if env.device.type != "cuda":
        return None, None
    props = torch.cuda.get_device_properties(env.device)
    return props.name, str(getattr(props, "uuid", "")) or None


def train(config: PretrainConfig) -> ExitCode:
    """Run training under the contract; every rank returns the same exit code."""
    checked = preflight(config)
    faults, ds, ds_path = checked.faults, checked.ds_config, checked.ds_config_path

    # DeepSpeed's ZeRO still calls a torch collective that torch has deprecated; the warning
    # (one per rank) says nothing an albor user can act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    env = init_distributed()
    setup_logging(env.rank, env.world_size)
    if faults is not None:
        log.warning("FAULT DRILL ACTIVE: %s on rank %d at step %d (ALBOR_FAULT)", faults.kind, faults.rank, faults.step)
    files: RunFiles | None = None
    loop: PretrainLoop | None = None
    try:
        model_cfg, dataset, train_loader, val_loader = _open_data(config, env)

        files = RunFiles(config.output_dir, enabled=env.is_main)
        files.write_text("config.yaml", config.to_yaml())
        files.write_json(config.output_dir / "ds_config.json", ds)
        files.write_json(files.status_path, {"status": "running", "world_size": env.world_size})

        torch.manual_seed(config.seed)  # identical init on every rank and in every rerun (gate 006)
        model = AlborLlama(model_cfg)
        engine = build_engine(model, ds, env, lr=config.lr_max, weight_decay=config.weight_decay)
        device_name, uuid = _gpu_identity(env)
        gpu = GpuUtilization(uuid)
        peak = peak_flops(device_name)
        grad_accumulation = ds["gradient_accumulation_steps"]
        log.info(
            "albor: %s (%s params, %s with the tied head) | world %d on %s%s | %s | tokens/step %d | %d epoch(s) of %d steps",
            config.model, f"{num_parameters(model_cfg, count_tied_head=False):,}",
            f"{num_parameters(model_cfg, count_tied_head=True):,}", env.world_size, device_name or "cpu",
            " (bf16)" if uses_bf16(ds) else " (fp32)", ds_path.name,
            config.batch_size * config.seq_length * grad_accumulation * env.world_size,
            config.num_epochs, config.steps_per_epoch,
        )
        log.info(
            "gpu utilisation: %s | mfu: %s",
            "NVML" if gpu.available else f"unavailable, recorded as 0 ({gpu.reason})",
            "peak from the device table" if peak else "unavailable on this device (null)",
        )
        step_fn = DeepSpeedStep(
            engine, train_loader, env, grad_accumulation=grad_accumulation, gpu=gpu, faults=faults
        )
        log_every = max(1, min(50, config.steps_per_epoch // 4))
        loop = PretrainLoop(
            config,
            step_fn,
            DeepSpeedValidation(engine, val_loader, env),
            EpochCheckpoint(engine, env, model_cfg, train_loader, config.output_dir, seed=config.seed),
            vocab_size=model_cfg.vocab_size,
            files=files,
            on_step=lambda r: log.info(format_step(r)) if r["step"] % log_every == 0 else None,
            metadata_extra={
                "world_size": env.world_size,
                "model": config.model,
                "dataset_fingerprint": dataset.fingerprint,
            },
            flops_per_token=flops_per_token(model_cfg, config.seq_length),
            peak_flops=peak * env.world_size if peak else None,
        )
        result = loop.run()
        _report(result, config)
        files.close()
        if result.abort is None:  # every rank is alive and done; after an abort a peer may be gone
            shutdown()
        return result.exit_code
    except AlborError:
        raise  # every rank meets the same bad input; pretrain.main prints it
    except Exception as e:
        # A bug here, or a peer that died inside a collective. No collectives from here on.
        log.error("rank %d: %s\n%s", env.rank, e, traceback.format_exc())
        code = ExitCode.RANK_FAILURE if env.world_size > 1 else ExitCode.INTERNAL_ERROR
        if files is not None and files.enabled:
            files.write_json(files.status_path, _crash_status(e, env, loop, config, code))
        return code


def _open_data(config: PretrainConfig, env: DistEnv):
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
    codes = [int(c) for c in env.per_rank(int(error.exit_code) if error is not None else 0)]
    worst = max(codes)
    if worst:
        failed = ", ".join(str(r) for r, c in enumerate(codes) if c)
        message = str(error) if error is not None else f"the dataset could not be opened on rank(s) {failed}"
        raise (ConfigError if worst == ExitCode.USAGE else DataError)(message)
    return model_cfg, dataset, train_loader, val_loader


def _crash_status(e: Exception, env: DistEnv, loop: PretrainLoop | None, config: PretrainConfig, code: ExitCode) -> dict:
    """status.json for an exception that escaped the loop, on rank 0."""
    text = str(e)
    peer_lost = "closed by peer" in text or "timed out" in text.lower()  # gloo's and NCCL's words for it
    if peer_lost:  # rank 0 only saw the symptom; the dead rank is not known here
        message, ranks = f"lost a peer rank during a collective ({type(e).__name__}: {text})", []
    else:
        message, ranks = f"{type(e).__name__} on rank {env.rank}: {text}", [env.rank]
    step = loop.step_metrics[-1].step + 1 if loop is not None and loop.step_metrics else None
    abort = ContractAbort(AbortReason.RANK_FAILURE, message, step=step, ranks=ranks)
    result = RunResult(
        RunStatus.ABORTED,
        epochs_completed=len(loop.epoch_metadata) if loop else 0,
        steps_completed=len(loop.step_metrics) if loop else 0,
        final_val_loss=None,
        best_val_loss=min((m.val_loss for m in loop.epoch_metadata), default=None) if loop else None,
        target_val_loss=config.target_val_loss,
        abort=abort,
    )
    return {**result.to_dict(), "exit_code": int(code)}


def _report(result: RunResult, config: PretrainConfig) -> None:
    if result.abort is not None:
        log.error("ABORTED (exit %d): %s", result.exit_code, result.abort.message)
    else:
        log.info(
            "finished: %s after %d epoch(s) | final val_loss %.4f | target %.2f %s (exit %d)",
            result.status.value, result.epochs_completed, result.final_val_loss,
            config.target_val_loss, "met" if result.target_met else "missed", result.exit_code,
        )
    log.info("run directory: %s (metrics.jsonl, ckpt/, status.json)", config.output_dir)
