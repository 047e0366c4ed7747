"""Checks that need no process group and no model: shared by a real run and ``--dry-run``.

The config itself is validated at construction; this adds what depends on the
machine and the launcher: the installed torch and DeepSpeed, the DeepSpeed
config against the world size and the device, the fault-drill switch, and the
sequence length against the model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from albor.config import PretrainConfig
from albor.distributed.compat import check_environment, cpu_bf16_supported
from albor.distributed.ds_config import default_ds_config_path, load_ds_config, resolve_ds_config
from albor.distributed.process_group import device_type, launched_world_size
from albor.errors import ConfigError
from albor.faults import FaultPlan, fault_plan_from_env
from albor.model import model_preset
from albor.model_compile import resolve_compile


@dataclasses.dataclass(frozen=True)
class Preflight:
    faults: FaultPlan | None
    ds_config: dict[str, Any]
    ds_config_path: Path
    world_size: int
    device_type: str


def preflight(config: PretrainConfig) -> Preflight:
    """Everything checkable before the process group.

    Raises UnsupportedEnvironmentError (exit 6) when the installed torch or
    DeepSpeed lacks a name albor relies on, or ``compile: true`` where torch.compile
    cannot run, ConfigError (exit 2) for the rest.
    """
    check_environment()
    world_size, device = launched_world_size(), device_type()
    if config.compile:  # forced on: refused here, before any process group or model (auto never refuses)
        resolve_compile(True, device)
    faults = fault_plan_from_env(world_size=world_size)
    ds_path = config.ds_config or default_ds_config_path(device, world_size)
    ds = resolve_ds_config(
        load_ds_config(ds_path), config, world_size=world_size, device_type=device,
        bf16_supported=cpu_bf16_supported(), source=str(ds_path),
    )
    max_positions = model_preset(config.model).max_position_embeddings
    if config.seq_length > max_positions:
        raise ConfigError(
            f"seq_length {config.seq_length} > the {config.model} model's max positions {max_positions}: lower --seq-length"
        )
    return Preflight(faults, ds, ds_path, world_size, device)
