"""README's demo command, run whole: ``bash launcher/demo.sh`` trains for real and ends with exit 0.

The script runs as a user runs it: its own set-up check, its own data
preparation, its own DeepSpeed launch of launcher/demo.yaml on 2 CPU ranks.
Only where it writes goes to a temporary directory, through the variables the
script reads for that (ALBOR_DEMO_DATA, ALBOR_DEMO_RUN), and it uses the
virtual environment running the tests (ALBOR_VENV). It costs a few minutes on
2 cores: the price of proving README's first command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.multiproc

REPO = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 840.0  # measured ~3 min on an idle 2-core box; a loaded one is several times slower


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_demo_ends_with_exit_0(tmp_path, child_environment):
    data, run = tmp_path / "data", tmp_path / "run"
    env = {**child_environment, "ALBOR_VENV": sys.prefix, "ALBOR_DEMO_DATA": str(data), "ALBOR_DEMO_RUN": str(run)}
    start = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(REPO / "launcher" / "demo.sh")], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: a timeout kills the ranks too
    )
    try:
        out, _ = proc.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the demo did not end within {DEMO_TIMEOUT_S:.0f} s\n{out[-4000:]}")
    elapsed = time.monotonic() - start
    tail = f"(exit {proc.returncode}, {elapsed:.0f} s)\n{out[-4000:]}"

    assert proc.returncode == 0, tail
    assert "exit code 0" in out, tail
    assert (data / "index.json").is_file()  # it prepared the builtin corpus itself
    demo = yaml.safe_load((REPO / "launcher" / "demo.yaml").read_text())
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    # It trained README's demo, not something smaller: every field of demo.yaml, resolved as written
    # (`mode` is not a field itself: it sets the regime).
    assert resolved["regime"] == demo.pop("mode")
    assert {k: resolved[k] for k in demo} == demo
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "ok" and status["exit_code"] == 0, status
    assert status["target_met"] is True and status["final_val_loss"] <= demo["target_val_loss"], status
    assert status["epochs_completed"] >= demo["min_epochs_before_early_stop"], status
    records = {}
    for path in sorted((run / "ranks").glob("rank-*.exit.json")):
        record = json.loads(path.read_text())
        records[record["rank"]] = record["exit_code"]
    assert records == {0: 0, 1: 0}  # 2 CPU ranks, each ended with 0
    # README's promise: a report to look at, and a directory transformers loads (tests/test_export_hf.py
    # checks an export's numbers; here, that the demo made one).
    assert (run / "report.png").read_bytes().startswith(b"\x89PNG"), tail
    hf = Path(f"{run}-hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf.iterdir()}, tail
    from transformers import AutoModelForCausalLM

    from albor.data.loader import index_vocab_size

    assert AutoModelForCausalLM.from_pretrained(hf).config.vocab_size == index_vocab_size(data / "index.json")
