"""DeepSpeed config checks: each contradiction is one clear error, before any process-group work."""

import json

import pytest

from albor.config import PretrainConfig
from albor.distributed.ds_config import DS_CONFIG_DIR, default_ds_config_path, load_ds_config, resolve_ds_config
from albor.errors import ConfigError, ExitCode


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index.json").write_text("{}")
    return PretrainConfig(dataset=tmp_path / "data", output_dir=tmp_path / "run", model="tiny", batch_size=4, grad_clip=1.0)


def resolve(ds, cfg, world=2, device="cpu", bf16=False):
    return resolve_ds_config(ds, cfg, world_size=world, device_type=device, bf16_supported=bf16, source="test.json")


BASE = {"zero_optimization": {"stage": 2}}


def test_auto_values_are_filled_from_the_run(cfg):
    ds = resolve({**BASE, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}, cfg)
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_clipping"]) == (4, 8, 1.0)
    assert ds["gradient_accumulation_steps"] == 1


def test_accumulation_counts_in_train_batch_size(cfg):
    ds = resolve({**BASE, "gradient_accumulation_steps": 4}, cfg, world=8)
    assert ds["train_batch_size"] == 4 * 4 * 8


@pytest.mark.parametrize(
    "ds,message",
    [
        ({**BASE, "train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu 8 != --batch-size 4"),
        ({**BASE, "train_batch_size": 64}, "train_batch_size 64 != micro-batch 4 × accumulation 1 × world size 2 = 8"),
        ({**BASE, "gradient_clipping": 0.5}, "gradient_clipping 0.5 != grad_clip 1.0"),
        ({**BASE, "optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}}}, "optimizer weight_decay 0.1 != weight_decay 0.01"),
        ({**BASE, "optimizer": {"type": "Lamb"}}, "is not Adam/AdamW"),
        ({**BASE, "scheduler": {"type": "WarmupLR"}}, "the contract owns the learning-rate schedule"),
        ({**BASE, "bf16": {"enabled": True}}, "this CPU has no bf16 support"),
        ({**BASE, "bf16": {"enabled": True, "check_grad_overflow": False}}, "check_grad_overflow is false"),
        ({**BASE, "fp16": {"enabled": True}}, "fp16 is enabled"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage 3"),
        ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage 1"),
        ({**BASE, "gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1"),
    ],
)
def test_contradictions_are_refused(cfg, ds, message):
    with pytest.raises(ConfigError) as info:
        resolve(ds, cfg)
    assert message in str(info.value) and "test.json" in str(info.value)
    assert info.value.exit_code == ExitCode.USAGE


def test_bf16_check_grad_overflow_is_set_explicitly(cfg):
    ds = resolve({**BASE, "bf16": {"enabled": True}}, cfg, device="cuda")
    assert ds["bf16"]["check_grad_overflow"] is True


def test_input_is_not_mutated(cfg):
    raw = {**BASE, "gradient_clipping": "auto"}
    resolve(raw, cfg)
    assert raw["gradient_clipping"] == "auto"


def test_shipped_configs_resolve(cfg):
    for world, device in ((8, "cuda"), (1, "cuda"), (2, "cpu")):
        path = default_ds_config_path(device, world)
        ds = resolve(load_ds_config(path), cfg, world=world, device=device, bf16=device == "cuda")
        assert ds["zero_optimization"]["stage"] == 2
    names = {p.name for p in DS_CONFIG_DIR.glob("*.json")}
    assert names == {"zero2-8gpu-bf16.json", "zero2-1gpu-bf16.json", "zero2-cpu-fp32.json"}


def test_8gpu_config_overlaps_communication():
    ds = load_ds_config(default_ds_config_path("cuda", 8))
    z = ds["zero_optimization"]
    assert z["overlap_comm"] and z["contiguous_gradients"] and ds["bf16"]["enabled"]
    # Buckets much smaller than the 370M model's gradients, so reduction overlaps the backward pass.
    assert z["reduce_bucket_size"] < 370e6 / 4


def test_bad_json(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(p)


def test_cli_refuses_before_any_process_group(tmp_path, capsys):
    """Through the real command: exit 2, one line, no run directory, no process group."""
    import torch.distributed as dist

    from albor.pretrain import main

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index.json").write_text("{}")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**BASE, "scheduler": {"type": "WarmupLR"}, "gradient_clipping": 3.0}))
    code = main(["--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--model", "tiny", "--ds-config", str(ds)])
    err = capsys.readouterr().err
    assert code == ExitCode.USAGE and err.count("\n") == 1
    assert "scheduler" in err and "gradient_clipping 3.0 != grad_clip 1.0" in err
    assert not (tmp_path / "run").exists() and not dist.is_initialized()


def test_step_timeout_reaches_every_process_group():
    """ZeRO reduces on groups DeepSpeed made itself: the short timeout must reach them too."""
    import subprocess
    import sys

    code = """
import datetime, torch, torch.distributed as dist
from albor.distributed.process_group import init_distributed
env = init_distributed()
extra = dist.new_group([0])
env.set_timeout(7)
for group in (dist.group.WORLD, extra):
    assert group._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(seconds=7)
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]
