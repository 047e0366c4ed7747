"""How one step's fused all-reduce becomes a verdict, without processes.

``combine_rows`` turns every rank's slots into the one ``StepResult``
the loop gates on; ``DeepSpeedStep.__call__`` builds this rank's slots from what
the engine reported. Rows here are written by hand, with the slot constants, so
the expected values are computed independently of the code under test.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from albor.contract import AbortReason, ContractAbort, check_numerical_stability
from albor.distributed.process_group import DistEnv
from albor.distributed.step import (
    FLAGS,
    GPU_UTIL,
    GRAD_NORM,
    LOCAL_ERROR,
    LOSS_NONFINITE,
    LOSS_SUM,
    NORM_INVALID,
    SLOTS,
    STEP_SKIPPED,
    STOP_REQUESTED,
    TOKENS,
    DeepSpeedStep,
    combine_rows,
)
from albor.faults import FaultPlan

#: The documented priority, written out here rather than read from FLAG_PRIORITY.
PRIORITY = (LOCAL_ERROR, LOSS_NONFINITE, NORM_INVALID, STEP_SKIPPED)
NAMES = {LOCAL_ERROR: "LOCAL_ERROR", LOSS_NONFINITE: "LOSS_NONFINITE", NORM_INVALID: "NORM_INVALID",
         STEP_SKIPPED: "STEP_SKIPPED"}


def row(*, loss_sum: float = 0.0, tokens: float = 0.0, flags: int = 0, util: float = 0.0,
        norm: float = 1.0) -> list[float]:
    r = [0.0] * SLOTS
    r[LOSS_SUM], r[TOKENS], r[FLAGS], r[GPU_UTIL], r[GRAD_NORM] = loss_sum, tokens, float(flags), util, norm
    return r


def combine(rows: list[list[float]], data_epoch: int = 0):
    return combine_rows(rows, data_epoch=data_epoch)


def test_flags_are_distinct_bits():
    # A rank's flags are added, not OR-ed: two flags sharing a bit would read as a third.
    assert sorted((*PRIORITY, STOP_REQUESTED)) == [1, 2, 4, 8, 16]


def test_clean_step_combines_loss_tokens_norm_and_utilisation():
    rows = [
        row(loss_sum=2.0 * 100, tokens=100, util=10.0, norm=0.75),
        row(loss_sum=4.0 * 300, tokens=300, util=60.0, norm=0.75),
        row(loss_sum=3.0 * 100, tokens=100, util=20.0, norm=0.75),
    ]
    r = combine(rows, data_epoch=2)
    # Mean over every token of the global batch, not a mean of the ranks' means (3.0).
    assert r.train_loss == pytest.approx((200 + 1200 + 300) / 500)  # 3.4
    assert r.tokens == 500 and isinstance(r.tokens, int)
    assert r.grad_norm == 0.75
    assert r.gpu_util_pct == pytest.approx(30.0)  # the mean, not rank 0's
    assert r.step_applied is True
    assert r.rank_error is None
    assert r.flagged_ranks == ()
    assert r.extra == {"gpu_util_per_rank": [10.0, 60.0, 20.0], "data_epoch": 2}


@pytest.mark.parametrize(
    "higher, lower",
    [(PRIORITY[i], PRIORITY[j]) for i in range(len(PRIORITY)) for j in range(i + 1, len(PRIORITY))],
    ids=lambda f: NAMES[f],
)
@pytest.mark.parametrize("higher_rank", [0, 1])
def test_higher_priority_flag_names_its_rank(higher, lower, higher_rank):
    flags = [0, 0]
    flags[higher_rank], flags[1 - higher_rank] = higher, lower
    r = combine([row(tokens=1, flags=flags[0]), row(tokens=1, flags=flags[1])])
    assert r.flagged_ranks == (higher_rank,)


def test_faults_on_several_ranks_at_once():
    rows = [
        row(tokens=8, flags=STEP_SKIPPED),
        row(tokens=8, flags=NORM_INVALID | STEP_SKIPPED),
        row(tokens=0, flags=LOCAL_ERROR | STEP_SKIPPED),
        row(tokens=8, flags=LOSS_NONFINITE),
        row(tokens=0, flags=LOCAL_ERROR),
    ]
    r = combine(rows)
    assert r.flagged_ranks == (2, 4)
    assert r.rank_error == "exception on rank(s) 2, 4; see that rank's log for the traceback"
    assert r.step_applied is False


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([LOSS_NONFINITE, NORM_INVALID, LOSS_NONFINITE | NORM_INVALID, STEP_SKIPPED], (0, 2)),
        ([STEP_SKIPPED, NORM_INVALID, 0, NORM_INVALID | STEP_SKIPPED], (1, 3)),
        ([STEP_SKIPPED, 0, STEP_SKIPPED, 0], (0, 2)),
    ],
)
def test_flagged_ranks_are_every_rank_holding_the_top_flag(flags, expected):
    r = combine([row(tokens=4, flags=f) for f in flags])
    assert r.flagged_ranks == expected
    assert r.rank_error is None  # only LOCAL_ERROR is an exception


def test_skipped_step_on_one_rank_is_not_applied():
    r = combine([row(loss_sum=8.0, tokens=4, flags=0), row(loss_sum=8.0, tokens=4, flags=STEP_SKIPPED)])
    assert r.step_applied is False
    assert r.flagged_ranks == (1,)
    assert r.rank_error is None
    assert r.train_loss == pytest.approx(2.0)  # the numbers still combine


def test_missing_norm_reaches_gate_007():
    nan = math.nan
    r = combine([row(loss_sum=4.0, tokens=2, flags=NORM_INVALID, norm=nan),
                 row(loss_sum=4.0, tokens=2, flags=NORM_INVALID, norm=nan)])
    assert math.isnan(r.grad_norm)
    assert r.flagged_ranks == (0, 1)
    with pytest.raises(ContractAbort) as e:
        check_numerical_stability(0, r.train_loss, r.grad_norm)
    assert e.value.reason is AbortReason.NUMERICAL_INSTABILITY and e.value.field == "grad_norm"


def test_a_stop_request_is_not_a_fault():
    r = combine([row(loss_sum=6.0, tokens=3), row(loss_sum=6.0, tokens=3, flags=STOP_REQUESTED)])
    assert r.stop_requested_ranks == (1,)
    assert (r.flagged_ranks, r.rank_error, r.step_applied) == ((), None, True)
    assert r.train_loss == pytest.approx(2.0)


def test_a_stop_request_beside_a_fault():
    r = combine([row(tokens=3, flags=STOP_REQUESTED | STEP_SKIPPED), row(tokens=3, flags=STOP_REQUESTED),
                 row(tokens=3, flags=LOSS_NONFINITE)])
    assert r.flagged_ranks == (2,)  # the fault decides who saw it first; the stop does not
    assert r.stop_requested_ranks == (0, 1)
    assert r.step_applied is False


def test_no_tokens_anywhere_is_not_a_division_by_zero():
    r = combine([row(flags=LOCAL_ERROR), row(flags=LOCAL_ERROR)])
    assert r.train_loss == 0.0 and r.tokens == 0
    assert r.flagged_ranks == (0, 1)


# ── this rank's row, as __call__ builds it from the engine (one rank: the all-reduce is a no-op) ──

VOCAB, MICRO, SEQ = 16, 2, 3


class FakeEngine:
    """The few engine calls the step makes; logits are all zero, so every token's loss is ln(VOCAB)."""

    def __init__(self, *, norm, applied: bool = True):
        self.head = nn.Embedding(VOCAB, VOCAB)
        nn.init.zeros_(self.head.weight)
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 0.0}])
        self.norm, self.applied = norm, applied
        self.backwards = 0

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.backwards += 1

    def step(self) -> None:
        pass

    def was_step_applied(self) -> bool:
        return self.applied

    def get_global_grad_norm(self):
        return self.norm


