"""Forward+backward throughput of AlborLlama with its decoder layers torch.compile'd, against eager.

What a training step computes, without DeepSpeed: the forward to the hidden
states, albor's chunked head + cross-entropy (albor.distributed.step.batch_loss,
``--loss-chunk-tokens``), the backward; the same weights, batch and
deterministic setting for both. The compiled copy is compiled as a run compiles
it (albor.model_compile.compile_layers). Prints tokens/s of each, the ratio
compiled/eager (> 1: compiling pays), and the compile time (the first call's
time less a steady call's) with whether inductor's on-disk cache already held
the graphs (a rerun's compile is mostly a cache read; ``--cold`` starts from an
empty cache).

    python benchmarks/bench_compile.py                          # CPU: tiny and mid, ~1-2 min on 2 cores
    python benchmarks/bench_compile.py --device cuda            # GPU: albor-370m, bf16, 16 x 1024
    python benchmarks/bench_compile.py --runs tiny:8x256 --iters 5

``mid`` is not a preset: the tiny architecture at hidden 512, 8 layers
(8 heads, 2 KV heads, head_dim 64, intermediate 1408), to show how the ratio
moves with size on a CPU. The CPU default vocabulary is 4096 (the head and the
loss are not compiled and are the same work in both; at 50257 they would
dominate a small model's step on a CPU and dilute the ratio); on a GPU the
preset's.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time

CPU_RUNS = "tiny:4x128,mid:2x128"
CUDA_RUNS = "albor-370m:16x1024"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--runs", default=None, help=f"model:BxT, comma separated (default {CPU_RUNS} on cpu, "
                    f"{CUDA_RUNS} on cuda); model is a preset or 'mid'")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: 4096 on cpu, the preset's on cuda")
    ap.add_argument("--vocab-multiple", type=int, default=64, help="the model's padded vocabulary rows (1: none)")
    ap.add_argument("--loss-chunk-tokens", type=int, default=4096, help="as the run's flag; 0: whole-batch logits")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="parameter dtype (default float32 on cpu, bfloat16 on cuda, as DeepSpeed casts them)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each after the first")
    ap.add_argument("--iters", type=int, default=3, help="calls per timed block")
    ap.add_argument("--blocks", type=int, default=4, help="timed blocks of each, interleaved ABBA")
    ap.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                    help="let torch pick non-deterministic kernels (runs are deterministic by default)")
    ap.add_argument("--cold", action="store_true", help="compile from an empty inductor cache (a first run's time)")
    return ap.parse_args(argv)


def mid_config(base):
    """The 'mid' benchmark model: tiny's architecture, four times wider and twice as deep."""
    return dataclasses.replace(base, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                               intermediate_size=1408)


