"""Build the DeepSpeed ZeRO-2 engine around an albor model."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from albor.distributed.process_group import DistEnv


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linears, embedding); never norms' gains, as in GPT-2 and Llama recipes."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: nn.Module, ds_config: dict[str, Any], env: DistEnv, *, lr: float, weight_decay: float):
    """``deepspeed.initialize`` with AdamW; the contract sets the lr on every step."""
    import deepspeed  # here, not at the top: the step and its tests need set_lr, not DeepSpeed's import time

    deepspeed.utils.logger.setLevel(logging.WARNING)
    groups = adamw_param_groups(model, weight_decay)
    ds_config = dict(ds_config)
    if "optimizer" in ds_config:
        # DeepSpeed builds it; torch_adam avoids JIT-compiling FusedAdam on machines without a GPU.
        params = ds_config["optimizer"].setdefault("params", {})
        params.setdefault("torch_adam", env.device.type != "cuda")
        optimizer = None
    else:
        # torch's own fused AdamW on GPU: fast, and nothing to compile.
        optimizer = torch.optim.AdamW(
            groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=env.device.type == "cuda"
        )
    model.to(env.device)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups if optimizer is None else None, optimizer=optimizer, config=ds_config
    )
    return engine


def set_lr(engine, lr: float) -> None:
    """The ZeRO wrapper shares its param groups with the inner optimizer, so this is the lr used."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
