"""Peak memory and time of the loss's forward+backward: chunked head + CE vs full logits.

The baseline is today's path: ``lm_head`` over the whole batch, then
``token_loss`` (float32 cross-entropy of the (B, T, V) logits). Each variant
runs in its own subprocess so that one's freed memory cannot hide the other's
peak: on CPU the peak is the growth of the process's max RSS (getrusage) over
its RSS once the inputs exist, before the warm-up step; on a GPU it is
torch.cuda.max_memory_allocated over the same starting point. Both include the
weight's and the hidden states' gradients, which every variant must produce.
The time is the timed steps' alone, after the warm-up.

    python benchmarks/bench_loss.py                     # vocab 50257, 4 x 1024 tokens, hidden 1024, fp32 CPU
    python benchmarks/bench_loss.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(args: argparse.Namespace, chunk: int) -> dict:
    """One variant, in this process: {"peak_bytes", "seconds"} of its forward+backward."""
    import torch

    from albor.loss import chunked_token_loss, token_loss

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    t = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)

    def step() -> None:
        h.grad = w.grad = None
        loss = token_loss(h @ w.t(), t) if chunk == 0 else chunked_token_loss(h, w, t, chunk)
        loss.backward()

    # The starting point, before the warm-up, as the docstring says. ru_maxrss is the process's maximum, so
    # it counts the warm-up's peak either way; a start taken after the warm-up would subtract what that
    # first step leaves resident (library pages, thread stacks, allocator pools: about 20 MiB on CPU).
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    else:
        start_bytes = _rss_bytes()
    step()  # warm-up: allocator pools, kernel selection; untimed, but its peak counts like any step's
    h.grad = w.grad = None
    began = time.perf_counter()
    for _ in range(args.iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start_bytes
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_bytes  # ru_maxrss is KiB on Linux
    return {"peak_bytes": peak, "seconds": (time.perf_counter() - began) / args.iters}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--chunks", default="1024,4096", help="chunk sizes to compare with the unchunked baseline")
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: measure one chunk size, print JSON
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args, args.child)))
        return
    shared = [f"--{k}={getattr(args, k)}" for k in ("vocab", "batch", "seq", "hidden", "iters", "device", "dtype")]
    results = {}
    for chunk in [0, *(int(c) for c in args.chunks.split(","))]:
        out = subprocess.run([sys.executable, __file__, *shared, f"--child={chunk}"], check=True,
                             capture_output=True, text=True).stdout
        results[chunk] = json.loads(out.strip().splitlines()[-1])
    base = results[0]
    print(f"loss forward+backward, vocab {args.vocab}, {args.batch} x {args.seq} tokens, hidden {args.hidden}, "
          f"{args.dtype} on {args.device}")
    print("\n== summary: peak memory and seconds per forward+backward, and their ratios chunked/unchunked ==")
    print(f"{'chunk_tokens':>12} {'peak MiB':>10} {'peak ratio':>10} {'seconds':>8} {'time ratio':>10}")
    for chunk, r in results.items():
        print(f"{chunk or 'unchunked':>12} {r['peak_bytes'] / 2**20:>10.0f} {r['peak_bytes'] / base['peak_bytes']:>10.3f} "
              f"{r['seconds']:>8.2f} {r['seconds'] / base['seconds']:>10.3f}")


if __name__ == "__main__":
    main()
