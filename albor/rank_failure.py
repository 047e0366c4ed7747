"""How one rank failed, in words its peers and a person can act on (pure functions, no torch).

An exception in ``engine.backward`` or ``engine.step`` cannot be reported in the
step's all-reduce: the peers are inside ZeRO's gradient collectives by then. So
the rank ends, and its peers only see the symptom, a collective that lost it.
The failing rank therefore writes its error into its own exit record
(``run_files.write_exit_record``) before it exits. Its exit is what makes the
peers' collectives fail, so by then the record is on disk, and rank 0 reads it
to name the rank and the error in status.json (:func:`crash_summary`).
See docs/exit-codes.md (code 14).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from albor.errors import ExitCode

#: What a rank that ran out of memory should change. The global batch (micro-batch × accumulation × ranks)
#: is what the run's hyperparameters were tuned for, so keep it and trade the micro-batch for accumulation.
OOM_ADVICE = (
    "out of memory: lower --batch-size (the micro-batch per rank) and keep the global batch by raising "
    "gradient_accumulation_steps in the DeepSpeed config by the same factor (e.g. --batch-size 8 with "
    "accumulation 2 instead of --batch-size 16 with 1)"
)
#: An exception's text is kept in the record up to this many characters (a CUDA OOM message is ~500).
MESSAGE_LIMIT = 2000

# A collective's words for a lost peer, most specific first (lower case). gloo: the peer's socket went away.
# NCCL (torch 2.13's ProcessGroupNCCL / NCCLUtils): ncclRemoteError's text, ncclSystemError's hint, a
# communicator aborted by the watchdog or by a blocking wait that timed out, and the timeout itself.
_EXITED = (
    "closed by peer", "reset by peer", "broken pipe",  # gloo
    "ncclremoteerror", "remote process exited or there was a network error",  # NCCL >= 2.13
    "unexpected exit of a remote peer",  # torch's gloss on ncclSystemError
)
_TIMEOUT = (
    "watchdog caught collective operation timeout",  # NCCL: the watchdog, or a blocking wait
    "timed out in blocking wait",
    "timed out",  # gloo ("Timed out waiting ... for recv"), and the NCCL lines above
)
_ABORTED = (
    "nccl communicator was aborted",  # every NCCL call after an abort
    "some nccl operations have failed or timed out",
)


def classify_lost_peer(text: str) -> str | None:
    """``"exited"``, ``"timeout"`` or ``"aborted"`` when ``text`` says a collective lost a peer; None otherwise.

    An aborted NCCL communicator carries its original reason in the same text, so
    an exit or a timeout named there wins over the abort.
    """
    low = text.lower()
    for kind, words in (("exited", _EXITED), ("timeout", _TIMEOUT), ("aborted", _ABORTED)):
        if any(w in low for w in words):
            return kind
    return None


def is_out_of_memory(type_names: tuple[str, ...] | str, text: str) -> bool:
    """torch.OutOfMemoryError (a subclass counts), Python's MemoryError, or an error that says so ("CUDA error: out of memory")."""
    names = (type_names,) if isinstance(type_names, str) else type_names
    return any(n in ("OutOfMemoryError", "MemoryError") for n in names) or "out of memory" in text.lower()


def error_record(e: BaseException) -> dict[str, Any]:
    """What a rank's exit record says of the exception that ended it.

    ``type`` and ``message``; ``advice`` for an out-of-memory error; ``lost_peer``
    (see :func:`classify_lost_peer`) when the error is only the symptom of another
    rank's end, so a reader can tell the cause from its echoes.
    """
    text = str(e)
    record: dict[str, Any] = {"type": type(e).__name__, "message": text[:MESSAGE_LIMIT]}
    if is_out_of_memory(tuple(c.__name__ for c in type(e).__mro__), text):
        record["advice"] = OOM_ADVICE
    if (lost := classify_lost_peer(text)) is not None:
        record["lost_peer"] = lost
    return record


def describe(error: Mapping[str, Any], *, where: str = "") -> str:
    """``Type{where}: message``, then the advice, on one line."""
    words = f"{error.get('type', 'error')}{where}: {error.get('message', '')}".rstrip(": ")
    return f"{words} ({error['advice']})" if error.get("advice") else words


def is_cause(record: Mapping[str, Any]) -> bool:
    """Whether a peer's exit record says why the job ended, rather than that it lost a peer too.

    An error that is not itself a lost peer, or an end of its own (a second
    signal's 128+N, the preemption deadline's 16) recorded without one.
    """
    error = record.get("error")
    if isinstance(error, Mapping):
        return not error.get("lost_peer")
    return record.get("exit_code") not in (None, int(ExitCode.RANK_FAILURE))


@dataclasses.dataclass(frozen=True)
class CrashSummary:
    """What rank 0's status.json says of an exception that ended the job."""

    message: str
    ranks: tuple[int, ...]  # the ranks blamed; empty when no record says which rank was lost
    advice: str | None = None  # what to change (out of memory), when a blamed rank's error says


def crash_summary(own_rank: int, own: Mapping[str, Any], peers: Mapping[int, Mapping[str, Any]]) -> CrashSummary:
    """status.json's words for an exception that ended ``own_rank``.

    ``own`` is :func:`error_record` of that exception; ``peers`` the other ranks'
    exit records found on disk. A rank's own error blames it. A lost peer blames
    the peers whose records give a cause, and none when no record says anything
    (a peer killed outright writes none).
    """
    if not own.get("lost_peer"):
        return CrashSummary(describe(own, where=f" on rank {own_rank}"), (own_rank,), own.get("advice"))
    symptom = f"{own.get('type')}: {own.get('message')}"
    causes = {r: rec for r, rec in sorted(peers.items()) if r != own_rank and is_cause(rec)}
    if not causes:
        return CrashSummary(f"lost a peer rank during a collective ({symptom})", ())
    said = "; ".join(
        f"rank {r} failed (exit {rec.get('exit_code')})"
        + (f": {describe(rec['error'])}" if isinstance(rec.get("error"), Mapping) else "")
        for r, rec in causes.items()
    )
    advice = next((str(rec["error"]["advice"]) for rec in causes.values()
                   if isinstance(rec.get("error"), Mapping) and rec["error"].get("advice")), None)
    return CrashSummary(f"{said}. Rank {own_rank} then lost it during a collective ({symptom})", tuple(causes), advice)