class FakeLoader:
    micro_batch, seq_length, data_epoch = MICRO, SEQ, 0

    def __init__(self, fail: bool = False):
        self.fail = fail

    def next_batch(self):
        if self.fail:
            raise RuntimeError("shard read failed")
        x = torch.arange(MICRO * SEQ).reshape(MICRO, SEQ) % VOCAB
        return x, (x + 1) % VOCAB


def one_rank_step(engine: FakeEngine, loader: FakeLoader | None = None, faults: FaultPlan | None = None,
                  grad_accumulation: int = 1, stop=None):
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    step = DeepSpeedStep(engine, loader or FakeLoader(), env, grad_accumulation=grad_accumulation,
                         gpu=SimpleNamespace(read=lambda: 37.0), faults=faults, stop=stop)
    return step(0, 1e-3)


def test_clean_row_from_the_engine():
    engine = FakeEngine(norm=torch.tensor(2.5))
    r = one_rank_step(engine, grad_accumulation=2, stop=SimpleNamespace(requested=False))
    assert r.train_loss == pytest.approx(math.log(VOCAB))
    assert r.tokens == 2 * MICRO * SEQ
    assert r.grad_norm == pytest.approx(2.5)
    assert r.gpu_util_pct == 37.0
    assert (r.step_applied, r.flagged_ranks, r.rank_error, r.stop_requested_ranks) == (True, (), None, ())
    assert engine.optimizer.param_groups[0]["lr"] == 1e-3


def test_no_norm_from_the_engine_is_nan_and_norm_invalid():
    r = one_rank_step(FakeEngine(norm=None))
    assert math.isnan(r.grad_norm)
    assert r.flagged_ranks == (0,)
    assert r.step_applied is True and r.rank_error is None


@pytest.mark.parametrize("norm", [-1.0, math.inf, torch.tensor(math.nan)])
def test_invalid_norm_is_flagged(norm):
    # -1 is DeepSpeed's mask for a NaN/Inf norm.
    assert one_rank_step(FakeEngine(norm=norm)).flagged_ranks == (0,)


def test_step_the_optimizer_skipped():
    r = one_rank_step(FakeEngine(norm=1.0, applied=False))
    assert r.step_applied is False
    assert r.flagged_ranks == (0,)


def test_exception_in_forward_is_reported_and_backward_still_runs():
    engine = FakeEngine(norm=1.0)
    r = one_rank_step(engine, FakeLoader(fail=True), grad_accumulation=2)
    assert r.rank_error is not None and r.rank_error.startswith("exception on rank(s) 0;")
    assert r.flagged_ranks == (0,)
    assert r.tokens == 0
    # Every micro-step still runs a backward, so ZeRO's gradient hooks match the peers'.
    assert engine.backwards == 2


def test_poisoned_loss_is_flagged_loss_nonfinite():
    r = one_rank_step(FakeEngine(norm=1.0), faults=FaultPlan("nan", 0, 0))
    assert math.isnan(r.train_loss)
    assert r.flagged_ranks == (0,) and r.rank_error is None


def test_a_stop_signal_rides_in_the_row():
    r = one_rank_step(FakeEngine(norm=1.0), stop=SimpleNamespace(requested=True))
    assert r.stop_requested_ranks == (0,)
    assert (r.flagged_ranks, r.rank_error, r.step_applied) == ((), None, True)
