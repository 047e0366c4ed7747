"""The fault-drill switch and the telemetry helpers (pure parts)."""

import pytest

from albor.errors import ConfigError
from albor.faults import VAL_SPIKE_FACTOR, FaultPlan, InjectedFault, fault_plan_from_env
from albor.telemetry import GpuUtilization, peak_flops


def test_fault_switch_is_off_by_default():
    assert fault_plan_from_env({}, world_size=2) is None
    assert fault_plan_from_env({"ALBOR_FAULT": " "}, world_size=2) is None


def test_fault_switch_parses():
    assert fault_plan_from_env({"ALBOR_FAULT": "nan:1:3"}, world_size=2) == FaultPlan("nan", 1, 3)
    assert fault_plan_from_env({"ALBOR_FAULT": "raise-backward:1:3"}, world_size=2) == FaultPlan("raise-backward", 1, 3)
    assert fault_plan_from_env({"ALBOR_FAULT": "oom-backward:0:0"}, world_size=1) == FaultPlan("oom-backward", 0, 0)
    assert fault_plan_from_env({"ALBOR_FAULT": "val-spike:0:1"}, world_size=1) == FaultPlan("val-spike", 0, 1)


@pytest.mark.parametrize("raw", ["nan", "nan:1", "boom:1:3", "nan:x:3", "nan:1:-1", "nan:1:3:4", "val:0:1", "backward:1:3", "oom:1:3"])
def test_fault_switch_rejects_garbage(raw):
    with pytest.raises(ConfigError, match="ALBOR_FAULT"):
        fault_plan_from_env({"ALBOR_FAULT": raw}, world_size=2)


@pytest.mark.parametrize(("raw", "world_size"), [("nan:2:3", 2), ("raise:1:0", 1), ("val-spike:8:1", 8)])
def test_fault_switch_refuses_a_rank_outside_the_job(raw, world_size):
    # A drill that names a rank the job does not have would never fire: a rehearsal of nothing.
    with pytest.raises(ConfigError, match=rf"names rank \d+, but this job has {world_size} rank") as e:
        fault_plan_from_env({"ALBOR_FAULT": raw}, world_size=world_size)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


def test_val_spike_scales_only_its_rank_and_epoch():
    plan = FaultPlan("val-spike", 1, 2)
    assert plan.val_loss_factor(1, 2) == VAL_SPIKE_FACTOR == 10.0
    assert plan.val_loss_factor(0, 2) == plan.val_loss_factor(1, 1) == 1.0
    assert not plan.poisons_loss(1, 2)
    plan.before_forward(1, 2)  # an epoch drill never fires inside a step
    assert FaultPlan("nan", 1, 2).val_loss_factor(1, 2) == 1.0


def test_fault_fires_only_on_its_rank_and_step():
    plan = FaultPlan("raise", 1, 3)
    plan.before_forward(0, 3)
    plan.before_forward(1, 2)
    with pytest.raises(InjectedFault):
        plan.before_forward(1, 3)
    assert FaultPlan("nan", 1, 3).poisons_loss(1, 3) and not FaultPlan("nan", 1, 3).poisons_loss(0, 3)


def loss_through(plan: FaultPlan, rank: int, step: int):
    """A real loss with a graph behind it, passed through the drill (what DeepSpeedStep._micro_step does)."""
    import torch

    weight = torch.ones(3, requires_grad=True)
    loss = plan.wrap_loss(rank, step, (weight * 2.0).sum())
    return weight, loss


@pytest.mark.parametrize("kind", ["raise-backward", "oom-backward"])
def test_backward_drill_raises_inside_backward_only_on_its_rank_and_step(kind):
    plan = FaultPlan(kind, 1, 3)
    plan.before_forward(1, 3)  # the forward is untouched: the error comes from backward
    assert not plan.poisons_loss(1, 3)
    for rank, step in ((0, 3), (1, 2)):
        weight, loss = loss_through(plan, rank, step)
        loss.backward()
        assert weight.grad.tolist() == [2.0, 2.0, 2.0]
    weight, loss = loss_through(plan, 1, 3)
    assert loss.item() == 6.0  # the forward's value is unchanged
    with pytest.raises(RuntimeError) as e:
        loss.backward()
    assert weight.grad is None  # it raised before any gradient reached a parameter
    assert "injected in backward on rank 1 at step 3" in str(e.value)


def test_oom_drill_raises_torchs_out_of_memory_error_in_cudas_words():
    import torch

    _, loss = loss_through(FaultPlan("oom-backward", 1, 3), 1, 3)
    with pytest.raises(torch.OutOfMemoryError, match=r"^CUDA out of memory\. Tried to allocate"):
        loss.backward()
    _, loss = loss_through(FaultPlan("raise-backward", 1, 3), 1, 3)
    with pytest.raises(InjectedFault):  # autograd hands back the drill's own exception type
        loss.backward()


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
