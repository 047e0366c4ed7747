"""Forward+backward throughput of AlborLlama vs transformers' LlamaForCausalLM.

Same config, same weights, same batch, float32 on CPU (or --device cuda).
Prints tokens/s for both and the ratio albor/HF (> 1 means albor is faster).

    python benchmarks/bench_model.py --preset tiny --batch 8 --seq 256
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from albor.model import AlborLlama, hf_config_dict, model_preset, num_parameters, to_hf_state_dict


def loss_fn(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def time_steps(step, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call of `step`, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="HF attention kernel")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import transformers  # benchmark-only dependency

    device = torch.device(args.device)
    cfg = model_preset(args.preset, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    ours = AlborLlama(cfg).to(device)
    hf_cfg = transformers.LlamaConfig(**hf_config_dict(cfg), attn_implementation=args.attn)
    hf = transformers.LlamaForCausalLM(hf_cfg).to(device)
    hf.load_state_dict(to_hf_state_dict(ours, include_tied_head=True), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        loss_fn(ours(ids), ids).backward()

    def step_hf() -> None:
        hf.zero_grad(set_to_none=True)
        loss_fn(hf(input_ids=ids, use_cache=False).logits, ids).backward()

    tokens = args.batch * args.seq
    # Interleave the two so thermal or background drift hits both alike.
    t_hf = time_steps(step_hf, args.warmup, args.iters, device)
    t_ours = time_steps(step_ours, args.warmup, args.iters, device)
    t_hf = min(t_hf, time_steps(step_hf, 0, args.iters, device))
    t_ours = min(t_ours, time_steps(step_ours, 0, args.iters, device))

    print(
        f"preset={args.preset} vocab={cfg.vocab_size} params={num_parameters(cfg, False):,} "
        f"B={args.batch} T={args.seq} device={device} threads={torch.get_num_threads()} "
        f"hf_attn={args.attn} torch={torch.__version__} transformers={transformers.__version__}"
    )
    print(f"albor: {tokens / t_ours:10.0f} tokens/s  ({t_ours * 1e3:.1f} ms/step)")
    print(f"hf:    {tokens / t_hf:10.0f} tokens/s  ({t_hf * 1e3:.1f} ms/step)")
    print(f"ratio albor/hf: {t_hf / t_ours:.3f}")


if __name__ == "__main__":
    main()
