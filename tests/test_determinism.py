"""Issue 9, lever 1: deterministic kernels by default, switchable in the config and on the command line."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
import yaml

from albor.config import PretrainConfig, resolve_config
from albor.determinism import CUBLAS_WORKSPACE, apply_determinism
from albor.loss import chunked_token_loss, token_loss
from albor.model import AlborLlama, model_preset
from albor.pretrain import _normalized_argv, build_parser, main
from albor.run_files import RunFiles
from albor.run_setup import RunParts
from fakes import LinearDecay, RecordingCheckpoint, ScriptedVal, loop_config


@pytest.fixture(autouse=True)
def torch_global_state(monkeypatch):
    """Every test leaves torch's global switches as it found them (other tests share the process)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (
        torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.cudnn_sdp_enabled(),
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    torch.backends.cuda.enable_cudnn_sdp(saved[4])


def test_on_forces_deterministic_algorithms_and_the_cublas_workspace():
    done = apply_determinism(True, "cpu")
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert done == {"deterministic": True, "cublas_workspace_config": ":4096:8"}


def test_on_keeps_a_users_own_cublas_workspace(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the documented low-memory setting
    assert apply_determinism(True, "cpu")["cublas_workspace_config"] == ":16:8"


def test_on_cuda_switches_off_cudnn_attention():
    # The switch is a plain flag: settable without a GPU.
    torch.backends.cuda.enable_cudnn_sdp(True)
    done = apply_determinism(True, "cuda")
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert done["sdpa_backends"] == ["flash", "mem_efficient", "math"]


def test_off_forces_nothing():
    torch.use_deterministic_algorithms(True)  # a previous run in this process had it on
    assert apply_determinism(False, "cuda") == {"deterministic": False}
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.backends.cuda.cudnn_sdp_enabled()


def test_a_tiny_model_trains_under_deterministic_mode():
    """No op albor uses (embedding, SDPA with GQA, RoPE, RMSNorm, CE, chunked CE) raises under strict mode on CPU."""
    apply_determinism(True, "cpu")
    torch.manual_seed(0)
    model = AlborLlama(model_preset("tiny", vocab_size=64))
    ids = torch.randint(0, 64, (2, 9))
    token_loss(model(ids[:, :-1]), ids[:, 1:]).backward()
    chunked_token_loss(model(ids[:, :-1], hidden_only=True), model.lm_head.weight, ids[:, 1:], 5).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_same_seed_same_loss_and_grads_twice():
    """Gate 006 in miniature: two identical forward+backward passes agree bit for bit."""
    apply_determinism(True, "cpu")

    def once():
        torch.manual_seed(3)
        model = AlborLlama(model_preset("tiny", vocab_size=64))
        ids = torch.randint(0, 64, (2, 17))
        loss = chunked_token_loss(model(ids[:, :-1], hidden_only=True), model.lm_head.weight, ids[:, 1:], 7)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (l1, g1), (l2, g2) = once(), once()
    assert l1 == l2 and torch.equal(g1, g2)


def test_config_default_on_and_validated(tmp_path):
    (tmp_path / "index.json").write_text("{}")
    assert PretrainConfig(dataset=tmp_path).deterministic is True
    assert resolve_config(file_values={"dataset": tmp_path, "deterministic": False}).deterministic is False
    with pytest.raises(Exception, match="deterministic: 'no' is not a valid bool"):
        resolve_config(file_values={"dataset": tmp_path, "deterministic": "no"})


@pytest.mark.parametrize(("argv", "expected"), [([], True), (["--deterministic"], True), (["--no-deterministic"], False)])
def test_flag_round_trip(capsys, tmp_path, argv, expected):
    (tmp_path / "index.json").write_text("{}")
    assert main(["--dataset", str(tmp_path), *argv, "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["deterministic"] is expected


def test_a_flag_wins_over_the_config_file(capsys, tmp_path):
    (tmp_path / "index.json").write_text("{}")
    (tmp_path / "c.yaml").write_text(f"dataset: {tmp_path}\ndeterministic: false\n")
    assert main(["--config", str(tmp_path / "c.yaml"), "--deterministic", "--dry-run"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["deterministic"] is True


def test_resume_command_keeps_no_deterministic(tmp_path):
    """The resume command status.json offers must rerun the run as it was: --no-deterministic survives."""
    args = build_parser().parse_args(["--dataset", str(tmp_path), "--no-deterministic"])
    argv = _normalized_argv(args)
    assert "--no-deterministic" in argv
    assert build_parser().parse_args(argv).deterministic is False


@pytest.mark.parametrize("on", [True, False])
def test_metadata_and_status_record_it(tmp_path, on):
    config = loop_config(tmp_path, deterministic=on, total_steps=5, steps_per_epoch=5)
    parts = RunParts(
        engine=types.SimpleNamespace(gradient_accumulation_steps=lambda: 1),
        data=types.SimpleNamespace(model_cfg=model_preset("tiny", vocab_size=64),
                                   dataset=types.SimpleNamespace(fingerprint="f" * 16),
                                   verdict=types.SimpleNamespace(settle=lambda: None)),  # data verified
        step_fn=LinearDecay(), val_fn=ScriptedVal([2.0]), checkpoint=RecordingCheckpoint(),
        gpu=None, device_name=None, peak_flops=None,
    )
    files = RunFiles(config.output_dir, enabled=True)
    loop = parts.loop(config, types.SimpleNamespace(world_size=1, rank=0), files, status_extra={"resume_command": "x"})
    loop.run()
    files.close()
    meta = json.loads(next((config.output_dir / "ckpt").rglob("*.metadata.json")).read_text())
    status = json.loads((config.output_dir / "status.json").read_text())
    assert meta["deterministic"] is on and status["deterministic"] is on and status["resume_command"] == "x"
