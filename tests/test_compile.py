"""The ``compile`` lever (albor.model_compile): when a run compiles, the refusal, and compiled == eager under ZeRO-2."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import types

import numpy as np
import pytest
import torch

from albor.distributed import compat
from albor.errors import ExitCode, UnsupportedEnvironmentError
from albor.model import AlborLlama, model_preset
from albor.model_compile import compile_layers, resolve_compile
from albor.pretrain import main
from albor.run_files import RunFiles
from albor.run_setup import RunParts
from fakes import LinearDecay, RecordingCheckpoint, ScriptedVal, loop_config

MISSING_CXX = "/nonexistent/bin/g++"


@pytest.fixture
def no_cxx():
    """Inductor's C++ compiler made unavailable, as on a machine without g++ (what CXX=... sets at import)."""
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": (None, MISSING_CXX)}):
        yield


def test_auto_stays_eager_on_a_cpu_without_probing(monkeypatch):
    monkeypatch.setattr("albor.model_compile.inductor_problem", lambda device: pytest.fail("auto probed on a CPU"))
    assert resolve_compile(None, "cpu") is False
    assert resolve_compile(False, "cuda") is False


def test_forced_on_with_a_compiler_compiles_on_a_cpu():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler on this machine")
    assert compat.inductor_problem("cpu") is None
    assert resolve_compile(True, "cpu") is True


def test_forced_on_without_a_cxx_compiler_is_refused_with_6(no_cxx):
    with pytest.raises(UnsupportedEnvironmentError, match=re.escape(f"no working C++ compiler (tried {MISSING_CXX})")):
        resolve_compile(True, "cpu")
    assert resolve_compile(None, "cpu") is False  # auto: silently eager


def test_compile_flag_without_a_compiler_ends_the_dry_run_with_one_line_and_6(tmp_path, capsys, no_cxx):
    (tmp_path / "index.json").write_text("{}")
    assert main(["--dataset", str(tmp_path), "--compile", "--dry-run"]) == ExitCode.UNSUPPORTED_ENVIRONMENT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile:" in err[0] and "or run without --compile" in err[0]
    assert main(["--dataset", str(tmp_path), "--no-compile", "--dry-run"]) == 0  # off: nothing is probed
    assert main(["--dataset", str(tmp_path), "--dry-run"]) == 0  # auto on this CPU


def test_auto_on_a_gpu_without_triton_stays_eager_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr("albor.model_compile.inductor_problem", lambda device: "no Triton (test)")
    with caplog.at_level(logging.INFO, logger="albor"):
        assert resolve_compile(None, "cuda") is False
    assert "not compiling (auto): no Triton (test)" in caplog.text
    with pytest.raises(UnsupportedEnvironmentError, match="no Triton"):
        resolve_compile(True, "cuda")
    monkeypatch.setattr("albor.model_compile.inductor_problem", lambda device: None)
    assert resolve_compile(None, "cuda") is True


def test_the_gpu_probe_names_what_is_missing():
    problem = compat.inductor_problem("cuda")
    try:
        from torch.utils._triton import has_triton

        triton = has_triton()
    except Exception:
        triton = False
    if triton:
        assert problem is None or "C compiler" in problem
    else:
        assert problem is not None and "Triton" in problem


def test_compiling_keeps_every_parameter_name_and_sets_inductors_deterministic_mode():
    from torch._inductor import config as inductor_config

    torch.manual_seed(0)
    model = AlborLlama(model_preset("tiny", vocab_size=64))
    names = list(model.state_dict())
    before = inductor_config.deterministic
    try:
        assert compile_layers(model, deterministic=True) == 4  # lazily: nothing is compiled until a call
        assert inductor_config.deterministic is True
        compile_layers(AlborLlama(model_preset("tiny", vocab_size=64)), deterministic=False)
        assert inductor_config.deterministic is False
    finally:
        inductor_config.deterministic = before
    assert list(model.state_dict()) == names  # in place: no _orig_mod. in any file albor writes
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.model.embed_tokens._compiled_call_impl is None and model.lm_head._compiled_call_impl is None


@pytest.mark.parametrize("compiled", [True, False])
def test_metadata_and_status_record_compile_and_prefetch(tmp_path, compiled):
    config = loop_config(tmp_path, total_steps=5, steps_per_epoch=5, prefetch=not compiled)
    parts = RunParts(
        engine=types.SimpleNamespace(gradient_accumulation_steps=lambda: 1),
        data=types.SimpleNamespace(model_cfg=model_preset("tiny", vocab_size=64),
                                   dataset=types.SimpleNamespace(fingerprint="f" * 16),
                                   verdict=types.SimpleNamespace(settle=lambda: None)),
        step_fn=LinearDecay(), val_fn=ScriptedVal([2.0]), checkpoint=RecordingCheckpoint(),
        gpu=None, device_name=None, peak_flops=None, compiled=compiled,
    )
    files = RunFiles(config.output_dir, enabled=True)
    parts.loop(config, types.SimpleNamespace(world_size=1, rank=0), files).run()
    files.close()
    meta = json.loads(next((config.output_dir / "ckpt").rglob("*.metadata.json")).read_text())
    status = json.loads((config.output_dir / "status.json").read_text())
    assert meta["compile"] is status["compile"] is compiled
    assert meta["prefetch"] is status["prefetch"] is (not compiled)


