"""The real training path: data, model, DeepSpeed engine and the contract loop, wired together.

Everything that can be checked without a process group is checked first
(fault drill, DeepSpeed config, sequence length, the installed torch and
DeepSpeed), so a bad flag costs nothing and leaves nothing on disk.
"""

from __future__ import annotations

import logging
import traceback
import warnings

from albor.config import PretrainConfig
from albor.console import format_step, setup_logging
from albor.contract import AbortReason, ContractAbort
from albor.distributed.ds_config import uses_bf16
from albor.distributed.process_group import DistEnv, init_distributed, shutdown
from albor.errors import AlborError, ExitCode
from albor.loop import PretrainLoop, RunResult, RunStatus
from albor.model import num_parameters
from albor.preflight import preflight
from albor.run_files import STATUS_FILE, RunFiles, write_exit_record
from albor.run_setup import build_run, open_data
from albor.stop_signal import StopSignals

log = logging.getLogger("albor")


def train(config: PretrainConfig) -> ExitCode:
    """Run training under the contract; every rank returns the same exit code.

    Once the run has started, each rank also leaves its own exit record
    (``ranks/rank-R.exit.json``) with the code it returns.
    """
    checked = preflight(config)
    faults, ds, ds_path = checked.faults, checked.ds_config, checked.ds_config_path

    # DeepSpeed's ZeRO still calls a torch collective that torch has deprecated; the warning
    # (one per rank) says nothing an albor user can act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    env = init_distributed()
    setup_logging(env.rank, env.world_size)
    files: RunFiles | None = None
    loop: PretrainLoop | None = None

    def forced_stop(code: int) -> None:  # a second stop signal: record how the run ended, then exit
        if files is not None:
            write_exit_record(config.output_dir, env.rank, code)
            status = _ended_status(
                f"a second stop signal on rank {env.rank} ended the run at once, without a checkpoint",
                env, loop, config, code, ranks=(env.rank,),
            )
            status["abort"]["reason"] = status["reason"] = "killed_by_second_signal"
            files.write_json(STATUS_FILE, {**status, "status": "killed"})

    stop = StopSignals(on_force=forced_stop)
    stop.install()
    if faults is not None:
        log.warning(
            "FAULT DRILL ACTIVE: %s on rank %d at %s %d (ALBOR_FAULT)", faults.kind, faults.rank, faults.unit, faults.when
        )
    code = ExitCode.INTERNAL_ERROR
    try:
        data = open_data(config, env)
        files = RunFiles(config.output_dir, enabled=env.is_main)
        files.write_text("config.yaml", config.to_yaml())
        files.write_json("ds_config.json", ds)
        files.write_json(STATUS_FILE, {"status": "running", "world_size": env.world_size})

        parts = build_run(config, env, ds, data, faults=faults, stop=stop)
        model_cfg = data.model_cfg
        log.info(
            "albor: %s (%s params, %s with the tied head) | world %d on %s%s | %s | tokens/step %d | %d epoch(s) of %d steps",
            config.model, f"{num_parameters(model_cfg, count_tied_head=False):,}",
            f"{num_parameters(model_cfg, count_tied_head=True):,}", env.world_size, parts.device_name or "cpu",
            " (bf16)" if uses_bf16(ds) else " (fp32)", ds_path.name,
            config.batch_size * config.seq_length * ds["gradient_accumulation_steps"] * env.world_size,
            config.num_epochs, config.steps_per_epoch,
        )
        log.info(
            "gpu utilisation: %s | mfu: %s",
            "NVML" if parts.gpu.available else f"unavailable, recorded as 0 ({parts.gpu.reason})",
            "peak from the device table" if parts.peak_flops else "unavailable on this device (null)",
        )
        log_every = max(1, min(50, config.steps_per_epoch // 4))
        loop = parts.loop(
            config, env, files, on_step=lambda r: log.info(format_step(r)) if r["step"] % log_every == 0 else None
        )
        result = loop.run()
        stop.settle()
        _report(result, config)
        files.close()
        code = result.exit_code
        if result.abort is None:  # every rank is alive and done; after an abort a peer may be gone
            shutdown()
        return code
    except AlborError as e:
        code = e.exit_code
        raise  # every rank meets the same bad input; pretrain.main prints it
    except Exception as e:
        # A bug here, or a peer that died inside a collective. No collectives from here on.
        stop.settle()  # the launcher's clean-up SIGTERM must not pre-empt this rank's own exit code
        log.error("rank %d: %s\n%s", env.rank, e, traceback.format_exc())
        code = ExitCode.RANK_FAILURE if env.world_size > 1 else ExitCode.INTERNAL_ERROR
        if files is not None:
            files.write_json(STATUS_FILE, _crash_status(e, env, loop, config, code))
        return code
    finally:
        if files is not None:  # the run started: its directory holds this rank's record
            write_exit_record(config.output_dir, env.rank, int(code))


def _crash_status(e: Exception, env: DistEnv, loop: PretrainLoop | None, config: PretrainConfig, code: ExitCode) -> dict:
    """status.json for an exception that escaped the loop, on rank 0."""
    text = str(e)
    if "closed by peer" in text or "timed out" in text.lower():  # gloo's and NCCL's words for it
        # rank 0 only saw the symptom; the dead rank is not known here
        return _ended_status(f"lost a peer rank during a collective ({type(e).__name__}: {text})", env, loop, config, code)
    return _ended_status(f"{type(e).__name__} on rank {env.rank}: {text}", env, loop, config, code, ranks=(env.rank,))


def _ended_status(
    message: str, env: DistEnv, loop: PretrainLoop | None, config: PretrainConfig, code: int,
    *, ranks: tuple[int, ...] = (),
) -> dict:
    """status.json for a run that ended outside the loop's own verdicts (a crash, a forced stop)."""
    step = loop.step_metrics[-1].step + 1 if loop is not None and loop.step_metrics else None
    result = RunResult(
        RunStatus.ABORTED,
        epochs_completed=len(loop.epoch_metadata) if loop else 0,
        steps_completed=len(loop.step_metrics) if loop else 0,
        final_val_loss=None,
        best_val_loss=min((m.val_loss for m in loop.epoch_metadata), default=None) if loop else None,
        target_val_loss=config.target_val_loss,
        abort=ContractAbort(AbortReason.RANK_FAILURE, message, step=step, ranks=ranks),
    )
    return {**result.to_dict(), "exit_code": int(code)}


def _report(result: RunResult, config: PretrainConfig) -> None:
    if result.abort is not None:
        label = "STOPPED" if result.status is RunStatus.STOPPED else "ABORTED"
        log.error("%s (exit %d): %s", label, result.exit_code, result.abort.message)
    else:
        log.info(
            "finished: %s after %d epoch(s) | final val_loss %.4f | target %.2f %s (exit %d)",
            result.status.value, result.epochs_completed, result.final_val_loss,
            config.target_val_loss, "met" if result.target_met else "missed", result.exit_code,
        )
    log.info("run directory: %s (metrics.jsonl, ckpt/, status.json)", config.output_dir)
