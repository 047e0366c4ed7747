"""A real 2-rank deepspeed run on a dataset with one changed byte: every rank ends with 3, no checkpoint.

What tests/test_dist_data_verify.py checks piece by piece on gloo ranks, here through the whole
command (run_setup's wiring of the verification into the step and the loop, train's exit path,
status.json and the exit records). One launch, ~30 s on 2 cores.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest

from albor.data.shards import HEADER_SIZE
from tests.drill_env import DRILL_ENV

pytestmark = pytest.mark.multiproc


def test_a_changed_byte_ends_every_rank_with_3_before_any_checkpoint(albor_launch, builtin_dataset, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(builtin_dataset, bad)
    shard = bad / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    expected = hashlib.sha256(raw).hexdigest()
    raw[HEADER_SIZE + 6] ^= 0x01  # the low byte of one token: the file keeps its size and header
    shard.write_bytes(bytes(raw))
    actual = hashlib.sha256(raw).hexdigest()
    config = tmp_path / "run.yaml"
    config.write_text("val_batches: 1\ntarget_val_loss: 100.0\n")
    args = ["--dataset", str(bad), "--config", str(config), "--model", "tiny", "--mode", "from-scratch",
            "--total-steps", "8", "--steps-per-epoch", "4", "--batch-size", "2", "--seq-length", "64",
            "--warmup-steps", "2"]
    run = albor_launch("deepspeed", args, tmp_path / "run", env=DRILL_ENV)
    assert run.returncode == 3, run.tail()
    assert run.exit_codes() == {0: 3, 1: 3}, run.tail()
    status = run.status()
    assert (status["status"], status["exit_code"], status["reason"]) == ("aborted", 3, "data")
    assert status["abort"]["ranks"] == [0]  # local rank 0 of the one node verified; rank 1 did not
    # Rank 0 found it and wrote status.json: its own line, with both digests (computed above with hashlib).
    message = status["abort"]["message"]
    assert "train-00000.bin" in message and expected in message and actual in message, message
    # Rank 1 learned it from the step's all-reduce: the shard, and the rank that found it.
    assert "shard train-00000.bin failed verification on rank(s) 0" in run.output, run.tail()
    # Stopped at a step (verification of 1 MB is done long before step 0) or at the latest before the first
    # checkpoint: never an epoch file, never a step past the first epoch.
    assert not (run.run_dir / "ckpt").exists() or not any((run.run_dir / "ckpt").iterdir())
    assert status["abort"]["step"] <= 3 and len(run.metrics()) <= 3
