"""Pruning DeepSpeed states: the newest by epoch number survive, whatever the names' text order."""

from pathlib import Path

from albor.distributed.checkpoint import KEEP_DEEPSPEED_STATES, EpochCheckpoint


def test_prune_keeps_the_newest_epochs_by_number_past_999(tmp_path: Path):
    writer = object.__new__(EpochCheckpoint)  # _prune touches only the DeepSpeed directory
    writer.ds_dir = tmp_path
    for epoch in (998, 999, 1000, 1001):
        (tmp_path / f"epoch-{epoch:03d}").mkdir()
    (tmp_path / "latest").write_text("epoch-1001")
    writer._prune(keep=KEEP_DEEPSPEED_STATES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-1000", "epoch-1001", "latest"]
