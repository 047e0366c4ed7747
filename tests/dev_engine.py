"""A real tiny ZeRO-2 engine in this process, on a one-rank gloo group (albor's dev mode), for fast tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def dev_mode_group(data_dir: Path) -> Iterator[tuple[object, dict]]:
    """(env, resolved DeepSpeed config) of a one-rank gloo group, as albor's dev mode makes them; torn down after."""
    from albor.config import PretrainConfig
    from albor.distributed.ds_config import DS_CONFIG_DIR, load_ds_config, resolve_ds_config
    from albor.distributed.process_group import init_distributed, shutdown

    (data_dir / "index.json").write_text("{}")  # config validation only looks for it
    config = PretrainConfig(dataset=data_dir, model="tiny", batch_size=2, seq_length=8)
    with pytest.MonkeyPatch.context() as mp:
        for name in LAUNCHER_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("OMP_NUM_THREADS", "1")  # keeps init_distributed from resizing pytest's thread pool
        mp.setenv("DS_ACCELERATOR", "cpu")
        assert not dist.is_initialized()
        env = init_distributed()
        try:
            yield env, resolve_ds_config(load_ds_config(DS_CONFIG_DIR / "zero2-cpu-fp32.json"), config, world_size=1,
                                         device_type="cpu", bf16_supported=False, source="zero2-cpu-fp32.json")
        finally:
            shutdown()


@contextlib.contextmanager
def dev_mode_engine(data_dir: Path, *, steps: int, vocab: int = 64) -> Iterator[tuple[object, object]]:
    """(engine, env) after ``steps`` optimizer steps, built as albor builds it; the group is torn down after."""
    from albor.distributed.engine import build_engine
    from albor.model import AlborLlama, model_preset

    with dev_mode_group(data_dir) as (env, ds):
        torch.manual_seed(0)
        engine = build_engine(AlborLlama(model_preset("tiny", vocab_size=vocab)), ds, env, lr=1e-3, weight_decay=0.01)
        batches = torch.randint(0, vocab, (steps, 2, 9), generator=torch.Generator().manual_seed(1))
        for tokens in batches:
            logits = engine(tokens[:, :-1])
            engine.backward(torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)))
            engine.step()
        yield engine, env
