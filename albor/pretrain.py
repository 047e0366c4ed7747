"""``python -m albor.pretrain``: the pretraining command.

Launch it as it is (one process, dev mode), or under ``deepspeed --module``
or ``torchrun -m`` for several ranks; the code path is the same.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from albor.config import MODE_PRESETS, read_yaml, resolve_config
from albor.errors import AlborError, UsageErrorParser

PROG = "albor pretrain"


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(
        prog=PROG,
        description="Pretrain an albor model under the training contract (C-TRAIN-PRETRAIN v1.5).",
        epilog="Flags override --config values, which override --mode presets. "
        "Exit codes: 0 ok, 1 internal error, 2 usage, 3 data, 4 target missed, 5 checkpoint failed, "
        "6 unsupported torch/DeepSpeed, 10 divergence, 11 divergence at epoch 0, 12 numerical instability, "
        "13 throughput out of range, 14 rank failure, 15 preempted (resumable: rerun with --resume auto), "
        "16 preemption checkpoint failed (resume from the previous one), 128+N killed by a second signal N.",
    )
    p.add_argument("--config", type=Path, help="YAML file of config fields (see README)")
    p.add_argument("--dataset", type=Path, help="token index.json, its directory, or a raw corpus (.txt/.py/.jsonl)")
    p.add_argument("--tokenizer", type=Path, help="directory with vocab.json and merges.txt (for a raw corpus)")
    p.add_argument("--output-dir", type=Path, help="run directory (default runs/albor)")
    p.add_argument("--mode", choices=sorted(MODE_PRESETS), help="set lr, warmup, target and regime together")
    p.add_argument("--model", help="model preset: albor-370m (default) or tiny")
    p.add_argument("--ds-config", type=Path, help="DeepSpeed JSON config (default: chosen by device)")
    p.add_argument("--total-steps", type=int)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--batch-size", type=int, help="micro-batch per rank")
    p.add_argument("--seq-length", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr-max", type=float)
    p.add_argument("--lr-min", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument(
        "--resume", metavar="auto|PATH",
        help="continue the run in --output-dir: auto = from its newest complete checkpoint (a fresh start when it has "
        "none); PATH = from that checkpoint (its .metadata.json, .apr, DeepSpeed tag directory, or tag)",
    )
    p.add_argument(
        "--init-from", type=Path, metavar="FILE.apr", help="start a new run (fresh optimizer, step 0) from a model file"
    )
    p.add_argument(
        "--preempt-grace-s", type=float, metavar="S",
        help="seconds a preemption checkpoint may take before the job ends without it (default 120)",
    )
    p.add_argument(
        "--tensorboard", action="store_true", default=None,  # None: the config file decides
        help="also write each step's record to OUTPUT_DIR/tensorboard (pip install 'albor[tensorboard]')",
    )
    p.add_argument(
        "--deterministic", action=argparse.BooleanOptionalAction, default=None,  # None: the config file decides
        help="deterministic kernels, so a rerun with the same seed repeats every step's loss and grad norm "
        "(default on; --no-deterministic trades that for speed)",
    )
    p.add_argument(
        "--loss-chunk-tokens", type=int, metavar="N",
        help="tokens per chunk of the output head + cross-entropy; 0 computes the whole batch's logits at once (default 4096)",
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,  # None: the config file decides
        help="torch.compile each decoder layer (default: on a GPU, off on a CPU, where compiling costs more than it saves)",
    )
    p.add_argument(
        "--vocab-multiple", type=int, metavar="N",
        help="pad the model's embedding and head rows to a multiple of N for faster matmuls; the padded rows are "
        "never predicted and never written to a file (default 64; 1: no padding)",
    )
    p.add_argument(
        "--prefetch", action=argparse.BooleanOptionalAction, default=None,  # None: the config file decides
        help="read the next batch (into pinned memory on a GPU) while the current step runs (default on)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate everything but the dataset's shards, print the resolved config, exit 0")
    # deepspeed's launcher appends --local_rank=N; the rank really comes from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


FLAG_FIELDS = (
    "dataset", "tokenizer", "output_dir", "model", "ds_config", "total_steps", "steps_per_epoch",
    "batch_size", "seq_length", "seed", "lr_max", "lr_min", "warmup_steps", "resume", "init_from", "preempt_grace_s",
    "tensorboard", "deterministic", "loss_chunk_tokens", "compile", "vocab_multiple", "prefetch",
)

_invoked_argv: list[str] | None = None


def invoked_argv() -> list[str] | None:
    """This process's pretrain arguments, normalized (``--flag value``, no --dry-run, no --local_rank), or None.

    For the resume command in status.json (albor.resume_plan.resume_command): a rank
    cannot see its launcher's command line, but it can see its own arguments.
    """
    return None if _invoked_argv is None else list(_invoked_argv)


def _normalized_argv(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for name in ("config", "mode", *FLAG_FIELDS):
        value = getattr(args, name)
        if value is True:  # a switch: its name alone
            out.append("--" + name.replace("_", "-"))
        elif value is False:  # a switched-off --no-X flag (BooleanOptionalAction)
            out.append("--no-" + name.replace("_", "-"))
        elif value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the process exit code."""
    global _invoked_argv
    try:
        args = build_parser().parse_args(argv)
        _invoked_argv = _normalized_argv(args)
        file_values = read_yaml(args.config) if args.config else {}
        config = resolve_config(
            mode=args.mode, file_values=file_values, flags={k: getattr(args, k) for k in FLAG_FIELDS}
        )
        if args.dry_run:
            return _dry_run(config)
        from albor.train import train  # torch and deepspeed load only for a real run

        code = int(train(config, argv=invoked_argv()))
    except AlborError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        code = int(e.exit_code)
    if "albor.train" in sys.modules and _process_group_alive():
        # A real run ends the process here, whichever command started it. Every file is
        # closed and synced; skipping interpreter teardown keeps a communication thread
        # of a rank whose peer already left from aborting the process (SIGABRT,
        # "terminate called without an active exception"), which would replace the
        # exit code every rank agreed on.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _dry_run(config) -> int:
    """Every check a real run makes before its process group, then the resolved config."""
    from albor.preflight import preflight

    checked = preflight(config)
    start = _start_point(config)  # before printing: a --resume PATH that is not resumable is a usage error
    sys.stdout.write(config.to_yaml())
    sys.stdout.write(
        f"# DeepSpeed config: {checked.ds_config_path} (for {checked.device_type}, world size {checked.world_size})\n"
        f"# start: {start}\n"
        "# not checked by a dry run: the dataset's shards (read when a run opens them), and whether the run "
        "matches the checkpoint it resumes\n"
    )
    return 0


def _start_point(config) -> str:
    """Where a real run with ``config`` would start, in words; nothing is removed."""
    new_run = f"a new run from the model in {config.init_from}" if config.init_from is not None else "a new run"
    if config.resume is None:
        return new_run
    from albor.resume_plan import find_resume_point, scan_checkpoints

    scan = scan_checkpoints(config.output_dir)
    found = find_resume_point(config.output_dir, config.resume, scan=scan)
    where = f"resume from {found.describe()}" if found is not None else f"{new_run} (no checkpoint to resume)"
    if scan.debris:
        where += f"; {len(scan.debris)} half-written item(s) in ckpt/ would be removed first"
    return where


def _process_group_alive() -> bool:
    from albor.distributed.process_group import is_initialized

    return is_initialized()


if __name__ == "__main__":
    sys.exit(main())