# ---- compiled == eager, through DeepSpeed ZeRO-2 ------------------------------------------------

VOCAB, MICRO, SEQ, CHUNK = 64, 2, 16, 8  # 32 tokens a batch, 8 a chunk: the hidden_only path of the chunked loss
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class _NoGpu:
    def read(self) -> float:
        return 0.0


def _train(env, ds, split, *, compiled: bool, steps: int):
    """(per step (loss, grad norm), validation loss, weights after) of a tiny ZeRO-2 run, deterministic."""
    from albor.data.loader import TrainLoader, ValidationLoader
    from albor.distributed.engine import build_engine
    from albor.distributed.step import DeepSpeedStep
    from albor.distributed.validation import DeepSpeedValidation

    torch.manual_seed(0)
    model = AlborLlama(model_preset("tiny", vocab_size=VOCAB))
    if compiled:
        compile_layers(model, deterministic=True)
    engine = build_engine(model, ds, env, lr=1e-3, weight_decay=0.01)
    loader = TrainLoader(split, micro_batch=MICRO, seq_length=SEQ, rank=0, world_size=1, seed=1, prefetch=True)
    step = DeepSpeedStep(engine, loader, env, grad_accumulation=1, gpu=_NoGpu(), loss_chunk_tokens=CHUNK)
    val_loader = ValidationLoader(split, micro_batch=MICRO, seq_length=SEQ, rank=0, world_size=1, max_batches=2)
    val = DeepSpeedValidation(engine, val_loader, env, loss_chunk_tokens=CHUNK)
    results = [step(s, 1e-3) for s in range(steps)]
    assert all(r.rank_error is None and r.step_applied for r in results)
    weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return [(r.train_loss, r.grad_norm) for r in results], val(0), weights


@pytest.mark.compile
def test_compiled_layers_train_as_eager_does_under_zero2_deterministic_and_chunked(tmp_path, monkeypatch):
    """Same init, same batches: losses, global grad norms (ZeRO-2's hooks saw every gradient) and weights agree."""
    if compat.inductor_problem("cpu") is not None:
        pytest.skip(f"this machine cannot compile: {compat.inductor_problem('cpu')}")
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    from albor.config import PretrainConfig
    from albor.data.loader import Split
    from albor.determinism import apply_determinism
    from albor.distributed.ds_config import DS_CONFIG_DIR, load_ds_config, resolve_ds_config
    from albor.distributed.process_group import init_distributed, shutdown

    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    (tmp_path / "index.json").write_text("{}")
    config = PretrainConfig(dataset=tmp_path, model="tiny", batch_size=MICRO, seq_length=SEQ)
    tokens = np.random.default_rng(7).integers(0, VOCAB, 40 * (SEQ + 1) * MICRO).astype(np.uint16)
    split = Split("train", (tokens,), "f" * 64, np.array([0, tokens.shape[0]], dtype=np.int64))
    was_deterministic, was_inductor = torch.are_deterministic_algorithms_enabled(), inductor_config.deterministic
    env = init_distributed()
    try:
        ds = resolve_ds_config(load_ds_config(DS_CONFIG_DIR / "zero2-cpu-fp32.json"), config, world_size=1,
                               device_type="cpu", bf16_supported=False, source="zero2-cpu-fp32.json")
        apply_determinism(True, "cpu")
        eager = _train(env, ds, split, compiled=False, steps=3)
        torch._dynamo.reset()
        counters.clear()
        compiled = _train(env, ds, split, compiled=True, steps=3)
        # One graph for the four layers in training and one for validation (eval, no_grad): the layers share
        # them, so nothing was recompiled per layer or fell back to eager at the recompile limit.
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        shutdown()
        torch.use_deterministic_algorithms(was_deterministic)
        inductor_config.deterministic = was_inductor
    for (loss_e, norm_e), (loss_c, norm_c) in zip(eager[0], compiled[0]):
        assert loss_c == pytest.approx(loss_e, rel=1e-5) and norm_c == pytest.approx(norm_e, rel=1e-5)
        assert norm_e > 0
    assert compiled[1] == pytest.approx(eager[1], rel=1e-5)
    assert compiled[2].keys() == eager[2].keys()
    for name, w in eager[2].items():
        # Adam moves each weight by about lr a step whatever its gradient's size, so compare against lr.
        torch.testing.assert_close(compiled[2][name], w, rtol=0, atol=1e-4, msg=name)
