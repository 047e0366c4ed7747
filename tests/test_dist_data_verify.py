"""Bad data on one node ends every rank with 3, together: 2 real gloo ranks (tests/dist_harness.py).

Each rank plays a node of its own (local rank 0, so each verifies its own copy
of the dataset, as open_data starts it) and runs the real open_data, the real
DeepSpeedStep and its fused all-reduce, and the real PretrainLoop; only the
engine (a one-layer stand-in), validation and the checkpoint writer are fakes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from albor.config import PretrainConfig
from albor.data.shards import HEADER_SIZE
from dist_harness import run_distributed_test, start_rank_server
from test_data_loader import make_dataset

WORLD, VOCAB, BATCH, SEQ, PER_EPOCH = 2, 256, 2, 15, 4


def _engine():
    import torch
    from torch import nn

    class OneLayer(nn.Module):
        """What DeepSpeedStep calls on an engine, over a real embedding (it refuses ids >= VOCAB)."""

        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Embedding(VOCAB, VOCAB)
            self.optimizer = type("Opt", (), {"param_groups": [{"lr": 0.0}]})()

        def forward(self, inputs, hidden_only=False):
            return self.head(inputs)

        def backward(self, loss) -> None:
            loss.backward()

        def step(self) -> None:
            pass

        def was_step_applied(self) -> bool:
            return True

        def get_global_grad_norm(self):
            return torch.tensor(1.0)

    return OneLayer()


def _run(rank: int, dataset: Path, run_dir: Path, *, slow_rank: int | None = None) -> dict:
    """open_data then the loop on this rank; what it ended with (and status.json, on rank 0)."""
    import contextlib
    import threading
    from unittest import mock

    import torch

    import albor.data.verify as verify
    from albor.distributed.process_group import DistEnv
    from albor.distributed.step import DeepSpeedStep
    from albor.errors import AlborError
    from albor.loop import PretrainLoop
    from albor.run_files import RunFiles
    from albor.run_setup import open_data
    from fakes import RecordingCheckpoint, ScriptedVal

    env = DistEnv(rank, WORLD, 0, torch.device("cpu"))  # local rank 0: a node of its own
    config = PretrainConfig(dataset=dataset, model="tiny", output_dir=run_dir, batch_size=BATCH, seq_length=SEQ,
                            total_steps=3 * PER_EPOCH, steps_per_epoch=PER_EPOCH, warmup_steps=1, val_batches=1,
                            target_val_loss=100.0)
    release = threading.Event()
    real = verify.check_shard

    def held(*args, **kwargs):  # this rank's verification finishes only after its steps are done
        release.wait(60)
        return real(*args, **kwargs)

    slow = mock.patch.object(verify, "check_shard", held) if rank == slow_rank else contextlib.nullcontext()
    try:
        with slow:
            data = open_data(config, env)
            step = DeepSpeedStep(_engine(), data.train_loader, env, grad_accumulation=1,
                                 gpu=type("Gpu", (), {"read": lambda self: 0.0})(), data_verdict=data.verdict)
            step.optimizer_state_sha = lambda: "0" * 64  # the stand-in engine has no ZeRO state to hash
            ckpt = RecordingCheckpoint()
            loop = PretrainLoop(config, step, ScriptedVal([3.0] * 3), ckpt, vocab_size=VOCAB,
                                files=RunFiles(run_dir, enabled=rank == 0), data_verified=data.verdict.settle)
            if rank != slow_rank and data.verdict.verification is not None:
                data.verdict.verification.wait()  # the fast rank's verdict is in before step 0
            timer = threading.Timer(1.0, release.set)  # a slow verification still ends before the epoch's end
            timer.start()
            result = loop.run()
            timer.cancel()
    except AlborError as e:
        return {"raised": type(e).__name__, "code": int(e.exit_code), "message": str(e)}
    status = json.loads((run_dir / "status.json").read_text()) if rank == 0 else None
    return {"code": int(result.exit_code), "step": result.abort.step if result.abort else None,
            "message": result.abort.message if result.abort else None, "checkpoints": len(ckpt.calls),
            "steps": loop.next_step, "status": status}


def _scenarios(rank: int, world_size: int, good: Path, bad: Path, tmp: Path) -> dict:
    # Rank 1's node holds a copy with one token changed in train-00001.bin; rank 0's copy is good.
    mine = bad if rank == 1 else good
    return {
        "corrupt_on_1": _run(rank, mine, tmp / "run-corrupt"),
        "corrupt_on_1_found_late": _run(rank, mine, tmp / "run-late", slow_rank=1),
        "good_everywhere": _run(rank, good, tmp / "run-good"),
        "missing_on_1": _run(rank, good if rank == 0 else tmp / "not-on-this-node", tmp / "run-missing"),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    start_rank_server()
    tmp = tmp_path_factory.mktemp("dist-verify")
    tokens = np.random.default_rng(0).integers(0, VOCAB, 2000)
    good = make_dataset(tmp / "good", tokens, tokens[:400], vocab=VOCAB, shard_tokens=500).parent
    bad = make_dataset(tmp / "bad", tokens, tokens[:400], vocab=VOCAB, shard_tokens=500).parent
    shard = bad / "train-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[HEADER_SIZE + 6] ^= 0x01  # an id still below VOCAB: only the sha256 can tell
    shard.write_bytes(bytes(raw))
    return run_distributed_test(_scenarios, WORLD, good, bad, tmp, timeout=120, env={"WORLD_SIZE": str(WORLD)})


def test_a_shard_bad_on_one_node_ends_every_rank_with_3_at_the_same_step(ranks):
    outcomes = [r["corrupt_on_1"] for r in ranks]
    assert [o["code"] for o in outcomes] == [3, 3], outcomes
    assert outcomes[0]["step"] == outcomes[1]["step"] == 0  # rank 1's verdict was in before step 0
    assert [o["checkpoints"] for o in outcomes] == [0, 0]
    status = outcomes[0]["status"]
    assert (status["status"], status["exit_code"], status["reason"]) == ("aborted", 3, "data")
    assert status["abort"]["ranks"] == [1] and status["abort"]["step"] == 0
    # Rank 0 wrote status.json: it names the shard (from rank 1's slot) and the rank that found it...
    assert "shard train-00001.bin failed verification on rank(s) 1" in status["abort"]["message"]
    # ...and rank 1, which found it, holds its own line: the expected and actual sha256.
    assert "sha256 is" in outcomes[1]["message"] and "found by rank 1's verification" in outcomes[1]["message"]


def test_a_verdict_that_comes_late_stops_the_run_before_the_first_checkpoint(ranks):
    outcomes = [r["corrupt_on_1_found_late"] for r in ranks]
    assert [o["code"] for o in outcomes] == [3, 3], outcomes
    assert [o["checkpoints"] for o in outcomes] == [0, 0]  # epoch 0's checkpoint was never written
    # Either at a step, or at the latest at the end of epoch 0: the same point on both ranks.
    assert outcomes[0]["step"] == outcomes[1]["step"] <= PER_EPOCH - 1
    assert outcomes[0]["message"].startswith("DATA at ")


def test_good_copies_train_and_checkpoint_every_epoch(ranks):
    outcomes = [r["good_everywhere"] for r in ranks]
    assert [o["code"] for o in outcomes] == [0, 0], outcomes
    assert [o["checkpoints"] for o in outcomes] == [3, 3]


def test_a_dataset_missing_on_one_node_ends_every_rank_with_3_naming_the_rank(ranks):
    outcomes = [r["missing_on_1"] for r in ranks]
    assert [(o.get("raised"), o["code"]) for o in outcomes] == [("DataError", 3)] * 2, outcomes
    # The same words on both ranks after the path (one path in a real job; two here, one per simulated node).
    assert outcomes[0]["message"].split(" is ", 1)[1] == outcomes[1]["message"].split(" is ", 1)[1]
    assert outcomes[0]["message"].split(" is ", 1)[1].startswith("a prepared dataset on rank(s) 0; missing on rank(s) 1:")
    assert "missing on rank(s) 1" in outcomes[0]["message"] and "shared storage" in outcomes[0]["message"]
