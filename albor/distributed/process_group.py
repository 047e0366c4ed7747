"""Process-group set-up for every launch form, and the few collectives albor uses.

``deepspeed --module``, ``torchrun -m`` and ``deepspeed --hostfile`` set RANK,
LOCAL_RANK and WORLD_SIZE; a plain ``python -m albor.pretrain`` sets none, and
then this module builds a one-rank group by itself (no port, no launcher).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator, MutableMapping

import torch
import torch.distributed as dist

from albor.distributed.compat import set_group_timeouts, without_shared_memory_allreduce
from albor.errors import AlborError, ConfigError, DataError, ExitCode

#: First collectives may wait for a rank that tokenizes a raw corpus or compiles an op.
STARTUP_TIMEOUT_S = float(os.environ.get("ALBOR_STARTUP_TIMEOUT_S", 900))
#: After the first step a lost peer should end the job quickly (torchtitan does the same).
STEP_TIMEOUT_S = float(os.environ.get("ALBOR_STEP_TIMEOUT_S", 120))
#: torch's NCCL error handling, set before the first NCCL group is made (torch 2.13's ProcessGroupNCCL
#: reads them in its constructor, for every group, DeepSpeed's included).
#:
#: TORCH_NCCL_BLOCKING_WAIT=1: ``work.wait()`` blocks the calling thread until the collective completes,
#: fails (a remote peer's exit, ncclRemoteError) or passes its timeout (the step timeout, below), and then
#: raises DistBackendError *in that thread*. No watchdog thread is started, and torch's default watchdog
#: handling (TORCH_NCCL_ASYNC_ERROR_HANDLING=3, "SkipCleanUp") is what would otherwise end the process with
#: SIGABRT, without status.json or an exit record. With blocking wait, a lost or hung peer ends this rank
#: through ``train.train``'s except path like gloo's "closed by peer" does: exit record, status, 14.
#: The cost: the host waits at each synchronous collective (ZeRO's bucket reduces; the step's all-reduce,
#: which ``.tolist()`` waits for anyway) instead of queueing work ahead.
#:
#: TORCH_NCCL_ASYNC_ERROR_HANDLING is left to torch. Its only mode that does not end the process (2,
#: "CleanUpOnly") aborts the communicator under a main thread that may be reading the collective's
#: output: the step's fused all-reduce would return partial numbers, and one wrong metrics row could be
#: written before the next collective raised. Not verified on a GPU (docs/exit-codes.md, "Lost peers on NCCL").
NCCL_ERROR_HANDLING = {"TORCH_NCCL_BLOCKING_WAIT": "1"}


def launched_world_size() -> int:
    """World size the launcher announced (1 without a launcher); no process-group work."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place SUM over ranks (a no-op for one rank)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def per_rank(self, value: float) -> list[float]:
        """Every rank's ``value``, in rank order, known to every rank (one small all-reduce)."""
        slots = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        slots[self.rank] = value  # own slot only: the SUM is exact and acts as a gather
        return self.all_reduce_sum_(slots).tolist()

    def ranks_where(self, flag: bool) -> list[int]:
        """The ranks where ``flag`` is true, known to every rank."""
        return [r for r, v in enumerate(self.per_rank(float(flag))) if v]

    def raise_together(self, error: AlborError | None, what: str) -> None:
        """One vote: if any rank met an error, every rank raises one, with the highest exit code any rank met.

        A rank whose own part succeeded names the failed rank(s) and points at their message; the exit
        code is the same everywhere, so a node with a bad disk cannot leave its peers waiting in a collective.
        """
        codes = [int(c) for c in self.per_rank(int(error.exit_code) if error is not None else 0)]
        worst = max(codes)
        if not worst:
            return
        if error is None:
            failed = ", ".join(str(r) for r, c in enumerate(codes) if c)
            error = DataError(f"{what} failed on rank(s) {failed}; that rank's error above says why and how to fix it")
        if error.exit_code != worst:
            error = (ConfigError if worst == ExitCode.USAGE else DataError)(str(error))
        raise error

    def set_timeout(self, seconds: float) -> None:
        """Change the collective timeout of every group this rank is in, from now on.

        Every group, not just the default one: ZeRO reduces and gathers on groups
        DeepSpeed made itself, which otherwise keep torch's 10 or 30 minutes.
        """
        set_group_timeouts(seconds)

    @contextlib.contextmanager
    def startup_timeout(self) -> Iterator[None]:
        """The start-up timeout for a slow collective phase (a checkpoint), then the step timeout again."""
        self.set_timeout(STARTUP_TIMEOUT_S)
        try:
            yield
        finally:
            self.set_timeout(STEP_TIMEOUT_S)


def set_nccl_error_handling(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set :data:`NCCL_ERROR_HANDLING` where the user has not (torch's older ``NCCL_*`` spelling counts); what now holds."""
    for name, value in NCCL_ERROR_HANDLING.items():
        if name.removeprefix("TORCH_") not in environ:  # torch reads TORCH_NCCL_X, then NCCL_X
            environ.setdefault(name, value)
    return {name: environ.get(name, environ.get(name.removeprefix("TORCH_"), "")) for name in NCCL_ERROR_HANDLING}


def init_distributed() -> DistEnv:
    """Join (or, without a launcher, create) the process group; pick this rank's device."""
    import deepspeed

    timeout = datetime.timedelta(seconds=STARTUP_TIMEOUT_S)
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        set_nccl_error_handling()  # before any NCCL group exists
    if "RANK" not in os.environ:  # dev mode: one rank, no launcher, no port to pick
        os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed asserts on it
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one machine share its cores: without this every rank starts a thread
        # per core and they oversubscribe the CPU several times over (torchrun sets 1).
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    without_shared_memory_allreduce()
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts a group made above
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_initialized() -> bool:
    return dist.is_initialized()


def shutdown() -> None:
    """Leave the process group on a clean exit (not on the error path: no collectives there).

    Through DeepSpeed, which then also forgets the groups it cached: a later
    process group in the same process (a test, a benchmark) starts clean.
    """
    if dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
