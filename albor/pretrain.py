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
from albor.errors import AlborError, ConfigError

PROG = "albor pretrain"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a ConfigError (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Pretrain an albor model under the training contract (C-TRAIN-PRETRAIN v1.5).",
        epilog="Flags override --config values, which override --mode presets. "
        "Exit codes: 0 ok, 1 internal error, 2 usage, 3 data, 4 target missed, 5 checkpoint failed, "
        "6 unsupported torch/DeepSpeed, 10 divergence, 11 divergence at epoch 0, 12 numerical instability, "
        "13 throughput out of range, 14 rank failure, 15 stopped by SIGTERM/SIGUSR1, "
        "128+N killed by a second signal N.",
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
    p.add_argument("--dry-run", action="store_true", help="validate everything but the dataset's shards, print the resolved config, exit 0")
    # deepspeed's launcher appends --local_rank=N; the rank really comes from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return p


FLAG_FIELDS = (
    "dataset", "tokenizer", "output_dir", "model", "ds_config", "total_steps", "steps_per_epoch",
    "batch_size", "seq_length", "seed", "lr_max", "lr_min", "warmup_steps",
)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
        file_values = read_yaml(args.config) if args.config else {}
        config = resolve_config(
            mode=args.mode, file_values=file_values, flags={k: getattr(args, k) for k in FLAG_FIELDS}
        )
        if args.dry_run:
            return _dry_run(config)
        from albor.train import train  # torch and deepspeed load only for a real run

        code = int(train(config))
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
    sys.stdout.write(config.to_yaml())
    sys.stdout.write(
        f"# DeepSpeed config: {checked.ds_config_path} (for {checked.device_type}, world size {checked.world_size})\n"
        "# not checked by a dry run: the dataset's shards (read when a run opens them)\n"
    )
    return 0


def _process_group_alive() -> bool:
    from albor.distributed.process_group import is_initialized

    return is_initialized()


if __name__ == "__main__":
    sys.exit(main())