class AsEngine:
    """A model called as the step calls DeepSpeed's engine (``batch_loss`` reads ``.module``)."""

    def __init__(self, module) -> None:
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cold:  # before torch's import: inductor reads it once
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="albor-bench-compile-")

    import torch
    from torch._dynamo.utils import counters

    from albor.determinism import apply_determinism
    from albor.distributed.compat import inductor_problem
    from albor.distributed.step import batch_loss
    from albor.model import AlborLlama, model_preset, num_parameters
    from albor.model_compile import compile_layers

    device = torch.device(args.device)
    problem = inductor_problem(device.type)
    if problem is not None:
        print(f"bench_compile: cannot compile on {device.type}: {problem}", file=sys.stderr)
        return 6
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    vocab = args.vocab_size or (4096 if device.type == "cpu" else None)
    apply_determinism(args.deterministic, device.type)  # as a run sets it (cuBLAS workspace, SDPA backends)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"bench_compile: device {device} | {torch.get_num_threads()} threads | {dtype} | torch {torch.__version__} "
          f"| deterministic {args.deterministic} | loss_chunk_tokens {args.loss_chunk_tokens} | "
          f"inductor cache {'empty (--cold)' if args.cold else 'as left by earlier runs'}")
    summary = []
    for run in (args.runs or (CUDA_RUNS if device.type == "cuda" else CPU_RUNS)).split(","):
        name, shape = run.split(":")
        batch, seq = (int(v) for v in shape.lower().split("x"))
        cfg = mid_config(model_preset("tiny", vocab_size=vocab)) if name == "mid" else model_preset(name, vocab_size=vocab)
        torch.manual_seed(0)
        eager = AlborLlama(cfg, vocab_multiple=args.vocab_multiple).to(device=device, dtype=dtype)
        compiled = copy.deepcopy(eager)
        compile_layers(compiled, deterministic=args.deterministic)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
        x, y = ids[:, :-1], ids[:, 1:]
        tokens = batch * seq

        def step(model) -> float:
            model.zero_grad(set_to_none=True)
            loss = batch_loss(AsEngine(model), x, y, args.loss_chunk_tokens)
            loss.backward()
            return loss

        def timed(model, n: int) -> float:
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                step(model)
            sync()
            return (time.perf_counter() - t0) / n

        print(f"\n== {name}: {num_parameters(cfg, False) / 1e6:.1f}M params, {cfg.num_layers} layers x hidden "
              f"{cfg.hidden_size}, vocab {cfg.vocab_size}, batch {batch} x {seq} ==")
        hits_before = counters["inductor"]["fxgraph_cache_hit"]
        first = timed(compiled, 1)  # compiles the layers' forward and backward graphs
        hit = counters["inductor"]["fxgraph_cache_hit"] > hits_before
        # Same numbers before the timing: a compiled model that computed something else would be no speed-up.
        loss_e, loss_c = step(eager).item(), step(compiled).item()
        grads = max((p.grad.float() - q.grad.float()).abs().max().item()
                    for p, q in zip(eager.parameters(), compiled.parameters()) if p.grad is not None)
        timed(eager, args.warmup)
        timed(compiled, args.warmup)
        t = {"eager": [], "compiled": []}
        for k in range(args.blocks):  # ABBA: drift in the machine's load falls on both alike
            for which in (("eager", "compiled") if k % 2 == 0 else ("compiled", "eager")):
                t[which].append(timed(eager if which == "eager" else compiled, args.iters))
        te, tc = statistics.median(t["eager"]), statistics.median(t["compiled"])
        compile_s = first - tc
        print(f"  loss eager {loss_e:.6f} compiled {loss_c:.6f}; largest grad difference {grads:.2e}")
        print(f"  eager:    {tokens / te:10.0f} tokens/s  ({te * 1e3:8.1f} ms/step, median of {args.blocks} blocks "
              f"of {args.iters}; {min(t['eager']) * 1e3:.1f}-{max(t['eager']) * 1e3:.1f})")
        print(f"  compiled: {tokens / tc:10.0f} tokens/s  ({tc * 1e3:8.1f} ms/step; "
              f"{min(t['compiled']) * 1e3:.1f}-{max(t['compiled']) * 1e3:.1f})")
        print(f"  compile time: {compile_s:.1f} s (first call {first:.1f} s; inductor cache "
              f"{'hit' if hit else 'miss: compiled from scratch'})")
        print(f"  ratio compiled/eager: {te / tc:.3f}")
        summary.append((name, batch, seq, tokens / te, tokens / tc, te / tc, compile_s, hit))
        del eager, compiled
    print("\n== summary: tokens/s of forward+backward (training loss), compiled/eager, compile time ==")
    print(f"  {'model':>12} {'batch':>9} {'eager':>10} {'compiled':>10} {'ratio':>7} {'compile':>14}")
    for name, batch, seq, e, c, r, cs, hit in summary:
        print(f"  {name:>12} {f'{batch}x{seq}':>9} {e:10.0f} {c:10.0f} {r:7.3f} {cs:8.1f} s {'(cache)' if hit else '(cold)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
