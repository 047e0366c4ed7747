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
    """README: buckets of 5e7 elements; the 370M model's gradients make about seven of them."""
    import torch

    from albor.model import AlborLlama, model_preset, num_parameters

    ds = load_ds_config(default_ds_config_path("cuda", 8))
    z = ds["zero_optimization"]
    assert z["overlap_comm"] and z["contiguous_gradients"] and ds["bf16"]["enabled"]
    assert z["reduce_bucket_size"] == z["allgather_bucket_size"] == 50_000_000
    assert z["reduce_bucket_size"] * 2 == 100_000_000  # bytes of one bf16 bucket (README: 100 MB)
    # ZeRO-2 reduces every trainable element once; the tied head is the embedding.
    assert num_parameters(model_preset("albor-370m"), count_tied_head=False) == 322_045_952
    with torch.device("meta"):  # shapes only
        model = AlborLlama(model_preset("albor-370m"))
    # Gradients become ready in reverse module order; ZeRO-2 flushes its bucket when the next
    # gradient would overflow it, and a gradient larger than a bucket (the 51.5M embedding)
    # is reduced on its own: 6 buckets of 28-50M elements for the layers, 1 for the embedding.
    assert [round(n / 1e6, 1) for n in bucket_sizes(model, z["reduce_bucket_size"])] == [48.0, 48.0, 49.6, 49.0, 48.0, 28.1, 51.5]
    assert len(bucket_sizes(model, 500_000_000)) == 1  # DeepSpeed's default: one bucket, nothing overlaps


def bucket_sizes(model, bucket_elements: int) -> list[int]:
    """Elements per ZeRO-2 reduction bucket (stage_1_and_2's greedy ipg bucket), in backward order."""
    sizes, filled = [], 0
    for p in reversed(list(model.parameters())):
        if filled and filled + p.numel() > bucket_elements:
            sizes.append(filled)
            filled = 0
        filled += p.numel()
    return sizes + [filled]


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


def test_round_robin_gradients_is_refused(tmp_path):
    # The sha and a resume on another world size read ZeRO's partitions in parameter order.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index.json").write_text("{}")
    config = PretrainConfig(dataset=tmp_path / "data", model="tiny")
    ds = {"zero_optimization": {"stage": 2, "round_robin_gradients": True}}
    with pytest.raises(ConfigError, match="round_robin_gradients is true"):
        resolve_ds_config(ds, config, world_size=2, device_type="cpu", bf16_supported=False, source="x.json")
