"""GPU-only checks (marked ``gpu``; skipped without CUDA). Run them with launcher/gpu_check.sh."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_sdpa_bf16_matches_fp32():
    from albor.model import AlborLlama, model_preset

    torch.manual_seed(0)
    model = AlborLlama(model_preset("tiny", vocab_size=1000)).cuda()
    ids = torch.randint(0, 1000, (2, 128), device="cuda")
    ref = model(ids).float()
    with torch.no_grad():
        low = model.to(torch.bfloat16)(ids).float()
    assert (low - ref).abs().max().item() < 0.1


@needs_cuda
def test_nvml_handle_by_uuid_reads_a_real_utilisation():
    from albor.telemetry import GpuUtilization

    props = torch.cuda.get_device_properties(0)
    gpu = GpuUtilization(str(props.uuid))
    assert gpu.available, gpu.reason
    assert 0.0 <= gpu.read() <= 100.0


@needs_cuda
def test_dev_mode_run_on_one_gpu_records_util_and_mfu(tmp_path, builtin_dataset):
    run = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "albor.pretrain", "--dataset", str(builtin_dataset), "--model", "tiny",
         "--output-dir", str(run), "--total-steps", "20", "--steps-per-epoch", "10", "--batch-size", "8",
         "--seq-length", "256", "--mode", "from-scratch", "--warmup-steps", "5", "--lr-max", "1e-3"],
        capture_output=True, text=True, timeout=600,
    )
    assert p.returncode in (0, 4), p.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    assert all(0.0 <= r["gpu_util_pct"] <= 100.0 for r in rows)
    assert any(r["gpu_util_pct"] > 0 for r in rows)
    assert rows[-1]["mfu"] is not None and 0 < rows[-1]["mfu"] < 1
    meta = json.loads((run / "ckpt" / "epoch-001.metadata.json").read_text())
    assert meta["optimizer_state_sha_source"] == "optimizer" and len(meta["optimizer_state_sha"]) == 64
