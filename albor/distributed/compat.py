"""Every private torch and DeepSpeed name albor uses, behind small functions, checked at start-up.

albor needs things neither library offers publicly: a new collective
timeout on every process group (DeepSpeed makes its own groups), ZeRO's
partition of the optimizer state (for the optimizer-state sha and the fp32
masters in the .apr), DeepSpeed's checkpoint file writes (so a failed write
cannot strand the peers in a barrier), its universal-checkpoint conversion
(to resume on another world size), whether the CPU has bf16, and a way to keep DeepSpeed from
building its CPU shared-memory all-reduce. Each use lives here and nowhere else in albor,
except one override: albor.model.rope's ``_apply`` (checked here all the same).
:func:`check_environment` runs before any process group and verifies that
every name albor touches still exists, so a torch or DeepSpeed upgrade that
moves one fails at once with one line (exit 6), not deep inside a run. The
exception: whether inductor can compile here (:func:`inductor_problem`, for the
``compile`` lever) answers "it cannot" when a name it needs has moved, instead.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import shutil
import types
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from albor.errors import UnsupportedEnvironmentError

#: The ranges albor is tested with; pyproject.toml and launcher/setup.sh pin the same.
TESTED_TORCH = "torch>=2.13,<2.14"
TESTED_DEEPSPEED = "deepspeed>=0.19.8,<0.20"

_C10D = "torch.distributed.distributed_c10d"
_ENGINE = "deepspeed.runtime.engine.DeepSpeedEngine"
_CHECKPOINT_ENGINE = "deepspeed.runtime.checkpoint_engine.checkpoint_engine.CheckpointEngine"
_ZERO = "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer"

#: (owner, name): every name the functions below touch, as an attribute of its module or class.
_TORCH_NAMES = [
    (f"{_C10D}._world", "pg_map"),
    (_C10D, "_rank_not_in_group"),
    (_C10D, "_set_pg_timeout"),
    ("torch.distributed.ProcessGroup", "_get_backend"),
    ("torch.distributed.ProcessGroup", "_device_types"),
    ("torch.distributed.ProcessGroupGloo", "options"),
    ("torch.distributed.ProcessGroupGloo.Options", "_timeout"),
    ("torch.ops.mkldnn", "_is_mkldnn_bf16_supported"),
    # Not used here: albor.model.rope overrides it to rebuild its float32 tables after a move or cast.
    ("torch.nn.Module", "_apply"),
]
_NCCL_NAMES = [
    ("torch.distributed.ProcessGroupNCCL", "options"),
    ("torch.distributed.ProcessGroupNCCL.Options", "_timeout"),
]
_DEEPSPEED_NAMES = [
    (_ENGINE, "_copy_recovery_script"),
    (_CHECKPOINT_ENGINE, "save"),
    (_CHECKPOINT_ENGINE, "makedirs"),
    # Its command-line entry point, called in-process with the Namespace its parser would build.
    ("deepspeed.checkpoint.ds_to_universal", "main"),
    ("deepspeed.comm.torch", "build_shm_op"),
]
#: Instance attributes cannot be looked up without an instance (an engine): these
#: are checked as names the class's own methods still read or set.
_DEEPSPEED_INSTANCE_NAMES = [
    (_ENGINE, "checkpoint_engine"),
    (_ZERO, "single_partition_of_fp32_groups"),
    (_ZERO, "partition_size"),
    (_ZERO, "groups_padding"),
    (_ZERO, "optimizer"),
    (_ZERO, "real_dp_process_group"),
    (_ZERO, "round_robin_bit16_groups"),
    (_ZERO, "round_robin_bit16_indices"),
    (_ZERO, "round_robin_bit16_padding"),
]


# --- process groups -----------------------------------------------------------------


def set_group_timeouts(seconds: float) -> None:
    """Change the collective timeout of every process group this rank is in, from now on.

    torch's public API sets a timeout only when a group is made; DeepSpeed makes
    its own groups for ZeRO's reduces and gathers. torch's setter only warns for
    a backend it cannot change, so the result is read back: a timeout that did
    not take would silently keep torch's 10 or 30 minutes.
    """
    wanted = datetime.timedelta(seconds=seconds)
    c10d = dist.distributed_c10d
    for group in list(c10d._world.pg_map):
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(wanted, group)
    if any(abs(got - wanted) >= datetime.timedelta(milliseconds=1) for got in group_timeouts()):
        raise _unsupported([f"{_C10D}._set_pg_timeout (left a group's timeout unchanged)"])


def group_timeouts() -> list[datetime.timedelta]:
    """The collective timeout of each backend of every process group this rank is in."""
    c10d = dist.distributed_c10d
    return [
        group._get_backend(device).options._timeout
        for group in list(c10d._world.pg_map)
        if not c10d._rank_not_in_group(group)
        for device in group._device_types
    ]


# --- ZeRO's optimizer state ---------------------------------------------------------


class ZeroPartition(NamedTuple):
    """One param group's share on this rank: fp32 master weights and Adam's moments, unpadded.

    A moment is None where the optimizer holds none (before its first step).
    """

    master: torch.Tensor
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None


def zero_partitions(zero_optimizer: Any) -> list[ZeroPartition]:
    """This rank's partition of each param group of a ZeRO stage 1/2 optimizer, as views.

    Only the last rank's partition ends in alignment padding; it is cut off, so
    the views hold exactly the parameters this rank owns.
    """
    partitions = []
    for i, flat in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        real = zero_optimizer.partition_size[i] - zero_optimizer.groups_padding[i]
        state = zero_optimizer.optimizer.state.get(flat, {})
        exp_avg, exp_avg_sq = (state[key][:real] if key in state else None for key in ("exp_avg", "exp_avg_sq"))
        partitions.append(ZeroPartition(flat[:real], exp_avg, exp_avg_sq))
    return partitions


class ZeroGroupLayout(NamedTuple):
    """Where this rank's partition of one param group lies in the whole group.

    The group's flat order is its parameters' order, concatenated, then
    alignment padding at the very end; ``partition_size`` elements per rank,
    in rank order.
    """

    partition_id: int  # this rank's place among the group's partitions
    partition_count: int  # ranks the group is split over
    partition_size: int  # elements per partition, padding included
    numel: int  # the group's elements over every rank, without padding

    @property
    def start(self) -> int:
        """This partition's first element in the group's flat order."""
        return self.partition_id * self.partition_size


def zero_group_layouts(zero_optimizer: Any) -> list[ZeroGroupLayout]:
    """The layout of each param group of a ZeRO stage 1/2 optimizer, as seen from this rank.

    Raises if a group's flat order is not its parameters' order: DeepSpeed's
    ``round_robin_gradients`` reorders the parameters by world size, and
    parameter alignment pads between them; neither is albor's configuration.
    """
    layouts = []
    for i, params in enumerate(zero_optimizer.round_robin_bit16_groups):
        if zero_optimizer.round_robin_bit16_indices[i] != list(range(len(params))) or any(
            zero_optimizer.round_robin_bit16_padding[i]
        ):
            raise RuntimeError(
                f"ZeRO param group {i} is not laid out in parameter order (DeepSpeed's round_robin_gradients or"
                " parameter alignment); set zero_optimization.round_robin_gradients to false"
            )
        group = zero_optimizer.real_dp_process_group[i]
        layouts.append(ZeroGroupLayout(
            partition_id=dist.get_rank(group=group),
            partition_count=dist.get_world_size(group=group),
            partition_size=int(zero_optimizer.partition_size[i]),
            numel=sum(p.numel() for p in params),
        ))
    return layouts


# --- DeepSpeed's checkpoint writes --------------------------------------------------


class _RoutedWrites:
    """DeepSpeed's checkpoint engine, with its file writes passed through ``run_write``."""

    def __init__(self, inner: Any, run_write: Callable[[Callable[[], object]], None]) -> None:
        self._inner, self._run_write = inner, run_write

    def save(self, state_dict, path) -> None:
        self._run_write(lambda: self._inner.save(state_dict, path))

    def makedirs(self, path, exist_ok=False) -> None:
        self._run_write(lambda: self._inner.makedirs(path, exist_ok=exist_ok))

    def __getattr__(self, name):
        return getattr(self._inner, name)


