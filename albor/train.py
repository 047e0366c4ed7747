"""The real training path: data, model, DeepSpeed engine and the contract loop, wired together.

Everything that can be checked without a process group is checked first
(fault drill, DeepSpeed config, sequence length, the installed torch and
DeepSpeed), so a bad flag costs nothing and leaves nothing on disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator

from albor.config import PretrainConfig
from albor.console import setup_logging
from albor.contract import AbortReason, ContractAbort
from albor.distributed.ds_config import uses_bf16
from albor.distributed.process_group import DistEnv, init_distributed, shutdown
from albor.errors import AlborError, ExitCode
from albor.loop import PretrainLoop, RunResult, RunStatus
from albor.model import num_parameters
from albor.preflight import preflight
from albor.progress import StepOutput
from albor.continuation import choose_checkpoint, prepare_run_dir, restore_run
from albor.init_from import read_model_file
from albor.distributed.resume import needs_universal
from albor.rank_failure import crash_summary, error_record, is_cause
from albor.reconcile import reconcile_before_resume
from albor.resume_plan import launcher_command, resume_command, run_fields
from albor.run_files import CONFIG_FILE, STATUS_FILE, RunFiles, wait_for_peer_records, write_exit_record, write_start_record
from albor.run_setup import OpenedData, build_run, open_data
from albor.stop_signal import StopSignals, watch_launcher

log = logging.getLogger("albor")


def train(config: PretrainConfig, *, argv: list[str] | None = None) -> ExitCode:
    """Run training under the contract; every rank returns the same exit code.

    ``argv`` is the command line it was started with: status.json turns it into the resume command.

    Once the run has started, each rank also leaves its own start record
    (``ranks/rank-R.start.json``, for ``albor status``) and exit record
    (``ranks/rank-R.exit.json``) with the code it returns and, after an
    exception, the error.
    """
    checked = preflight(config)
    faults, ds, ds_path = checked.faults, checked.ds_config, checked.ds_config_path

    # DeepSpeed's ZeRO still calls a torch collective that torch has deprecated; the warning
    # (one per rank) says nothing an albor user can act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    files: RunFiles | None = None
    loop: PretrainLoop | None = None
    step_output: StepOutput | None = None

    def end_now(code: int, *, status: str, reason: str, message: str) -> None:
        """Record how this rank ends before it exits outside the loop (the caller then calls os._exit)."""
        if files is not None:
            write_exit_record(config.output_dir, env.rank, code)
            files.write_json(STATUS_FILE, _ended_status(
                message, env, loop, config, code, ranks=(env.rank,), status=status, reason=reason
            ))

    def forced_stop(code: int) -> None:  # a second stop signal
        end_now(code, status="killed", reason="killed_by_second_signal",
                message=f"a second stop signal on rank {env.rank} ended the run at once, without a new checkpoint")

    def save_too_slow() -> None:  # the preemption save outlived --preempt-grace-s
        code = int(ExitCode.PREEMPTION_SAVE_FAILED)
        end_now(code, status="preempted", reason="preemption_save_failed",
                message=f"the preemption checkpoint did not finish within --preempt-grace-s {config.preempt_grace_s:g} s; "
                        "resume from the last complete checkpoint")
        os._exit(code)

    # Before the process group: a stop asked for during start-up is honoured at the first step.
    stop = StopSignals(on_force=forced_stop)
    stop.install()
    watch_launcher(stop)  # a launcher that dies or is signalled counts as a stop signal on this rank
    env = init_distributed()
    setup_logging(env.rank, env.world_size)
    if faults is not None:
        log.warning(
            "FAULT DRILL ACTIVE: %s on rank %d at %s %d (ALBOR_FAULT)", faults.kind, faults.rank, faults.unit, faults.when
        )
    code = ExitCode.INTERNAL_ERROR
    failure: dict | None = None  # the exception that ended this rank, for its exit record
    data: OpenedData | None = None
    try:
        data = open_data(config, env)
        accumulation = ds["gradient_accumulation_steps"]
        point = weights = None
        if config.resume is not None:
            if env.is_main:  # an attempt killed outright left "running": give it its final status first
                reconcile_before_resume(config.output_dir, log)
            identity = run_fields(config, global_batch=config.batch_size * accumulation * env.world_size,
                                  dataset_fingerprint=data.dataset.fingerprint)
            point = choose_checkpoint(config, env, identity, gradient_accumulation=accumulation)
            if point is not None and needs_universal(point.world_size, env.world_size):
                ds = {**ds, "checkpoint": {"load_universal": True}}  # resharded through DeepSpeed's universal format
        # --init-from starts a new run; with --resume auto, only when there was no checkpoint to continue.
        # Read (and checked) before anything in the run directory is changed.
        if config.init_from is not None and point is None:
            error = None
            try:
                weights = read_model_file(config.init_from, data.model_cfg, model_name=config.model)
            except AlborError as e:
                error = e
            env.raise_together(error, "reading --init-from")
        if config.resume is not None:
            prepare_run_dir(config, env, point)
        files = RunFiles(config.output_dir, enabled=env.is_main)
        write_start_record(config.output_dir, env.rank, env.world_size)  # every rank: albor status checks it is alive
        files.write_text(CONFIG_FILE, config.to_yaml())
        files.write_json("ds_config.json", ds)
        status_extra: dict = {
            "resume_command": resume_command(
                config.output_dir, argv=argv,
                launcher=launcher_command(env.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))),
            ),
            "resumed_from": point.tag if point else None,
        }
        files.write_json(STATUS_FILE, {"status": "running", "world_size": env.world_size, **status_extra})

        parts = build_run(config, env, ds, data, init_weights=weights, faults=faults, stop=stop)
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
        step_output = StepOutput.for_run(
            rank=env.rank, run_dir=config.output_dir, total_steps=config.total_steps,
            log_every=max(1, min(50, config.steps_per_epoch // 4)), tensorboard=config.tensorboard,
        )
        loop = parts.loop(
            config, env, files, on_step=step_output,
            status_extra=status_extra, preemption_guard=lambda: _deadline(config.preempt_grace_s, save_too_slow),
        )
        if point is not None:
            loop.status_extra["resumed_from"] = restore_run(parts, loop, env, point)
            files.write_json(STATUS_FILE, {"status": "running", "world_size": env.world_size, **loop.status_extra})
        result = loop.run()
        step_output.close()  # the bar ends before the verdict is printed under it
        stop.settle()
        _report(result, config)
        files.close()
        code = result.exit_code
        if result.abort is None:  # every rank is alive and done; after an abort a peer may be gone
            shutdown()
        return code
    except AlborError as e:
        code = e.exit_code
        if files is not None:  # the run had started: its status must not stay "running"
            files.write_json(STATUS_FILE, _ended_status(str(e), env, loop, config, code, reason=e.exit_code.name.lower()))
        raise  # every rank meets the same bad input; pretrain.main prints it
    except Exception as e:
        # A bug here, or a peer that died inside a collective. No collectives from here on.
        stop.settle()  # the launcher's clean-up SIGTERM must not pre-empt this rank's own exit code
        log.error("rank %d: %s\n%s", env.rank, e, traceback.format_exc())
        failure = error_record(e)
        # Running out of memory is not a bug in albor, even with one rank.
        code = ExitCode.RANK_FAILURE if env.world_size > 1 or failure.get("advice") else ExitCode.INTERNAL_ERROR
        if files is not None and env.is_main:  # only rank 0 writes it: no other rank waits for peers' records
            files.write_json(STATUS_FILE, _crash_status(failure, env, loop, config, code))
        return code
    finally:
        # However the run ended, its data's verdict is no longer wanted: the verification's reader threads
        # stop at their next chunk instead of keeping the process alive until every shard is hashed.
        if data is not None and data.verdict.verification is not None:
            data.verdict.verification.cancel()
        if files is not None:  # the run started: its directory holds this rank's record
            # Before the process exits: its exit is what fails its peers' collectives, so rank 0 finds it.
            write_exit_record(config.output_dir, env.rank, int(code), error=failure)
        if step_output is not None:  # a run that raised: end the bar, flush TensorBoard
            step_output.close()


def _crash_status(error: dict, env: DistEnv, loop: PretrainLoop | None, config: PretrainConfig, code: ExitCode) -> dict:
    """status.json for an exception that escaped the loop (``error``: its ``error_record``), on rank 0.

    A lost peer (gloo's or NCCL's words, ``rank_failure.classify_lost_peer``) is only the symptom. A peer
    that raised (in its backward, say) wrote its error into its exit record before it exited; a peer
    killed outright wrote none, so the wait is bounded (``run_files.PEER_RECORD_WAIT_S``).
    """
    peers = {}
    if error.get("lost_peer"):
        peers = wait_for_peer_records(config.output_dir, env.rank, until=lambda found: any(map(is_cause, found.values())))
    summary = crash_summary(env.rank, error, peers)
    status = _ended_status(summary.message, env, loop, config, code, ranks=summary.ranks)
    if summary.advice:
        status["abort"]["advice"] = summary.advice
    return status


@contextlib.contextmanager
def _deadline(seconds: float, on_expire: Callable[[], None]) -> Iterator[None]:
    """Call ``on_expire`` (which ends the process) if the block is still running after ``seconds``.

    A thread, not SIGALRM: the main thread may be blocked inside a collective,
    where no Python signal handler runs.
    """
    timer = threading.Timer(seconds, on_expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _ended_status(
    message: str, env: DistEnv, loop: PretrainLoop | None, config: PretrainConfig, code: int,
    *, ranks: tuple[int, ...] = (), status: str = "aborted", reason: str = "rank_failure",
) -> dict:
    """status.json for a run that ended outside the loop's own verdicts (a crash, a bad input, a forced stop)."""
    step = loop.next_step if loop is not None else None  # the step that was running
    result = RunResult(
        RunStatus.ABORTED,
        epochs_completed=len(loop.val_losses) if loop else 0,
        steps_completed=loop.next_step if loop else 0,
        final_val_loss=None,
        best_val_loss=min(loop.val_losses, default=None) if loop else None,
        target_val_loss=config.target_val_loss,
        abort=ContractAbort(AbortReason.RANK_FAILURE, message, step=step, ranks=ranks),
    )
    out = {**result.to_dict(), **(loop.status_extra if loop else {}), "status": status, "exit_code": int(code),
           "reason": reason, **({"checkpoint": None} if status == "preempted" else {})}
    out["abort"]["reason"] = reason
    return out


def _report(result: RunResult, config: PretrainConfig) -> None:
    if result.abort is not None:
        label = "PREEMPTED" if result.status is RunStatus.PREEMPTED else "ABORTED"
        log.error("%s (exit %d): %s", label, result.exit_code, result.abort.message)
    else:
        log.info(
            "finished: %s after %d epoch(s) | final val_loss %.4f | target %.2f %s (exit %d)",
            result.status.value, result.epochs_completed, result.final_val_loss,
            config.target_val_loss, "met" if result.target_met else "missed", result.exit_code,
        )
    log.info("run directory: %s (metrics.jsonl, ckpt/, status.json)", config.output_dir)
