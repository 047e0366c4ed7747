"""DistEnv's collectives, its two timeouts and the dataset vote, on 2 real gloo ranks.

One launch (tests/dist_harness.py) runs every scenario on both ranks, in order,
and brings each rank's observations back here. The timeout scenarios come last:
a collective that timed out leaves its group unusable.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from pathlib import Path
from unittest import mock

import pytest

from albor.config import PretrainConfig
from albor.errors import AlborError, ConfigError, DataError
from dist_harness import DistributedTestError, run_distributed_test, start_rank_server

WORLD = 2
SHORT_S = 1.0  # the step timeout in these scenarios
LONG_S = 30.0  # the start-up timeout in these scenarios
LATE_S = 2.5  # how late a peer joins: longer than SHORT_S, well within LONG_S
PEER_WAIT_S = 8.0  # how long an absent peer stays alive waiting for the timeout it should cause


def _outcome(action) -> tuple:
    """("ok", value) or ("raised", class name, exit code, message): picklable either way."""
    try:
        return ("ok", action())
    except AlborError as e:
        return ("raised", type(e).__name__, int(e.exit_code), str(e))
    except Exception as e:
        return ("raised", type(e).__name__, None, str(e))


def _open(config, env) -> tuple:
    from albor.run_setup import open_data

    def opened():
        d = open_data(config, env)
        return d.dataset.fingerprint, d.model_cfg.vocab_size, d.train_loader.rank, d.val_loader is not None

    return _outcome(opened)


def _dataset_votes(rank: int, config: PretrainConfig, env) -> dict[str, tuple]:
    """Each scenario: one open_data call per rank, rank 1 (or both) failing its own way."""
    import albor.data.loader as loader
    import albor.run_setup as run_setup

    out = {"healthy": _open(config, env)}
    # Rank 1 alone reads a shard whose header and size differ from what index.json promises (open reads
    # headers only; a changed byte is the background verification's: tests/test_dist_data_verify.py).
    corrupt = mock.patch.object(loader, "read_header", side_effect=DataError(
        "shard train-00000.bin is truncated or corrupt: its header promises 10 tokens (52 bytes) but the file has 7 bytes"
    ))
    with corrupt if rank == 1 else contextlib.nullcontext():
        out["corrupt_shard_on_1"] = _open(config, env)
    missing = mock.patch.object(
        run_setup, "resolve_dataset", side_effect=ConfigError("--dataset /nowhere does not exist; pass an index.json")
    )
    with missing if rank == 1 else contextlib.nullcontext():
        out["usage_error_on_1"] = _open(config, env)
    unreadable = mock.patch.object(run_setup.TokenDataset, "open", side_effect=OSError(5, "Input/output error"))
    with unreadable if rank == 1 else contextlib.nullcontext():
        out["os_error_on_1"] = _open(config, env)
    # The worst code wins: a usage error on rank 0 and a data error on rank 1 are a data error everywhere.
    with (missing if rank == 0 else corrupt):
        out["usage_on_0_data_on_1"] = _open(config, env)
    return out


def _timeouts(rank: int, env, groups, store_path: Path) -> dict[str, tuple]:
    """Rank 0 waits in collectives; rank 1 joins late, or never: it waits on a file store instead."""
    import torch
    import torch.distributed as dist

    import albor.distributed.process_group as pg

    store = dist.FileStore(str(store_path), WORLD)  # outside the process groups and their timeouts
    out: dict[str, tuple] = {}

    def absent_peer(name: str, collective) -> None:
        wait = datetime.timedelta(seconds=PEER_WAIT_S)
        if rank == 0:
            out[name] = _outcome(collective)
            store.set(f"{name}-done", "1")
            store.wait([f"{name}-seen"], wait)  # neither rank moves on before the other saw the end
        else:  # stays alive (a dead peer would be "connection closed", not a timeout)
            out[name] = _outcome(lambda: store.wait([f"{name}-done"], wait))
            store.set(f"{name}-seen", "1")

    def one(group) -> float:
        t = torch.ones(1)
        dist.all_reduce(t, group=group)
        return t.item()

    pg.STEP_TIMEOUT_S, pg.STARTUP_TIMEOUT_S = SHORT_S, LONG_S  # read when the timeout switches
    env.set_timeout(SHORT_S)
    absent_peer("set_timeout", lambda: one(groups[0]))  # a group of its own, as ZeRO's are
    with env.startup_timeout():
        if rank == 1:
            time.sleep(LATE_S)
        out["late_peer_in_startup"] = _outcome(lambda: one(groups[1]))
    # Back to the step timeout, on the default group, through the step's own all-reduce.
    absent_peer("after_startup", lambda: env.all_reduce_sum_(torch.ones(1)).item())
    return out


def _scenarios(rank: int, world_size: int, dataset: Path, tmp: Path) -> dict[str, object]:
    import torch
    import torch.distributed as dist

    from albor.distributed.process_group import DistEnv

    env = DistEnv(rank, world_size, rank, torch.device("cpu"))
    groups = [dist.new_group(list(range(world_size))) for _ in range(2)]  # before any timeout is short
    config = PretrainConfig(
        dataset=dataset, model="tiny", output_dir=tmp / "run", batch_size=2, seq_length=64, val_batches=2,
    )
    return {
        "per_rank": env.per_rank(10.0 * rank + 1.5),
        "where_rank_1": env.ranks_where(rank == 1),
        "where_none": env.ranks_where(False),
        "where_all": env.ranks_where(True),
        "votes": _dataset_votes(rank, config, env),
        "timeouts": _timeouts(rank, env, groups, tmp / "store"),
    }


@pytest.fixture(scope="session")
def rank_server() -> None:
    start_rank_server()  # its imports run while the dataset below is tokenized


@pytest.fixture(scope="module")
def ranks(rank_server, builtin_dataset, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist-env")
    return run_distributed_test(_scenarios, WORLD, builtin_dataset, tmp, timeout=90)


def test_per_rank_gathers_every_rank_in_order(ranks):
    assert [r["per_rank"] for r in ranks] == [[1.5, 11.5]] * WORLD


def test_ranks_where_lists_the_ranks_where_the_flag_holds(ranks):
    for r in ranks:
        assert (r["where_rank_1"], r["where_none"], r["where_all"]) == ([1], [], [0, 1])


def test_dataset_opens_on_every_rank(ranks):
    outcomes = [r["votes"]["healthy"] for r in ranks]
    assert [o[0] for o in outcomes] == ["ok", "ok"], outcomes
    fingerprints = {o[1][0] for o in outcomes}
    assert len(fingerprints) == 1
    assert [o[1][2] for o in outcomes] == [0, 1]  # each rank's loader knows its rank


@pytest.mark.parametrize(
    "scenario, error, code",
    [
        ("corrupt_shard_on_1", DataError, 3),  # README: 3, dataset missing or malformed
        ("usage_error_on_1", ConfigError, 2),  # README: 2, bad flag or config
        ("os_error_on_1", DataError, 3),
        ("usage_on_0_data_on_1", DataError, 3),
    ],
)
def test_one_rank_failing_to_open_the_dataset_fails_every_rank_alike(ranks, scenario, error, code):
    outcomes = [r["votes"][scenario] for r in ranks]
    assert [o[:3] for o in outcomes] == [("raised", error.__name__, code)] * WORLD, outcomes


def test_the_rank_that_failed_names_its_problem_and_its_peer_names_the_rank(ranks):
    own, peer = ranks[1]["votes"]["corrupt_shard_on_1"][3], ranks[0]["votes"]["corrupt_shard_on_1"][3]
    assert "truncated or corrupt" in own
    assert peer == "opening the dataset failed on rank(s) 1; that rank's error above says why and how to fix it"
    assert ranks[1]["votes"]["os_error_on_1"][3].startswith("opening the dataset failed: OSError")


def _timed_out(outcome: tuple) -> bool:
    # gloo says "Timed out waiting ...", NCCL "... timed out"; the crash report looks for these words.
    return outcome[0] == "raised" and outcome[1] in ("RuntimeError", "DistBackendError") and "timed out" in outcome[3].lower()


def test_after_set_timeout_a_collective_the_peer_never_joins_times_out(ranks):
    waiting, absent = ranks[0]["timeouts"]["set_timeout"], ranks[1]["timeouts"]["set_timeout"]
    assert _timed_out(waiting), waiting
    assert absent[0] == "ok", absent  # rank 0 finished (by timing out) while rank 1 was still there


def test_startup_timeout_outlasts_a_late_peer(ranks):
    assert [r["timeouts"]["late_peer_in_startup"] for r in ranks] == [("ok", 2.0)] * WORLD


def test_the_step_timeout_is_back_after_startup(ranks):
    waiting, absent = ranks[0]["timeouts"]["after_startup"], ranks[1]["timeouts"]["after_startup"]
    assert _timed_out(waiting), waiting
    assert absent[0] == "ok", absent


# ── the harness itself: a rank that raises, dies or hangs fails the test, never hangs it ──

def _raise_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank 1 broke")
    return rank


def _die_on_rank_1(rank: int, world_size: int) -> int:
    import os

    if rank == 1:
        os._exit(7)
    return rank


def _rank_0_waits_alone(rank: int, world_size: int) -> None:
    import torch
    import torch.distributed as dist

    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        time.sleep(120)


def test_harness_reports_a_raising_rank_with_its_traceback():
    with pytest.raises(DistributedTestError) as e:
        run_distributed_test(_raise_on_rank_1, WORLD, timeout=60)
    assert "1 of 2 rank(s) failed" in str(e.value)
    assert "── rank 1 (error) ──" in str(e.value) and "ValueError: rank 1 broke" in str(e.value)


def test_harness_reports_a_rank_that_died():
    with pytest.raises(DistributedTestError, match=r"rank 1 \(died\) ──\nexited with code 7"):
        run_distributed_test(_die_on_rank_1, WORLD, timeout=60)


def test_harness_kills_hung_ranks_and_shows_their_stacks():
    started = time.monotonic()
    with pytest.raises(DistributedTestError) as e:
        run_distributed_test(_rank_0_waits_alone, WORLD, timeout=3)
    assert time.monotonic() - started < 30  # killed, not waited for
    text = str(e.value)
    assert "2 of 2 rank(s) failed" in text
    rank_0, rank_1 = text.split("── rank 1 (hung) ──")
    assert "── rank 0 (hung) ──\nstill running after 3 s; its threads:" in rank_0
    assert "in _rank_main" in rank_0 and "in _rank_main" in rank_1  # each rank's own stack
