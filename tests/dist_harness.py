"""Run a function on N local ranks joined in a gloo group, from inside a test.

As OLMo-core's ``run_distributed_test``: the test starts the ranks itself,
each rank runs ``fn(rank, world_size, *args)``, and its return value or its
traceback comes back to the test process, where the assertions happen. A rank that hangs is dumped (faulthandler) and
killed at ``timeout``; the test then fails with every rank's stack, so a hung
collective can never hang CI.

Ranks start from a fork server, not from the test process: each is as clean as
a spawned process, but torch and its compiler stack (which ``torch.optim``
pulls in, ~10 s on 2 cores) are imported once per session, in the server, and
not once per rank per test. This module must not import torch at its top.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 120.0
#: How long a rank that has reported may take to exit before it is killed.
_EXIT_GRACE_S = 10.0


class DistributedTestError(AssertionError):
    """Some rank raised, died or hung; the message holds every rank's story."""


#: Imported once by the fork server; nothing here may start threads or pick a device.
_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch._inductor.compile_fx"]


def _context() -> multiprocessing.context.BaseContext:
    """The fork server where the platform has one (Linux), else plain spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts, once per session
    return ctx


def start_rank_server() -> None:
    """Start the fork server now, so its imports overlap with the caller's own set-up.

    Optional: the first :func:`run_distributed_test` starts it otherwise.
    """
    if _context().get_start_method() == "forkserver":
        import multiprocessing.forkserver

        multiprocessing.forkserver.ensure_running()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, world_size: int, port: int, payload: bytes, conn, dump_path: str, timeout: float, env: dict[str, str]
) -> None:
    """Body of one rank's process: join the group, run ``fn``, send back its result or traceback."""
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1", **env,
    })
    os.environ.pop("ALBOR_FAULT", None)  # a drill meant for a real run must not fire here
    dump = open(dump_path, "w")  # noqa: SIM115 - open for the life of the process
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # torch was imported by the fork server: OMP_NUM_THREADS came too late
        fn, args = pickle.loads(payload)
        # Longer than the harness's deadline: a hang is reported by the harness, with every
        # rank's stack, and not by gloo on one rank first.
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout + 60)
        )
        # Every rank is past gloo's rendezvous before any runs fn: rank 0 hosts the store, and a
        # rank 0 whose fn returns at once would otherwise exit under a peer still connecting.
        dist.barrier()
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:
        result = ("error", traceback.format_exc())
    try:
        # Plain pickle, not the connection's: that one would pass tensors as shared memory,
        # which ends with this process.
        data = pickle.dumps(result)
    except Exception:
        data = pickle.dumps(("error", f"rank {rank} returned a value that cannot be pickled:\n{traceback.format_exc()}"))
    conn.send_bytes(data)
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # No destroy_process_group: after a failed collective it could block on a dead peer,
    # and the process ends here anyway.
    os._exit(0)


def run_distributed_test(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    timeout: float = DEFAULT_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> list[Any]:
    """Every rank's return value of ``fn(rank, world_size, *args)``, in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function), and so must its
    return value. ``env`` is set in each rank before ``fn``'s module is loaded there
    (torch itself is already imported: see the module docstring). Raises
    :class:`DistributedTestError` naming each rank that raised (with its traceback),
    died (with its exit code) or was still running at ``timeout`` (with its stack).
    """
    ctx = _context()
    payload = pickle.dumps((fn, args))
    port = free_port()
    dump_dir = Path(tempfile.mkdtemp(prefix="albor-dist-"))
    procs: list = []
    conns: list = []
    results: dict[int, tuple[str, Any]] = {}
    pending = set(range(world_size))
    try:
        for rank in range(world_size):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_rank_main,
                args=(rank, world_size, port, payload, child, str(dump_dir / f"rank-{rank}.txt"), timeout,
                      dict(env or {})),
                name=f"rank-{rank}", daemon=True,
            )
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            # A rank's pipe becomes readable when it reports, and at end-of-file when it dies.
            for conn in multiprocessing.connection.wait([conns[r] for r in pending], left):
                r = conns.index(conn)
                try:
                    results[r] = pickle.loads(conn.recv_bytes())
                except EOFError:  # closed without a word: it died
                    procs[r].join(1.0)
                    results[r] = ("died", f"exited with code {procs[r].exitcode} before reporting")
                pending.discard(r)
        if pending:  # still running at the deadline: dump each one's stack, then kill them all
            for r in pending:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(procs[r].pid, signal.SIGUSR1)
            time.sleep(0.5)
            for r in pending:
                dump = dump_dir / f"rank-{r}.txt"
                stack = (dump.read_text() if dump.exists() else "") or "(no stack dumped)"
                results[r] = ("hung", f"still running after {timeout:.0f} s; its threads:\n{stack}")
    finally:
        for p in procs:
            p.join(0 if pending else _EXIT_GRACE_S)
            if p.is_alive():
                p.kill()
                p.join(5)
        for c in conns:
            c.close()
        shutil.rmtree(dump_dir, ignore_errors=True)

    failures = [(r, kind, text) for r, (kind, text) in sorted(results.items()) if kind != "ok"]
    if failures:
        lines = [f"{len(failures)} of {world_size} rank(s) failed:"]
        for r, kind, text in failures:
            lines.append(f"── rank {r} ({kind}) ──\n{text}")
        raise DistributedTestError("\n".join(lines))
    return [results[r][1] for r in range(world_size)]
