"""The DeepSpeed JSON config: chosen by device, filled from the run config, checked.

Values ``"auto"`` (as in the Hugging Face integration) are filled from the
run config. Anything that contradicts the run config, the world size or the
contract is refused with one clear error, before ``deepspeed.initialize`` and
before any process-group work.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from albor.config import PretrainConfig
from albor.errors import ConfigError

#: Shipped inside the package (so a non-editable install has them); ./ds_configs links here.
DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


def default_ds_config_path(device_type: str, world_size: int) -> Path:
    """The shipped config for this device: multi-GPU, single-GPU dev, or CPU."""
    if device_type == "cuda":
        name = "zero2-8gpu-bf16.json" if world_size > 1 else "zero2-1gpu-bf16.json"
    else:
        name = "zero2-cpu-fp32.json"
    return DS_CONFIG_DIR / name


def load_ds_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {e.strerror}: check --ds-config") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON (line {e.lineno}): fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object")
    return data


def resolve_ds_config(
    ds: dict[str, Any], config: PretrainConfig, *, world_size: int, device_type: str, bf16_supported: bool, source: str
) -> dict[str, Any]:
    """Fill ``"auto"`` values and refuse every contradiction, all reported together."""
    ds = copy.deepcopy(ds)
    problems: list[str] = []

    def fill(key: str, value: Any) -> Any:
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        return ds[key]

    micro = fill("train_micro_batch_size_per_gpu", config.batch_size)
    if micro != config.batch_size:
        problems.append(f"train_micro_batch_size_per_gpu {micro} != --batch-size {config.batch_size}: make them equal")
    accum = ds.setdefault("gradient_accumulation_steps", 1)
    if not isinstance(accum, int) or accum < 1:
        problems.append(f"gradient_accumulation_steps must be an integer >= 1 (got {accum!r})")
        accum = 1
    total = fill("train_batch_size", config.batch_size * accum * world_size)
    if total != config.batch_size * accum * world_size:
        problems.append(
            f"train_batch_size {total} != micro-batch {config.batch_size} × accumulation {accum} × world size "
            f"{world_size} = {config.batch_size * accum * world_size}: fix train_batch_size or set it to \"auto\""
        )
    clip = fill("gradient_clipping", config.grad_clip)
    if clip != config.grad_clip:
        problems.append(f"gradient_clipping {clip} != grad_clip {config.grad_clip}: make them equal or use \"auto\"")
    optimizer = ds.get("optimizer")
    if optimizer is not None:
        kind = str(optimizer.get("type", "")).lower()
        if kind not in ("adam", "adamw"):
            problems.append(f"optimizer type {optimizer.get('type')!r} is not Adam/AdamW: albor trains with AdamW")
        wd = optimizer.get("params", {}).get("weight_decay", "auto")
        if wd == "auto":
            optimizer.setdefault("params", {})["weight_decay"] = config.weight_decay
        elif wd != config.weight_decay:
            problems.append(f"optimizer weight_decay {wd} != weight_decay {config.weight_decay}: make them equal")
        optimizer.setdefault("params", {})["lr"] = config.lr_max  # replaced every step by the contract's schedule
    if "scheduler" in ds:
        problems.append("a DeepSpeed scheduler is set: the contract owns the learning-rate schedule, remove 'scheduler'")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != 2:
        # The optimizer-state sha reads ZeRO-2's partitions; other stages lay the state out differently.
        problems.append(f"zero_optimization.stage {stage}: albor runs ZeRO stage 2; set stage to 2")
    if ds.get("zero_optimization", {}).get("round_robin_gradients", False):
        # Its partitions follow a world-size-dependent order: the sha and a resume on another world size read them in
        # parameter order.
        problems.append("zero_optimization.round_robin_gradients is true: albor needs parameter order; remove it")
    if ds.get("fp16", {}).get("enabled", False):
        problems.append("fp16 is enabled: its loss scaler skips steps by design, which the contract aborts on; use bf16")
    bf16 = ds.get("bf16", ds.get("bfloat16", {}))
    if bf16.get("enabled", False):
        if device_type == "cpu" and not bf16_supported:
            problems.append("bf16 is enabled but this CPU has no bf16 support: use ds_configs/zero2-cpu-fp32.json")
        if bf16.get("check_grad_overflow", True) is False:
            problems.append("bf16.check_grad_overflow is false: a NaN gradient would be applied; set it to true")
        # Explicit, so the behaviour does not change with DeepSpeed's default.
        bf16["check_grad_overflow"] = True
    if problems:
        raise ConfigError(f"DeepSpeed config {source} contradicts the run: " + "; ".join(problems))
    return ds


def uses_bf16(ds: dict[str, Any]) -> bool:
    return bool(ds.get("bf16", ds.get("bfloat16", {})).get("enabled", False))
