"""The GPU check's bare-loop row: albor's contract loop against a bare DeepSpeed loop, on ONE engine.

The run is built as ``albor pretrain`` builds it, from the same flags
(``albor.run_setup.build_run``: the model, every lever, the engine), in one
process (dev mode). Then blocks of steps of the two loops alternate, ABBA:

  albor  ``PretrainLoop.train_step``: the step function (set_lr, forward,
         backward, step, the fused all-reduce and its one host sync), the gates,
         the metrics.jsonl line and the console hook, as ``run_epoch`` drives it;
  bare   ``x, y = loader.next_batch(); engine.backward(batch_loss(engine, x, y));
         engine.step()`` and nothing else, on a second cursor over the same data.

Both compute the same loss (``albor.distributed.step.batch_loss`` with the run's
``--loss-chunk-tokens``) on the same engine and weights, so the loop around the
engine is the only difference. Each block starts and ends with a device sync:
the bare loop never waits for the device on its own. benchmarks/bench_overhead.py
is the CPU (gloo, two ranks) version of this comparison, with a cost breakdown.

    python benchmarks/gpu_check_bare.py --json OUT.json [--blocks 6 --block-steps 5] -- PRETRAIN_FLAGS...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(this script's options, the ``albor pretrain`` flags after ``--``)."""
    if "--" not in argv:
        raise SystemExit("usage: gpu_check_bare.py [options] -- ALBOR_PRETRAIN_FLAGS...")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True, help="where the result goes")
    ap.add_argument("--blocks", type=int, default=6, help="timed blocks of each loop, in ABBA order")
    ap.add_argument("--block-steps", type=int, default=5, help="steps per block")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each loop first (compiles, allocates)")
    return ap.parse_args(argv[:cut]), argv[cut + 1:]


def main(argv: list[str] | None = None) -> int:
    args, flags = parse_args(sys.argv[1:] if argv is None else argv)
    from albor.config import read_yaml, resolve_config
    from albor.pretrain import FLAG_FIELDS, build_parser

    ns = build_parser().parse_args(flags)
    config = resolve_config(mode=ns.mode, file_values=read_yaml(ns.config) if ns.config else {},
                            flags={k: getattr(ns, k) for k in FLAG_FIELDS})
    log_every = max(1, min(50, config.steps_per_epoch // 4))  # albor.train's, from the run as asked
    # No epoch may end inside a timed block (validation and checkpoints are per-epoch costs).
    config = dataclasses.replace(config, total_steps=10**6, steps_per_epoch=10**6)

    import torch

    from albor.console import setup_logging
    from albor.data.loader import TrainLoader
    from albor.distributed.process_group import init_distributed, shutdown
    from albor.distributed.step import batch_loss
    from albor.preflight import preflight
    from albor.progress import StepOutput
    from albor.run_files import RunFiles
    from albor.run_setup import build_run, open_data

    checked = preflight(config)
    env = init_distributed()
    setup_logging(env.rank, env.world_size)
    data = open_data(config, env)
    parts = build_run(config, env, checked.ds_config, data)
    engine, accum, device = parts.engine, checked.ds_config["gradient_accumulation_steps"], env.device
    files = RunFiles(config.output_dir, enabled=env.is_main)
    hook = StepOutput.for_run(rank=env.rank, run_dir=config.output_dir, total_steps=config.total_steps,
                              log_every=log_every, tensorboard=False)
    loop = parts.loop(config, env, files, on_step=hook)
    bare_loader = TrainLoader(data.dataset.split("train"), micro_batch=config.batch_size,
                              seq_length=config.seq_length, rank=env.rank, world_size=env.world_size, seed=config.seed)
    next_step = [0]

    def albor_steps(n: int) -> None:  # run_epoch's inner loop
        started = loop.clock()
        for _ in range(n):
            _, started = loop.train_step(next_step[0], 0, started)
            next_step[0] += 1

    def bare_steps(n: int) -> None:
        for _ in range(n):
            for _ in range(accum):
                x, y = bare_loader.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                engine.backward(batch_loss(engine, x, y, config.loss_chunk_tokens))
                engine.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def ms_per_step(fn, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        fn(n)
        sync()
        return (time.perf_counter() - t0) / n * 1e3

    for fn in (albor_steps, bare_steps):
        ms_per_step(fn, args.warmup)
    times: dict[str, list[float]] = {"albor": [], "bare": []}
    for k in range(args.blocks):
        for name in (("albor", "bare") if k % 2 == 0 else ("bare", "albor")):
            times[name].append(ms_per_step(albor_steps if name == "albor" else bare_steps, args.block_steps))
    pairs = [a / b for a, b in zip(times["albor"], times["bare"])]
    result = {
        "albor_ms": statistics.median(times["albor"]), "bare_ms": statistics.median(times["bare"]),
        "ratio": statistics.median(pairs),  # albor/bare, median of the block pairs
        "blocks": args.blocks, "block_steps": args.block_steps, "warmup": args.warmup,
        "albor_ms_blocks": times["albor"], "bare_ms_blocks": times["bare"],
        "device": str(device), "compiled": parts.compiled, "loss_chunk_tokens": config.loss_chunk_tokens,
    }
    hook.close()
    files.close()
    if env.is_main:
        args.json.write_text(json.dumps(result) + "\n")
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
