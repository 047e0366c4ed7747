"""albor's per-step overhead: the contract loop against a bare DeepSpeed loop.

Both loops run in ONE process group, on ONE DeepSpeed engine (the ``tiny``
model, ``ds_configs/zero2-cpu-fp32.json`` resolved as ``albor pretrain`` does),
with the same data (two ``TrainLoader`` cursors with the same seed):

  albor  ``PretrainLoop.train_step`` driven exactly as ``run_epoch`` drives it,
         with the real ``DeepSpeedStep`` (set_lr, forward, backward, step, the
         fused all-reduce, ``.tolist()``, the verdict), the gates, a real
         ``metrics.jsonl`` (``RunFiles`` in a temp dir, rank 0 writes) and the
         same ``on_step`` console hook as ``albor pretrain``. Validation and
         checkpoints are per-epoch costs, not per-step ones, so they are not
         timed (no epoch ever ends inside a timed block).
  bare   ``x, y = loader.next_batch(); loss = batch_loss(engine, x, y);
         engine.backward(loss); engine.step()`` and nothing else: the same
         loss as albor's step (the chunked head + cross-entropy when
         ``--loss-chunk-tokens`` is below a batch's tokens), no prefetch.

Every speed lever is on as ``albor pretrain`` sets it by default, and the
header line says how each resolved: ``--compile auto`` (compiled layers on a
GPU, eager on a CPU; ``on`` forces it here too, for the engine both loops
share), the batches prefetched (``--no-prefetch``: off), the chunked loss
(``--loss-chunk-tokens``, 512 by default so that the 1024-token batches are
chunked), the padded vocabulary (``--vocab-multiple``).

Sharing the engine means both loops train the same weights with the same
optimizer, buckets and memory: the loop around the engine is the only
difference. Two estimators, both after a warm-up of each loop:

  blocks       timed blocks of ~``--block-seconds`` in the order A B, B A, A B,
               ... (ABBA cancels linear drift); each block starts behind a
               barrier and its time is the slowest rank's. Reported: steps/s of
               each (median over blocks, with min-max) and the ratio albor/bare
               (ratio of medians, and median of the per-pair ratios).
  interleaved  single steps A B, B A, ... for ``--interleave-seconds``, timed on
               rank 0 (the ranks run in lockstep); reported: the median of the
               per-pair differences albor - bare in ms and in % of a bare step,
               with a ~95% confidence interval. On a shared machine this is the
               sharper figure: load that changes over seconds cancels in a pair.

With ``--breakdown`` (the default) it then measures where albor's extra time per
step goes, with albor's own code around a stub engine (forward, backward and
step do nothing; the grad norm and step-applied flag come from the real engine):

  * ``DeepSpeedStep`` minus the same ``DeepSpeedStep`` on a ``DistEnv`` whose
    all-reduce is a no-op: the fused all-reduce + ``.tolist()`` (also timed
    alone in a tight loop, which is faster: no wake-up latency);
  * that no-op ``DeepSpeedStep`` minus the bare loop around the same stub: the
    step function's local work (set_lr, flags, stack, ``combine_rows``), with
    ``GpuUtilization.read()`` (NVML, or a 0 without a GPU) alone;
  * ``PretrainLoop.train_step`` around a step function returning a fixed result
    (lr, gates, StepMetrics, the ``metrics.jsonl`` line, ``on_step``), on rank 0,
    which alone writes files, with the JSON line alone.

Usage (from the repository root, with the virtualenv active)::

    python benchmarks/bench_overhead.py                        # 2 ranks, 4x256 and 8x512
    python benchmarks/bench_overhead.py --sizes 4x256 --blocks 8 --block-seconds 4
    python benchmarks/bench_overhead.py --dataset /path/to/index-dir --nproc 2

Run as a script it prepares ``/tmp/bench-data`` when it is missing
(``albor prepare-data --builtin python-stdlib --max-bytes 2000000``), picks a
free port and launches itself as
``deepspeed --num_gpus N --master_port P --module benchmarks.bench_overhead``.
It can also be launched that way directly (from the repository root; then
``--dataset`` must already exist)::

    deepspeed --num_gpus 2 --module benchmarks.bench_overhead --dataset /tmp/bench-data

Each rank uses ``--threads`` torch threads (default: cores // ranks, at least 1)
so two ranks do not oversubscribe the cores. CPU only as written (gloo); on a
GPU the picture differs (the bare loop never syncs the host, albor's
``.tolist()`` does, once per step).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = Path("/tmp/bench-data")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="token index dir (prepared when missing)")
    ap.add_argument("--sizes", default="4x256,8x512", help="micro-batch x seq per rank, comma separated")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (script mode only)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default cores // ranks)")
    ap.add_argument("--blocks", type=int, default=6, help="timed blocks per loop (ABBA order)")
    ap.add_argument("--block-seconds", type=float, default=3.0, help="target length of one timed block")
    ap.add_argument("--interleave-seconds", type=float, default=20.0,
                    help="length of the single-step A/B interleaving phase")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps of each loop before the blocks")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the overhead breakdown")
    ap.add_argument("--breakdown-iters", type=int, default=500)
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                    help="compile the decoder layers: auto = as albor pretrain (on a GPU only)")
    ap.add_argument("--no-prefetch", dest="prefetch", action="store_false", help="albor's loader without prefetch")
    ap.add_argument("--loss-chunk-tokens", type=int, default=512, help="the chunked loss (0: whole-batch logits)")
    ap.add_argument("--vocab-multiple", type=int, default=64, help="the model's padded vocabulary rows (1: none)")
    ap.add_argument("--verbose", action="store_true", help="keep DeepSpeed launcher output")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed's launcher
    return ap.parse_args(argv)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        b, t = part.lower().split("x")
        out.append((int(b), int(t)))
    return out


# ── script mode: prepare the data, launch the ranks ─────────────────────────
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    dataset = args.dataset
    if not (dataset / "index.json").is_file() and not (dataset.is_file() and dataset.name.endswith(".json")):
        print(f"preparing {dataset} (albor prepare-data --builtin python-stdlib --max-bytes 2000000)", flush=True)
        albor = Path(sys.executable).parent / "albor"
        cmd = [str(albor)] if albor.exists() else [sys.executable, "-m", "albor.cli"]
        subprocess.run(
            [*cmd, "prepare-data", "--builtin", "python-stdlib", "--output", str(dataset), "--max-bytes", "2000000"],
            check=True,
        )
    ds_bin = Path(sys.executable).parent / "deepspeed"
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    cmd = [
        str(ds_bin) if ds_bin.exists() else "deepspeed", "--num_gpus", str(args.nproc),
        "--master_port", str(free_port()), "--module", "benchmarks.bench_overhead",
        *argv, "--dataset", str(dataset.resolve()), "--threads", str(threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        launcher_noise = "[launch.py:" in line or "[runner.py:" in line or "[real_accelerator.py:" in line
        if args.verbose or not launcher_noise:
            sys.stdout.write(line)
            sys.stdout.flush()
    return proc.wait()


# ── worker mode: one rank of the benchmark ──────────────────────────────────
def worker(args: argparse.Namespace) -> int:
    import dataclasses
    import gc
    import logging
    import math

    import torch
    import torch.distributed as dist

    from albor.config import PretrainConfig
    from albor.console import format_step, setup_logging
    from albor.data.loader import TrainLoader
    from albor.distributed.ds_config import DS_CONFIG_DIR, load_ds_config, resolve_ds_config
    from albor.distributed.process_group import DistEnv, init_distributed, shutdown
    from albor.distributed.step import SLOTS, DeepSpeedStep, batch_loss
    from albor.loop import StepResult
    from albor.run_files import RunFiles
    from albor.run_setup import build_run, open_data

    threads = args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    env = init_distributed()
    setup_logging(env.rank, env.world_size)
    main = env.is_main

    def say(msg: str = "") -> None:
        if main:
            print(msg, flush=True)

    index = args.dataset / "index.json" if args.dataset.is_dir() else args.dataset
    if not index.is_file():
        say(f"no dataset at {args.dataset}: run `python benchmarks/bench_overhead.py` (it prepares one) or "
            "`albor prepare-data --builtin python-stdlib --output /tmp/bench-data --max-bytes 2000000`")
        return 2
    ds_path = DS_CONFIG_DIR / "zero2-cpu-fp32.json"
    say(f"bench_overhead: world {env.world_size} on {env.device} | {threads} torch thread(s)/rank | "
        f"model tiny | {ds_path.name} | dataset {args.dataset}")
    levers = dict(compile={"auto": None, "on": True, "off": False}[args.compile], prefetch=args.prefetch,
                  loss_chunk_tokens=args.loss_chunk_tokens, vocab_multiple=args.vocab_multiple)

    def max_over_ranks(x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def timed(fn, n: int) -> float:
        """Seconds for fn(n), from a common start, on the slowest rank."""
        dist.barrier()
        t0 = time.perf_counter()
        fn(n)
        return max_over_ranks(time.perf_counter() - t0)

    results = []
    tmp_root = Path(tempfile.mkdtemp(prefix="albor-bench-overhead-")) if main else None
    for micro, seq in parse_sizes(args.sizes):
        out_dir = (tmp_root / f"run-{micro}x{seq}") if tmp_root else Path(tempfile.gettempdir()) / "unused-rank-dir"
        total_steps = 10**6  # no epoch ends (no validation, no checkpoint) inside the benchmark
        config = PretrainConfig(
            dataset=args.dataset, output_dir=out_dir, model="tiny", batch_size=micro, seq_length=seq,
            total_steps=total_steps, steps_per_epoch=total_steps, warmup_steps=10, lr_max=3e-4, lr_min=3e-5,
            **levers,
        )
        ds = resolve_ds_config(
            load_ds_config(ds_path), config, world_size=env.world_size, device_type=env.device.type,
            bf16_supported=False, source=str(ds_path),
        )
        accum = ds["gradient_accumulation_steps"]

        # (a) albor: the run's parts and loop, built exactly as albor.train builds them.
        data = open_data(config, env)
        parts = build_run(config, env, ds, data)
        engine, gpu = parts.engine, parts.gpu
        chunk = config.loss_chunk_tokens
        say(f"levers: compile {args.compile} -> {'on' if parts.compiled else 'off'} | prefetch "
            f"{'on' if config.prefetch else 'off'} (albor's loop; the bare loop reads its batches itself) | "
            f"loss_chunk_tokens {chunk} ({'chunked' if 0 < chunk < micro * seq else 'one piece'} at {micro * seq} "
            f"tokens, both loops) | vocab_multiple {config.vocab_multiple}")
        files = RunFiles(out_dir, enabled=main)
        log_every = max(1, min(50, config.steps_per_epoch // 4))

        def on_step(r: dict) -> None:  # albor.train's hook
            if r["step"] % log_every == 0:
                logging.getLogger("albor").info(format_step(r))

        loop = parts.loop(config, env, files, on_step=on_step)
        next_step = [0]

        def albor_steps(n: int) -> None:  # run_epoch's inner loop
            started = loop.clock()
            for _ in range(n):
                _, started = loop.train_step(next_step[0], 0, started)
                next_step[0] += 1

        # (b) bare DeepSpeed: nothing but forward, loss, backward, step, on a second cursor over the same data.
        bare_loader = TrainLoader(data.dataset.split("train"), micro_batch=micro, seq_length=seq, rank=env.rank,
                                  world_size=env.world_size, seed=config.seed)

        def bare_steps(n: int) -> None:
            for _ in range(n):
                for _ in range(accum):
                    x, y = bare_loader.next_batch()
                    engine.backward(batch_loss(engine, x, y, chunk))
                    engine.step()

        # Warm-up, then size the blocks from the warm-up speed (the same n on every rank).
        timed(albor_steps, 2)
        timed(bare_steps, 2)
        per_step = max(timed(albor_steps, args.warmup), timed(bare_steps, args.warmup)) / args.warmup
        n = max(3, int(round(max_over_ranks(args.block_seconds / per_step))))
        say(f"\n== micro-batch {micro} x seq {seq} per rank ({micro * seq * env.world_size} tokens/step) | "
            f"{args.blocks} blocks of {n} steps per loop, ABBA ==")
        rates: dict[str, list[float]] = {"albor": [], "bare": []}
        for k in range(args.blocks):
            order = ("albor", "bare") if k % 2 == 0 else ("bare", "albor")
            for name in order:
                s = timed(albor_steps if name == "albor" else bare_steps, n)
                rates[name].append(n / s)
            say(f"  block {k}: albor {rates['albor'][-1]:7.3f} steps/s | bare {rates['bare'][-1]:7.3f} steps/s | "
                f"ratio {rates['albor'][-1] / rates['bare'][-1]:.4f}")
        a_med, b_med = statistics.median(rates["albor"]), statistics.median(rates["bare"])
        pair = [a / b for a, b in zip(rates["albor"], rates["bare"])]
        r_med = statistics.median(pair)
        extra_ms = (1 / a_med - 1 / b_med) * 1e3
        say(f"  albor: {a_med:.3f} steps/s (median; {min(rates['albor']):.3f}-{max(rates['albor']):.3f}) "
            f"= {1e3 / a_med:.1f} ms/step")
        say(f"  bare : {b_med:.3f} steps/s (median; {min(rates['bare']):.3f}-{max(rates['bare']):.3f}) "
            f"= {1e3 / b_med:.1f} ms/step")
        say(f"  ratio albor/bare: {a_med / b_med:.4f} (of medians), {r_med:.4f} (median of pairs, "
            f"{min(pair):.4f}-{max(pair):.4f}) -> overhead {(1 / r_med - 1) * 100:+.2f}% time/step, "
            f"{extra_ms:+.2f} ms/step")

        # Step-by-step interleaving: A B, B A, ... one step each, timed on rank 0 (the ranks run in lockstep).
        # Slow drift in the machine's load cancels within each pair; the median shrugs off spikes.
        pairs = max(15, int(round(max_over_ranks(args.interleave_seconds / (2 * per_step)))))
        times: dict[str, list[float]] = {"albor": [], "bare": []}
        dist.barrier()
        for k in range(pairs):
            for name in (("albor", "bare") if k % 2 == 0 else ("bare", "albor")):
                t0 = time.perf_counter()
                (albor_steps if name == "albor" else bare_steps)(1)
                times[name].append(time.perf_counter() - t0)
        diffs = sorted((a - b) * 1e3 for a, b in zip(times["albor"], times["bare"]))
        d_med = statistics.median(diffs)
        j = max(0, int(len(diffs) / 2 - 0.98 * math.sqrt(len(diffs))))  # order statistics: ~95% CI of the median
        lo, hi = diffs[j], diffs[len(diffs) - 1 - j]
        a_ms, b_ms = statistics.median(times["albor"]) * 1e3, statistics.median(times["bare"]) * 1e3
        say(f"  interleaved, {pairs} pairs of single steps: albor {a_ms:.1f} ms, bare {b_ms:.1f} ms (medians, rank 0)")
        say(f"  albor - bare per step: {d_med:+.2f} ms (median of pairs, ~95% CI {lo:+.2f} .. {hi:+.2f}) "
            f"= {d_med / b_ms * 100:+.2f}% ({lo / b_ms * 100:+.2f} .. {hi / b_ms * 100:+.2f}%)")

        breakdown: dict[str, float] = {}
        if args.breakdown:
            iters = args.breakdown_iters

            class StubEngine:
                """Forward/backward/step do nothing; the rest is the real engine's."""

                optimizer = engine.optimizer
                module = engine.module

                def __init__(self) -> None:
                    self.logits = torch.zeros(1, 1, 8)

                def __call__(self, x, **kwargs):
                    return self.logits

                def backward(self, loss):
                    pass

                def step(self):
                    pass

                def was_step_applied(self):
                    return engine.was_step_applied()

                def get_global_grad_norm(self):
                    return engine.get_global_grad_norm()

            class StubLoader:
                data_epoch = 0
                batch = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))

                def next_batch(self):
                    return self.batch

            stub, stub_loader = StubEngine(), StubLoader()
            stub_step = DeepSpeedStep(stub, stub_loader, env, grad_accumulation=accum, gpu=gpu)

            class NoCommEnv(DistEnv):
                def all_reduce_sum_(self, tensor):  # the fused all-reduce left out, all else the same
                    return tensor

            no_comm = NoCommEnv(env.rank, env.world_size, env.local_rank, env.device)
            stub_step_no_comm = DeepSpeedStep(stub, stub_loader, no_comm, grad_accumulation=accum, gpu=gpu)

            def stub_albor_no_comm_fn(k: int) -> None:
                for i in range(k):
                    stub_step_no_comm(i, 1e-4)

            def stub_albor_fn(k: int) -> None:
                for i in range(k):
                    stub_step(i, 1e-4)

            def stub_bare_fn(k: int) -> None:
                for _ in range(k):
                    for _ in range(accum):
                        x, y = stub_loader.next_batch()
                        stub.backward(batch_loss(stub, x, y, 0))  # the stub step's loss (one piece)
                        stub.step()

            buf = torch.zeros(env.world_size * SLOTS, dtype=torch.float64, device=env.device)

            def allreduce_fn(k: int) -> None:
                for _ in range(k):
                    env.all_reduce_sum_(buf.zero_())
                    buf.tolist()

            fixed = StepResult(
                train_loss=3.0, grad_norm=1.0, tokens=micro * seq * env.world_size, gpu_util_pct=0.0,
                extra={"gpu_util_per_rank": [0.0] * env.world_size, "data_epoch": 0},
            )
            scratch = RunFiles((tmp_root / f"scratch-{micro}x{seq}") if tmp_root else out_dir, enabled=main)
            # The same loop over a step function that returns a fixed result: the loop's own cost alone.
            loop_only = dataclasses.replace(parts, step_fn=lambda step, lr: fixed).loop(
                config, env, scratch, on_step=on_step
            )

            def loop_only_fn(k: int) -> None:
                started = loop_only.clock()
                for i in range(k):
                    _, started = loop_only.train_step(i, 0, started)

            def rank0_time(fn, k: int) -> float:  # per-rank cost; rank 0 is the one the others wait for
                dist.barrier()
                t0 = time.perf_counter()
                fn(k)
                t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                dist.broadcast(t, src=0)
                return float(t.item())

            def best_us(fn, k: int, per_rank: bool = False, reps: int = 5) -> float:
                fn(min(k, 20))  # warm
                f = rank0_time if per_rank else timed
                return min(f(fn, k) for _ in range(reps)) / k * 1e6

            albor_log = logging.getLogger("albor")
            level = albor_log.level
            albor_log.setLevel(logging.WARNING)  # on_step still formats its line; only the printing is muted
            breakdown["step_fn_albor_us"] = best_us(stub_albor_fn, iters)
            breakdown["step_fn_no_comm_us"] = best_us(stub_albor_no_comm_fn, iters, per_rank=True)
            breakdown["step_fn_bare_us"] = best_us(stub_bare_fn, iters, per_rank=True)
            breakdown["allreduce_tight_us"] = best_us(allreduce_fn, iters)
            breakdown["loop_us"] = best_us(loop_only_fn, iters, per_rank=True)
            record = {**dataclasses.asdict(loop_only.step_metrics[-1]), "epoch": 0, "tokens_seen": 0, "mfu": None,
                      **fixed.extra}
            breakdown["json_line_us"] = best_us(lambda k: [scratch.append_metrics(record) for _ in range(k)],
                                                iters, per_rank=True)
            breakdown["gpu_read_us"] = best_us(lambda k: [gpu.read() for _ in range(k)], iters, per_rank=True)
            albor_log.setLevel(level)
            scratch.close()
            comm = breakdown["step_fn_albor_us"] - breakdown["step_fn_no_comm_us"]
            local = breakdown["step_fn_no_comm_us"] - breakdown["step_fn_bare_us"]
            predicted = comm + local + breakdown["loop_us"]
            bare_us = 1e6 / b_med

            def row(label: str, us: float, note: str = "") -> None:
                say(f"    {label:<52} {us:8.1f} us  {us / bare_us * 100:6.3f}%  {note}")

            say(f"  breakdown of albor's extra cost per step (best of 5 x {iters}; stub engine, so no model compute;"
                f" % of a bare step):")
            row("fused all-reduce + .tolist(), inside the step fn", comm,
                f"(tight loop alone: {breakdown['allreduce_tight_us']:.0f} us)")
            row("step fn local work (set_lr, flags, stack, combine_rows)", local,
                f"(stub step fn {breakdown['step_fn_no_comm_us']:.1f} - bare stub {breakdown['step_fn_bare_us']:.1f})")
            row(f"  incl. GpuUtilization.read() ({'NVML' if gpu.available else 'no GPU: returns 0'})",
                breakdown["gpu_read_us"])
            row("PretrainLoop.train_step on rank 0 (gates, metrics, on_step)", breakdown["loop_us"])
            row("  incl. metrics.jsonl line (json.dumps + write)", breakdown["json_line_us"])
            row("predicted total", predicted, f"(measured: {extra_ms * 1e3:+.0f} us, noise above)")

        results.append((micro, seq, a_med, b_med, r_med, extra_ms, d_med, d_med / b_ms * 100, breakdown))
        files.close()
        if main:
            lines = (out_dir / "metrics.jsonl").read_text().count("\n")
            say(f"  metrics.jsonl: {lines} lines written by the albor loop ({out_dir})")
        loop = parts = engine = None  # freed before the next size (closures above still name them)
        gc.collect()
        dist.barrier()

    say("\n== summary: steps/s (median over blocks), ratio albor/bare (median of block pairs), "
        "and albor's extra time per step (median of interleaved single-step pairs) ==")
    say(f"  {'size':>9} {'albor':>8} {'bare':>8} {'ratio':>7} {'blocks':>8} {'interleaved':>20}")
    for micro, seq, a, b, r, _, d, d_pct, _ in results:
        say(f"  {f'{micro}x{seq}':>9} {a:8.3f} {b:8.3f} {r:7.4f} {(1 / r - 1) * 100:+7.2f}% "
            f"{d:+8.2f} ms = {d_pct:+5.2f}%")
    if tmp_root is not None:
        import shutil

        shutil.rmtree(tmp_root, ignore_errors=True)
    shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if "RANK" in os.environ:
        return worker(args)
    return launch(args, argv)


if __name__ == "__main__":
    sys.exit(main())
