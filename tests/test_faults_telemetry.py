"""The fault-drill switch and the telemetry helpers (pure parts)."""

import pytest

from albor.errors import ConfigError
from albor.faults import FaultPlan, InjectedFault, fault_plan_from_env
from albor.telemetry import GpuUtilization, peak_flops


def test_fault_switch_is_off_by_default():
    assert fault_plan_from_env({}) is None
    assert fault_plan_from_env({"ALBOR_FAULT": " "}) is None


def test_fault_switch_parses():
    assert fault_plan_from_env({"ALBOR_FAULT": "nan:1:3"}) == FaultPlan("nan", 1, 3)


@pytest.mark.parametrize("raw", ["nan", "nan:1", "boom:1:3", "nan:x:3", "nan:1:-1", "nan:1:3:4"])
def test_fault_switch_rejects_garbage(raw):
    with pytest.raises(ConfigError, match="ALBOR_FAULT"):
        fault_plan_from_env({"ALBOR_FAULT": raw})


def test_fault_fires_only_on_its_rank_and_step():
    plan = FaultPlan("raise", 1, 3)
    plan.before_forward(0, 3)
    plan.before_forward(1, 2)
    with pytest.raises(InjectedFault):
        plan.before_forward(1, 3)
    assert FaultPlan("nan", 1, 3).poisons_loss(1, 3) and not FaultPlan("nan", 1, 3).poisons_loss(0, 3)


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA GH200 480GB") == 989e12
    assert peak_flops(None) is None and peak_flops("cpu") is None


def test_gpu_util_without_gpu_is_zero_and_says_why():
    gpu = GpuUtilization(None)
    assert gpu.read() == 0.0 and not gpu.available and gpu.reason == "no GPU"


def test_gpu_util_with_unknown_uuid_is_unavailable_not_invented():
    gpu = GpuUtilization("GPU-00000000-0000-0000-0000-000000000000")
    assert gpu.read() == 0.0 and not gpu.available and "NVML unavailable" in gpu.reason
