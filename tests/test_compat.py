"""albor.distributed.compat: the start-up check of private names, and each wrapper on real objects.

The wrappers run on a one-rank gloo group made with a HashStore (as a plain
``python -m albor.pretrain`` makes it) and on a real DeepSpeed ZeRO-2 engine
of the tiny model, built once for the module.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from packaging.specifiers import SpecifierSet

from albor.distributed import compat
from albor.errors import ExitCode, UnsupportedEnvironmentError
from tests.dev_engine import LAUNCHER_ENV, dev_mode_engine

REPO = Path(__file__).resolve().parents[1]


# --- the start-up check --------------------------------------------------------------


def test_check_passes_on_the_installed_versions():
    compat.check_environment()


def _zero_optimizer_without_padding_field():
    """A stand-in for a DeepSpeed whose ZeRO optimizer renamed ``groups_padding``."""

    def __init__(self):
        self.single_partition_of_fp32_groups, self.partition_size, self.optimizer = [], [], None

    return type("DeepSpeedZeroOptimizer", (), {"__init__": __init__})


def _remove_c10d_timeout_setter(mp: pytest.MonkeyPatch) -> str:
    mp.delattr(dist.distributed_c10d, "_set_pg_timeout")
    return "torch.distributed.distributed_c10d._set_pg_timeout"


def _remove_recovery_script_copy(mp: pytest.MonkeyPatch) -> str:
    from deepspeed.runtime.engine import DeepSpeedEngine

    mp.delattr(DeepSpeedEngine, "_copy_recovery_script")
    return "deepspeed.runtime.engine.DeepSpeedEngine._copy_recovery_script"


def _rename_zero_padding_field(mp: pytest.MonkeyPatch) -> str:
    from deepspeed.runtime.zero import stage_1_and_2

    mp.setattr(stage_1_and_2, "DeepSpeedZeroOptimizer", _zero_optimizer_without_padding_field())
    return "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer.groups_padding"


def _remove_bf16_probe(mp: pytest.MonkeyPatch) -> str:
    # torch.ops namespaces resolve ops lazily: stand one in that has every op but this one.
    real = torch.ops.mkldnn

    class Namespace:
        def __getattr__(self, name):
            if name == "_is_mkldnn_bf16_supported":
                raise AttributeError(name)
            return getattr(real, name)

    mp.setattr(torch.ops, "mkldnn", Namespace())
    return "torch.ops.mkldnn._is_mkldnn_bf16_supported"


REMOVALS = [_remove_c10d_timeout_setter, _remove_recovery_script_copy, _rename_zero_padding_field, _remove_bf16_probe]


@pytest.mark.parametrize("remove", REMOVALS, ids=lambda f: f.__name__.lstrip("_"))
def test_a_missing_name_fails_with_one_line_naming_versions_name_and_fix(monkeypatch, remove):
    missing = remove(monkeypatch)
    with pytest.raises(UnsupportedEnvironmentError) as caught:
        compat.check_environment()
    message = str(caught.value)
    assert caught.value.exit_code == ExitCode.UNSUPPORTED_ENVIRONMENT == 6
    assert "\n" not in message
    assert f"torch {torch.__version__}" in message
    assert f"DeepSpeed {importlib.metadata.version('deepspeed')}" in message
    assert missing in message
    assert compat.TESTED_TORCH in message and compat.TESTED_DEEPSPEED in message


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real-run"])
def test_both_commands_check_before_any_process_group(tmp_path, capsys, monkeypatch, dry_run):
    from albor.pretrain import main

    missing = _remove_recovery_script_copy(monkeypatch)

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was started before the environment check")

    monkeypatch.setattr(dist, "init_process_group", no_process_group)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index.json").write_text("{}")
    argv = ["--dataset", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run"), "--model", "tiny"]
    code = main(argv + (["--dry-run"] if dry_run else []))
    captured = capsys.readouterr()
    assert code == ExitCode.UNSUPPORTED_ENVIRONMENT
    assert captured.err.count("\n") == 1 and missing in captured.err
    assert captured.out == ""
    assert not (tmp_path / "run").exists() and not dist.is_initialized()


def test_dry_run_prints_only_albors_output(tmp_path):
    """The check imports DeepSpeed; its accelerator probe must not print into the dry run's YAML."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCHER_ENV, "DS_ACCELERATOR")}
    p = subprocess.run(
        [sys.executable, "-m", "albor.pretrain", "--dataset", str(tmp_path / "data"), "--model", "tiny", "--dry-run"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[WARNING]" not in p.stdout
    assert yaml.safe_load(p.stdout)["model"] == "tiny"


# --- the pinned ranges ----------------------------------------------------------------


def test_pins_agree_and_hold_the_installed_versions():
    dependencies = re.search(r"(?ms)^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text()).group(1)
    pinned = dict(re.findall(r'"((?:torch|deepspeed))([<>=][^"]*)"', dependencies))
    assert f"torch{pinned['torch']}" == compat.TESTED_TORCH
    assert f"deepspeed{pinned['deepspeed']}" == compat.TESTED_DEEPSPEED
    for package, spec in pinned.items():
        assert SpecifierSet(spec).contains(importlib.metadata.version(package)), (package, spec)

    setup = (REPO / "launcher" / "setup.sh").read_text()
    reader = next(line for line in setup.splitlines() if line.startswith("pinned()"))
    read = subprocess.run(["bash", "-c", f"{reader}\npinned torch; pinned deepspeed"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.split()
    assert read == [compat.TESTED_TORCH, compat.TESTED_DEEPSPEED]
    assert '"$TORCH_SPEC"' in setup and '"$DEEPSPEED_SPEC"' in setup
    cpu_pin = re.search(r'"torch==([^"]+)"', setup).group(1)
    assert SpecifierSet(pinned["torch"]).contains(cpu_pin)


# --- the wrappers, on a real group and engine ------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny ZeRO-2 engine on a one-rank gloo group (albor's dev mode), after one step."""
    with dev_mode_engine(tmp_path_factory.mktemp("data"), steps=1) as (engine, _):
        yield engine


def test_timeouts_reach_every_group_including_deepspeeds(engine):
    extra = dist.new_group([0])  # as DeepSpeed makes its own groups for ZeRO
    before = compat.group_timeouts()
    assert len(before) >= 2 and datetime.timedelta(seconds=7) not in before
    for seconds in (7, 0.25, 900):
        compat.set_group_timeouts(seconds)
        assert compat.group_timeouts() == [datetime.timedelta(seconds=seconds)] * len(before)
    dist.destroy_process_group(extra)


def test_a_timeout_that_does_not_take_is_refused(engine, monkeypatch):
    monkeypatch.setattr(dist.distributed_c10d, "_set_pg_timeout", lambda timeout, group: None)
    with pytest.raises(UnsupportedEnvironmentError, match="_set_pg_timeout"):
        compat.set_group_timeouts(11)


def test_zero_partitions_are_views_of_exactly_each_groups_parameters(engine):
    optimizer = engine.optimizer
    partitions = compat.zero_partitions(optimizer)
    groups = [group["params"] for group in optimizer.optimizer.param_groups]
    assert len(partitions) == len(groups) == 2
    for part, flat in zip(partitions, optimizer.single_partition_of_fp32_groups):
        assert part.master.data_ptr() == flat.data_ptr()  # a view: hashed in place, no copy
        state = optimizer.optimizer.state[flat]
        assert part.exp_avg.data_ptr() == state["exp_avg"].data_ptr()
        assert part.exp_avg_sq.data_ptr() == state["exp_avg_sq"].data_ptr()
    # One rank owns every parameter: the masters are the model's weights, group by group.
    decay = [p for p in engine.module.parameters() if p.ndim >= 2]
    no_decay = [p for p in engine.module.parameters() if p.ndim < 2]
    for part, params in zip(partitions, (decay, no_decay)):
        assert torch.equal(part.master, torch.cat([p.detach().reshape(-1) for p in params]))


def test_zero_partitions_cut_the_padding_and_report_a_missing_moment():
    """Only the last rank's partition is padded; the moments may be absent before a step."""
    flat, other = torch.arange(6.0), torch.arange(4.0)
    optimizer = types.SimpleNamespace(
        single_partition_of_fp32_groups=[flat, other], partition_size=[6, 4], groups_padding=[2, 0],
        optimizer=types.SimpleNamespace(state={flat: {"exp_avg": flat * 2, "exp_avg_sq": flat * 3}}),
    )
    first, second = compat.zero_partitions(optimizer)
    assert first.master.tolist() == [0, 1, 2, 3] and first.exp_avg.tolist() == [0, 2, 4, 6]
    assert first.exp_avg_sq.tolist() == [0, 3, 6, 9]
    assert second.master.tolist() == [0, 1, 2, 3] and second.exp_avg is None and second.exp_avg_sq is None


def test_zero_group_layouts_give_each_groups_size_and_this_ranks_place(engine):
    """One rank: partition 0 of 1, holding the whole group (both groups' sizes are even: no padding)."""
    decay = sum(p.numel() for p in engine.module.parameters() if p.ndim >= 2)
    no_decay = sum(p.numel() for p in engine.module.parameters() if p.ndim < 2)
    layouts = compat.zero_group_layouts(engine.optimizer)
    assert layouts == [compat.ZeroGroupLayout(0, 1, decay, decay), compat.ZeroGroupLayout(0, 1, no_decay, no_decay)]
    assert [layout.start for layout in layouts] == [0, 0]
    # Other world sizes (start = rank x partition size, padding at the end): tests/test_sha_world_size.py.


@pytest.mark.parametrize("field", ["round_robin_bit16_indices", "round_robin_bit16_padding"])
def test_zero_group_layouts_refuse_a_group_out_of_parameter_order(engine, monkeypatch, field):
    """round_robin_gradients reorders a group by world size, parameter alignment pads inside it."""
    per_group = [list(values) for values in getattr(engine.optimizer, field)]
    per_group[1] = per_group[1][::-1] if field == "round_robin_bit16_indices" else [0] * (len(per_group[1]) - 1) + [2]
    monkeypatch.setattr(engine.optimizer, field, per_group)
    with pytest.raises(RuntimeError, match="group 1 is not laid out in parameter order.*round_robin_gradients to"):
        compat.zero_group_layouts(engine.optimizer)


LAYOUT_FIELDS = ["real_dp_process_group", "round_robin_bit16_groups", "round_robin_bit16_indices",
                 "round_robin_bit16_padding"]


@pytest.mark.parametrize("name", LAYOUT_FIELDS)
def test_each_layout_field_is_checked_at_start_up(monkeypatch, name):
    """A ZeRO optimizer whose methods set every field albor reads but ``name`` is refused, naming only it."""
    from deepspeed.runtime.zero import stage_1_and_2

    zero = "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer"
    kept = [field for owner, field in compat._DEEPSPEED_INSTANCE_NAMES if owner == zero and field != name]
    assert len(kept) >= len(LAYOUT_FIELDS) + 3
    namespace: dict = {}
    # Generated: the check reads the attribute names a method's code sets, so the stand-in needs real code.
    exec("def __init__(self):\n" + "".join(f"    self.{field} = None\n" for field in kept), namespace)
    monkeypatch.setattr(stage_1_and_2, "DeepSpeedZeroOptimizer",
                        type("DeepSpeedZeroOptimizer", (), {"__init__": namespace["__init__"]}))
    with pytest.raises(UnsupportedEnvironmentError) as caught:
        compat.check_environment()
    missing = re.search(r"lack what albor relies on \((.*)\): install", str(caught.value)).group(1).split(", ")
    assert missing == [f"{zero}.{name}"]


def test_checkpoint_writes_go_through_the_caller(engine, tmp_path):
    """Every file DeepSpeed's save writes passes run_write, so a failed one need not raise; restored after."""
    inner = engine.checkpoint_engine
    outcomes: list[str] = []

    def run_write(write):
        try:
            write()
            outcomes.append("ok")
        except Exception as e:  # as albor's checkpoint does: record, go on
            outcomes.append(f"failed: {type(e).__name__}")

    (tmp_path / "blocked").write_text("a file where DeepSpeed wants its tag directory")
    (tmp_path / "zero_to_fp32.py").mkdir()  # a directory where it copies its recovery script
    with pytest.raises(Exception):  # unrouted, the first failed write ends the save
        engine.save_checkpoint(str(tmp_path), tag="blocked", save_latest=False)
    with compat.checkpoint_writes_through(engine, run_write):
        engine.save_checkpoint(str(tmp_path), tag="blocked", save_latest=False)
    # The tag's two directories, model states, optimizer states and recovery script failed; none raised.
    assert outcomes.count("failed: IsADirectoryError") == 1, outcomes
    assert len([o for o in outcomes if o.startswith("failed")]) == 5, outcomes
    assert engine.checkpoint_engine is inner
    assert "_copy_recovery_script" not in vars(engine)  # DeepSpeed's own method shows through again

    outcomes.clear()
    (tmp_path / "zero_to_fp32.py").rmdir()
    with compat.checkpoint_writes_through(engine, run_write):
        engine.save_checkpoint(str(tmp_path), tag="ok", save_latest=False)
    assert outcomes and set(outcomes) == {"ok"}
    saved = {p.name for p in (tmp_path / "ok").iterdir()}
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= saved
    assert (tmp_path / "zero_to_fp32.py").is_file()


# --- checkpoints: the fp32 master weights and DeepSpeed's universal format ---------------


def test_zero_master_groups_place_every_parameter_at_its_offset(engine):
    """One rank holds each whole group: every parameter's slice of its partition is that parameter (fp32, CPU)."""
    groups = compat.zero_master_groups(engine.optimizer)
    assert len(groups) == 2
    placed = [p for group in groups for p, _ in group.params]
    assert sorted(map(id, placed)) == sorted(id(p) for p in engine.module.parameters())  # each exactly once
    for i, (group, flat) in enumerate(zip(groups, engine.optimizer.single_partition_of_fp32_groups)):
        assert group.partition.data_ptr() == flat.data_ptr()  # the optimizer's own tensor, not a copy
        assert [offset for _, offset in group.params] == engine.optimizer.round_robin_bit16_offsets[i]
        for p, offset in group.params:
            assert torch.equal(group.partition[offset:offset + p.numel()].view(p.shape), p.detach())


def test_zero_master_groups_skip_the_padding_between_parameters():
    """DeepSpeed's parameter alignment pads after a parameter; the next one starts past it."""
    a, b, c = (torch.nn.Parameter(torch.zeros(shape)) for shape in ((3,), (2, 2), (1,)))
    optimizer = types.SimpleNamespace(single_partition_of_fp32_groups=[torch.zeros(16)],
                                      round_robin_bit16_groups=[[a, b, c]], round_robin_bit16_padding=[[1, 2, 0]])
    (group,) = compat.zero_master_groups(optimizer)
    assert [(p is q, offset) for (p, offset), q in zip(group.params, (a, b, c))] == [(True, 0), (True, 4), (True, 10)]


def test_the_universal_converter_is_checked_at_start_up(monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    monkeypatch.delattr(ds_to_universal, "main")
    with pytest.raises(UnsupportedEnvironmentError, match=r"deepspeed\.checkpoint\.ds_to_universal\.main"):
        compat.check_environment()


def test_convert_to_universal_writes_each_parameters_state_quietly_and_no_pointer(engine, tmp_path, capfd):
    engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    capfd.readouterr()
    compat.convert_to_universal(tmp_path / "t", tmp_path / "t_universal")
    assert capfd.readouterr() == ("", "")  # its progress goes to albor's debug log, not to stdout
    out = tmp_path / "t_universal"
    for name, p in engine.module.named_parameters():
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            assert (out / "zero" / name / f"{state}.pt").is_file(), (name, state)
        fp32 = torch.load(out / "zero" / name / "fp32.pt", weights_only=False)["param"]
        assert torch.equal(fp32, p.detach()), name
    assert (out / "zero" / "optimizer_state.pt").is_file() and (out / "mp_rank_00_model_states.pt").is_file()
    assert not (tmp_path / "latest_universal").exists()  # albor names the tag itself; no stray pointer
