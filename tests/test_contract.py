"""Gates 005, 007 and 008 as pure functions (the gates are listed in docs/contract.md)."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from albor.contract import (
    AbortReason,
    ContractAbort,
    CheckpointPoint,
    Regime,
    StepMetrics,
    check_non_divergence,
    check_numerical_stability,
)
from albor.errors import ExitCode

FT = Regime.FINETUNE
VOCAB = 50257


def _abort(fn, *args) -> ContractAbort:
    with pytest.raises(ContractAbort) as info:
        fn(*args)
    return info.value


def test_gate_005_aborts_on_doubling_val_loss():
    a = _abort(check_non_divergence, 1, [3.5, 7.1], FT, VOCAB)
    assert a.reason is AbortReason.DIVERGENCE
    assert a.epoch == 1 and a.value == pytest.approx(7.1)
    assert "ratio 2.03" in a.message


def test_gate_005_aborts_on_epoch_zero_blowup():
    a = _abort(check_non_divergence, 0, [31.99], FT, VOCAB)
    assert a.reason is AbortReason.DIVERGENCE_AT_EPOCH_ZERO
    assert a.value == pytest.approx(31.99)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_gate_005_epoch_zero_non_finite_aborts(bad):
    assert _abort(check_non_divergence, 0, [bad], FT, VOCAB).reason is AbortReason.DIVERGENCE_AT_EPOCH_ZERO


def test_gate_005_allows_healthy_decrease():
    trace = [3.5, 3.0, 2.5, 2.2]
    for epoch in range(len(trace)):
        check_non_divergence(epoch, trace, FT, VOCAB)


def test_gate_005_allows_exact_two_x():
    check_non_divergence(1, [2.0, 4.0], FT, VOCAB)
    assert _abort(check_non_divergence, 1, [2.0, math.nextafter(4.0, 5.0)], FT, VOCAB).reason is AbortReason.DIVERGENCE


def test_gate_005_nan_at_epoch_n_is_numerical_instability():
    a = _abort(check_non_divergence, 1, [3.0, math.nan], FT, VOCAB)
    assert a.reason is AbortReason.NUMERICAL_INSTABILITY and a.field == "val_loss"


def test_gate_005_from_scratch_permits_near_random_baseline():
    check_non_divergence(0, [18.0], Regime.FROM_SCRATCH, VOCAB)
    # The same value under finetune still aborts: the regime split is not a weakening.
    assert _abort(check_non_divergence, 0, [18.0], FT, VOCAB).reason is AbortReason.DIVERGENCE_AT_EPOCH_ZERO


def test_gate_005_from_scratch_aborts_above_2_ln_vocab():
    a = _abort(check_non_divergence, 0, [25.0], Regime.FROM_SCRATCH, VOCAB)
    assert a.reason is AbortReason.DIVERGENCE_AT_EPOCH_ZERO and a.value == 25.0


def test_from_scratch_cap_matches_formula():
    assert Regime.FROM_SCRATCH.epoch_zero_cap(VOCAB) == pytest.approx(2.0 * math.log(VOCAB))
    assert Regime.FROM_SCRATCH.epoch_zero_cap(VOCAB) == pytest.approx(21.6498, abs=1e-4)
    assert Regime.FINETUNE.epoch_zero_cap(VOCAB) == 10.0


@given(
    prev=st.floats(min_value=1e-3, max_value=1e3),
    ratio=st.floats(min_value=0.0, max_value=4.0),
)
def test_gate_005_boundary_property(prev, ratio):
    """Aborts exactly when curr > 2·prev, for any previous loss and ratio."""
    curr = prev * ratio
    if curr > 2.0 * prev:
        assert _abort(check_non_divergence, 1, [prev, curr], FT, VOCAB).reason is AbortReason.DIVERGENCE
    else:
        check_non_divergence(1, [prev, curr], FT, VOCAB)


@given(prev=st.floats(min_value=1e-6, max_value=1e6, allow_nan=False))
def test_gate_005_exact_double_always_passes(prev):
    check_non_divergence(1, [prev, 2.0 * prev], FT, VOCAB)


@given(v=st.floats(allow_nan=True, allow_infinity=True), vocab=st.integers(2, 300_000))
def test_gate_005_epoch_zero_property(v, vocab):
    for regime in Regime:
        cap = regime.epoch_zero_cap(vocab)
        if math.isfinite(v) and v <= cap:
            check_non_divergence(0, [v], regime, vocab)
        else:
            assert _abort(check_non_divergence, 0, [v], regime, vocab).reason is AbortReason.DIVERGENCE_AT_EPOCH_ZERO


def test_gate_007_aborts_on_nan_train_loss():
    a = _abort(check_numerical_stability, 42, math.nan, 1.0)
    assert (a.reason, a.step, a.field) == (AbortReason.NUMERICAL_INSTABILITY, 42, "train_loss")


@pytest.mark.parametrize("norm", [math.inf, -math.inf, math.nan, -1.0])
def test_gate_007_aborts_on_bad_grad_norm(norm):
    a = _abort(check_numerical_stability, 7, 1.0, norm)
    assert (a.reason, a.field) == (AbortReason.NUMERICAL_INSTABILITY, "grad_norm")


def _metrics(**kw) -> StepMetrics:
    base = dict(step=1, train_loss=3.2, grad_norm=0.5, lr=1e-4, tokens_per_sec=1000.0, gpu_util_pct=75.0, wall_ms=5.0)
    return StepMetrics(**{**base, **kw})


def test_step_metrics_accepts_healthy():
    _metrics().validate()
    _metrics(gpu_util_pct=0.0, tokens_per_sec=0.0, wall_ms=0.0).validate()
    _metrics(gpu_util_pct=100.0).validate()


@pytest.mark.parametrize(
    "field,value,reason",
    [
        ("tokens_per_sec", -1.0, AbortReason.THROUGHPUT_OUT_OF_RANGE),
        ("tokens_per_sec", math.inf, AbortReason.THROUGHPUT_OUT_OF_RANGE),
        ("gpu_util_pct", 150.0, AbortReason.THROUGHPUT_OUT_OF_RANGE),
        ("gpu_util_pct", -0.5, AbortReason.THROUGHPUT_OUT_OF_RANGE),
        ("gpu_util_pct", math.nan, AbortReason.THROUGHPUT_OUT_OF_RANGE),
        ("wall_ms", -1.0, AbortReason.THROUGHPUT_OUT_OF_RANGE),
        ("wall_ms", math.nan, AbortReason.THROUGHPUT_OUT_OF_RANGE),
        ("train_loss", math.inf, AbortReason.NUMERICAL_INSTABILITY),
        ("lr", math.nan, AbortReason.NUMERICAL_INSTABILITY),
    ],
)
def test_step_metrics_rejects(field, value, reason):
    a = _abort(_metrics(**{field: value}).validate)
    assert (a.reason, a.field) == (reason, field)


def test_each_abort_reason_has_its_own_exit_code():
    codes = [r.exit_code for r in AbortReason]
    assert len(set(codes)) == len(codes)
    assert all(c != ExitCode.OK for c in codes)
    assert AbortReason.DIVERGENCE.exit_code == 10 and AbortReason.NUMERICAL_INSTABILITY.exit_code == 12


def test_abort_to_dict_is_json_safe():
    import json

    d = ContractAbort(AbortReason.NUMERICAL_INSTABILITY, "x", step=3, field="train_loss", value=math.nan, ranks=[1]).to_dict()
    assert json.loads(json.dumps(d, allow_nan=False))["value"] == "nan"
    assert d["ranks"] == [1] and d["reason"] == "numerical_instability"


def test_checkpoint_paths_match_contract_template(tmp_path):
    art = CheckpointPoint.for_epoch(tmp_path / "run", 7, step=800)
    assert art.apr_path == tmp_path / "run" / "ckpt" / "epoch-007.apr"
    assert art.metadata_path == tmp_path / "run" / "ckpt" / "epoch-007.metadata.json"
    assert (art.tag, art.kind, art.step, art.epoch) == ("epoch-007", "epoch", 800, 7)
    pre = CheckpointPoint.for_preemption(tmp_path / "run", 1234, epoch=12)
    assert pre.apr_path is None and pre.metadata_path == tmp_path / "run" / "ckpt" / "step-0001234.metadata.json"
    assert (pre.tag, pre.kind, pre.step, pre.epoch) == ("step-0001234", "preemption", 1234, 12)