@contextlib.contextmanager
def checkpoint_writes_through(engine: Any, run_write: Callable[[Callable[[], object]], None]) -> Iterator[None]:
    """While inside, every file write of ``engine.save_checkpoint`` is the call ``run_write(write)``.

    Covers DeepSpeed's state files and directories (its checkpoint engine) and
    the recovery scripts it copies beside them. ``run_write`` decides what a
    failed write does (albor's checkpoint records it instead of raising).
    """
    inner = engine.checkpoint_engine
    copy_scripts = engine._copy_recovery_script
    engine.checkpoint_engine = _RoutedWrites(inner, run_write)
    engine._copy_recovery_script = lambda path: run_write(lambda: copy_scripts(path))
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
        del engine._copy_recovery_script  # the instance attribute; the method shows through again


# --- the CPU ----------------------------------------------------------------------------


def cpu_bf16_supported() -> bool:
    """Whether this CPU computes in bf16 natively (oneDNN's own test; torch has no public one)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except RuntimeError:  # a torch built without oneDNN
        return False


def without_shared_memory_allreduce() -> None:
    """Keep DeepSpeed's communication backend from building and mapping its CPU shared-memory all-reduce.

    DeepSpeed's TorchBackend compiles that op on first use (about a minute) and
    maps a 66 MB ``/dev/shm/deepspeed_allreduce_buffer_*`` segment per rank,
    named by address, port and rank, which it never unlinks: every run leaked
    it, a container's 64 MB ``/dev/shm`` crashed the ranks, and a later run on
    the same port mapped the stale one. It serves only ``inference_all_reduce``
    (tensor-parallel inference), which ZeRO-2 training never calls; gloo does
    every collective albor makes. Call before ``deepspeed.init_distributed``.
    """
    # By module path: the attribute deepspeed.comm.torch is torch itself (deepspeed.comm re-exports it).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# --- torch.compile (albor.model_compile) -------------------------------------------------
# Not in the start-up check: a torch that moved one of these names cannot compile, which
# auto mode answers by staying eager and --compile by refusing (albor.model_compile).


def inductor_problem(device_type: str) -> str | None:
    """Why inductor (torch.compile's default backend) cannot compile for ``device_type`` here; None if it can.

    Checks only what is cheap to check before any model exists: the Python/torch
    build, and the compiler inductor will call on its first graph (on a CPU the
    C++ compiler it emits code for, ``torch._inductor.config.cpp.cxx``, set from
    CXX; on a GPU Triton, which builds each kernel's launcher with a C compiler).
    """
    try:
        from torch._dynamo.eval_frame import check_if_dynamo_supported

        check_if_dynamo_supported()
    except Exception as e:
        return f"torch {torch.__version__} cannot compile on this Python ({e})"
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton

            triton = has_triton()
        except Exception:
            triton = False
        if not triton:
            return (f"torch {torch.__version__} has no working Triton for this GPU (inductor's GPU code generator); "
                    "install the triton that matches torch")
        # Triton's own choice: $CC, else gcc, else clang (triton.runtime.build).
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
        if cc is None or shutil.which(cc) is None:
            return "Triton needs a C compiler to build its kernel launchers and finds none ($CC, gcc or clang)"
        return None
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.cpp_builder import get_cpp_compiler
    except Exception as e:
        return f"torch {torch.__version__} has no usable inductor ({type(e).__name__}: {e})"
    try:
        get_cpp_compiler()  # runs `CXX --version`
    except Exception:
        cxx = inductor_config.cpp.cxx
        tried = ", ".join([cxx] if isinstance(cxx, str) else [c for c in cxx if c])
        return (f"inductor compiles the model to C++ on a CPU and finds no working C++ compiler (tried {tried}); "
                "install g++ or set CXX to one")
    return None


def inductor_deterministic(on: bool) -> None:
    """Inductor's deterministic mode: no kernel choice by on-device timing, which can change the sums' order."""
    from torch._inductor import config as inductor_config

    inductor_config.deterministic = on


# --- the start-up check ---------------------------------------------------------------


def check_environment() -> None:
    """Raise :class:`UnsupportedEnvironmentError` (exit 6) if a private name used here is gone.

    Looks the names up on torch's and DeepSpeed's modules and classes only:
    no process group, no engine, nothing written.
    """
    _tell_deepspeed_the_device()
    names = _TORCH_NAMES + (_NCCL_NAMES if dist.is_nccl_available() else []) + _DEEPSPEED_NAMES
    missing = [f"{owner}.{name}" for owner, name in names if not _present(owner, name, hasattr)]
    missing += [
        f"{owner}.{name}" for owner, name in _DEEPSPEED_INSTANCE_NAMES if not _present(owner, name, _used_by_methods)
    ]
    if missing:
        raise _unsupported(missing)


def _tell_deepspeed_the_device() -> None:
    # albor trains on CUDA when torch sees a GPU and on the CPU otherwise. Saying so
    # before DeepSpeed's first import spares its probe, which otherwise prints a
    # warning on stdout (into a dry run's YAML).
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _present(owner: str, name: str, test: Callable[[Any, str], bool]) -> bool:
    try:
        return bool(test(_resolve(owner), name))
    except Exception:  # a module or class that moved is as missing as the name on it
        return False


def _resolve(dotted: str) -> Any:
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


def _used_by_methods(cls: type, name: str) -> bool:
    """Whether a method defined on ``cls`` reads or sets an attribute called ``name``."""

    def names(code: types.CodeType) -> set[str]:
        nested = (c for c in code.co_consts if isinstance(c, types.CodeType))
        return set(code.co_names).union(*map(names, nested))

    return any(
        name in names(fn.__code__) for fn in vars(cls).values() if isinstance(fn, types.FunctionType)
    )


def _unsupported(missing: list[str]) -> UnsupportedEnvironmentError:
    return UnsupportedEnvironmentError(
        f"torch {torch.__version__} and DeepSpeed {_deepspeed_version()} lack what albor relies on "
        f"({', '.join(missing)}): install the tested versions, "
        f"pip install '{TESTED_TORCH}' '{TESTED_DEEPSPEED}'"
    )


def _deepspeed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return "(not installed)"


# --- checkpoints: the fp32 master weights, and DeepSpeed's universal format ------------


class ZeroMasterGroup(NamedTuple):
    """One param group's fp32 master weights on this rank, and where each parameter lies in the group.

    The group's flat order is every rank's partition, concatenated in rank
    order; only its very end is alignment padding.
    """

    partition: torch.Tensor  # this rank's partition, padding included: the same size on every rank
    params: list[tuple[torch.nn.Parameter, int]]  # each (module) parameter and its first element in the flat order


def zero_master_groups(zero_optimizer: Any) -> list[ZeroMasterGroup]:
    """Each param group of a ZeRO stage 1/2 optimizer: this rank's fp32 master partition and the offsets.

    The offsets follow DeepSpeed's own flat order and the padding it put
    between parameters (none in albor's configuration), as its optimizer lays
    out the group (``round_robin_bit16_offsets``, computed the same way).
    """
    groups = []
    for flat, params, paddings in zip(
        zero_optimizer.single_partition_of_fp32_groups,
        zero_optimizer.round_robin_bit16_groups,
        zero_optimizer.round_robin_bit16_padding,
    ):
        placed, offset = [], 0
        for param, padding in zip(params, paddings):
            placed.append((param, offset))
            offset += param.numel() + padding
        groups.append(ZeroMasterGroup(flat, placed))
    return groups


def convert_to_universal(tag_dir: os.PathLike, output_dir: os.PathLike) -> None:
    """DeepSpeed's ``ds_to_universal`` on one saved tag, in this process (one worker: no subprocesses).

    ``inject_missing_state`` adds the version marker the tool insists on and
    albor's saves do not carry. The tool prints its progress and writes a
    ``latest_universal`` beside ``output_dir``: the progress goes to the debug
    log, and that file (albor names tags itself) is removed.
    """
    import argparse
    import io
    import logging
    from pathlib import Path

    from deepspeed.checkpoint.ds_to_universal import main

    output_dir = Path(output_dir)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        main(argparse.Namespace(
            input_folder=str(tag_dir), output_folder=str(output_dir), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True,
        ))
    logging.getLogger("albor").debug("ds_to_universal %s:\n%s", tag_dir, chatter.getvalue())
    pointer = output_dir.parent / "latest_universal"
    if pointer.is_file() and pointer.read_text().strip() == output_dir.name:
        pointer.unlink()
