"""One optimizer step through DeepSpeed, and the one fused all-reduce behind it.

Every rank writes its numbers into its own slots of one float64 buffer and
the buffer is SUM-all-reduced once per step. Because no two ranks write the
same slot, the sum adds only zeros to each value: it is exact, it equals a
MAX, and it doubles as a gather, so every rank holds every rank's loss, token
count, fault flags, GPU utilisation and data verdict after a single collective
and a single host sync. Flags are never added together, so a count of faulty
ranks can never masquerade as a flag value.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import traceback

import torch

from albor.data.loader import TrainLoader
from albor.distributed.data_verdict import DataVerdict, describe_data_fault
from albor.distributed.engine import set_lr
from albor.distributed.optimizer_sha import optimizer_state_sha
from albor.distributed.process_group import STEP_TIMEOUT_S, DistEnv
from albor.errors import DataError
from albor.faults import FaultPlan
from albor.loop import StepResult
from albor.loss import chunked_token_loss, token_loss
from albor.stop_signal import StopSignals
from albor.telemetry import GpuUtilization

log = logging.getLogger("albor")

# Per-rank slots of the fused buffer. DATA_SHARD: the bad shard's position in index.json + 1 (0: none or unknown).
LOSS_SUM, TOKENS, FLAGS, GPU_UTIL, GRAD_NORM, DATA_SHARD = range(6)
SLOTS = 6
# Fault flags, most specific first: the ranks holding the first one present are "the ranks that saw it first".
LOCAL_ERROR, LOSS_NONFINITE, NORM_INVALID, STEP_SKIPPED = 8, 1, 2, 4
FLAG_PRIORITY = (LOCAL_ERROR, LOSS_NONFINITE, NORM_INVALID, STEP_SKIPPED)
# Not a fault: a stop signal reached this rank; every rank stops after this step (albor.stop_signal).
STOP_REQUESTED = 16
# Not a step fault either: this rank found the run's data bad (albor.distributed.data_verdict); every rank ends with 3.
DATA_BAD = 32


def batch_loss(engine, inputs: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """The model's mean token loss on one batch; training and validation both compute it here.

    ``chunk_tokens`` > 0 and fewer than the batch's tokens: the forward stops at the hidden
    states and the head runs inside the chunked loss, so the batch's full logits are never
    held (albor.loss). A batch that fits in one chunk takes the plain path: chunking it would
    save no memory and its backward would recompute the logits for nothing.
    """
    if chunk_tokens <= 0 or targets.numel() <= chunk_tokens:
        return token_loss(engine(inputs), targets)
    hidden = engine(inputs, hidden_only=True)  # through the engine: its forward hooks and dtype casts still apply
    # ZeRO-2 keeps every parameter whole on every rank, so the head weight can be read outside forward.
    # Its padded rows (vocab_multiple) are never predicted: the loss takes the real vocab_size.
    return chunked_token_loss(hidden, engine.module.lm_head.weight, targets, chunk_tokens,
                              vocab_size=engine.module.config.vocab_size)


def combine_rows(rows: list[list[float]], *, data_epoch: int, shard_names: tuple[str, ...] = ()) -> StepResult:
    """Every rank's slots, in rank order, into the step's one result (``shard_names``: index.json's, in order).

    Identical arithmetic, in rank order, on identical numbers: an identical verdict on every rank.
    """
    flags = [int(r[FLAGS]) for r in rows]
    flagged: tuple[int, ...] = ()
    for bit in FLAG_PRIORITY:
        flagged = tuple(r for r, f in enumerate(flags) if f & bit)
        if flagged:
            break
    error = None
    if any(f & LOCAL_ERROR for f in flags):
        # The same words on every rank; the failing rank logged its own traceback.
        error = f"exception on rank(s) {', '.join(map(str, flagged))}; see that rank's log for the traceback"
    total_tokens = sum(r[TOKENS] for r in rows)
    utils = [r[GPU_UTIL] for r in rows]
    return StepResult(
        train_loss=sum(r[LOSS_SUM] for r in rows) / max(total_tokens, 1.0),
        grad_norm=rows[0][GRAD_NORM],  # DeepSpeed's norm is already global: the same on every rank
        tokens=int(total_tokens),
        gpu_util_pct=sum(utils) / len(utils),
        step_applied=not any(f & STEP_SKIPPED for f in flags),
        rank_error=error,
        flagged_ranks=flagged,
        stop_requested_ranks=tuple(r for r, f in enumerate(flags) if f & STOP_REQUESTED),
        data_fault=describe_data_fault(
            {r: int(rows[r][DATA_SHARD]) for r, f in enumerate(flags) if f & DATA_BAD}, shard_names
        ),
        extra={"gpu_util_per_rank": utils, "data_epoch": data_epoch},
    )


class DeepSpeedStep:
    """The real step function: forward, backward, ``engine.step()``, one all-reduce."""

    def __init__(
        self,
        engine,
        loader: TrainLoader,
        env: DistEnv,
        *,
        grad_accumulation: int,
        gpu: GpuUtilization,
        faults: FaultPlan | None = None,
        stop: StopSignals | None = None,
        loss_chunk_tokens: int = 0,
        data_verdict: DataVerdict | None = None,
    ) -> None:
        self.engine = engine
        self.loss_chunk_tokens = loss_chunk_tokens
        self.loader = loader
        self.env = env
        self.grad_accumulation = grad_accumulation
        self.gpu = gpu
        self.faults = faults
        self.stop = stop
        self.data_verdict = data_verdict
        self._buffer = torch.zeros(env.world_size * SLOTS, dtype=torch.float64, device=env.device)
        self._host_row = torch.zeros(SLOTS, dtype=torch.float64)
        if env.device.type == "cuda":
            self._host_row = self._host_row.pin_memory()  # lets the copy into _buffer not block
        self._first_step_done = False

    def _micro_step(self, step: int, micro: int) -> tuple[torch.Tensor, int]:
        """Forward on one micro-batch: purely local work, no collective can be in flight."""
        if micro == 0 and self.faults is not None:
            self.faults.before_forward(self.env.rank, step)
        inputs, targets = self.loader.next_batch()
        inputs = inputs.to(self.env.device, non_blocking=True)
        targets = targets.to(self.env.device, non_blocking=True)
        loss = batch_loss(self.engine, inputs, targets, self.loss_chunk_tokens)
        if micro == 0 and self.faults is not None:
            if self.faults.poisons_loss(self.env.rank, step):
                loss = loss * float("nan")
            loss = self.faults.wrap_loss(self.env.rank, step, loss)  # a backward drill raises in engine.backward
        return loss, targets.numel()

    def _zero_loss(self) -> torch.Tensor:
        """A zero loss through the same graph as a real step, on a batch of zeros.

        A rank whose forward failed still runs this backward, so its ZeRO gradient
        hooks fire in the same order and fill the same buckets as its peers'; any
        other graph would reduce different buckets and hang the job. If this forward
        fails too, the exception ends the rank and its peers see it as a lost rank.
        """
        shape = (self.loader.micro_batch, self.loader.seq_length)
        zeros = torch.zeros(shape, dtype=torch.long, device=self.env.device)
        return batch_loss(self.engine, zeros, zeros, self.loss_chunk_tokens) * 0.0

    def __call__(self, step: int, lr: float) -> StepResult:
        set_lr(self.engine, lr)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        tokens = 0
        failed = bad_batch = False
        for micro in range(self.grad_accumulation):
            loss = None
            if not failed:
                try:
                    loss, n = self._micro_step(step, micro)
                    loss_sum += loss.detach().double() * n
                    tokens += n
                except DataError as e:  # a batch the model cannot embed: the data's fault, exit 3, not a crash
                    failed = bad_batch = True
                    log.error("rank %d: bad data at step %d: %s", self.env.rank, step, e)
                    if self.data_verdict is not None:
                        self.data_verdict.note(str(e))
                except Exception:  # caught outside any collective: reported through the flags
                    failed = True
                    log.error("rank %d: exception at step %d:\n%s", self.env.rank, step, traceback.format_exc())
            # Not guarded: an exception here (on a GPU, most likely out of memory) cannot join the
            # fused all-reduce, because the peers are already inside ZeRO's gradient collectives. It
            # ends this rank (train.train records the error in its exit record first), and the peers
            # end with 14 when their collective loses it (docs/exit-codes.md, "A rank that fails in its backward").
            self.engine.backward(loss if loss is not None else self._zero_loss())
            self.engine.step()

        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()  # a tensor, a float, or None before any step
        # Values the host knows go through one pinned staging row and a non-blocking copy;
        # values still on the device are written in place. Nothing here waits for the
        # device: the .tolist() after the all-reduce is the step's one host sync.
        host = self._host_row
        host[TOKENS] = tokens
        host[GPU_UTIL] = self.gpu.read()
        problem = self.data_verdict.local_problem() if self.data_verdict is not None else None  # never waits
        host[DATA_SHARD] = self.data_verdict.slot(problem) if problem is not None else 0
        host[FLAGS] = (
            (0 if applied else STEP_SKIPPED) + (LOCAL_ERROR if failed and not bad_batch else 0)
            + (STOP_REQUESTED if self.stop is not None and self.stop.requested else 0)
            + (DATA_BAD if bad_batch or problem is not None else 0)
        )
        host[GRAD_NORM] = math.nan if norm is None else 0.0 if torch.is_tensor(norm) else float(norm)
        buf = self._buffer.zero_()
        row = buf[self.env.rank * SLOTS : (self.env.rank + 1) * SLOTS]
        row.copy_(host, non_blocking=True)
        if torch.is_tensor(norm):
            row[GRAD_NORM] = norm
        row[LOSS_SUM] = loss_sum
        loss_bad = ~torch.isfinite(row[LOSS_SUM])
        norm_bad = ~torch.isfinite(row[GRAD_NORM]) | (row[GRAD_NORM] < 0)
        row[FLAGS] += loss_bad.double() * LOSS_NONFINITE + norm_bad.double() * NORM_INVALID
        self.env.all_reduce_sum_(buf)
        values = buf.tolist()  # the one host sync of the step
        rows = [values[r * SLOTS : (r + 1) * SLOTS] for r in range(self.env.world_size)]
        if not self._first_step_done:
            self._first_step_done = True
            self.env.set_timeout(STEP_TIMEOUT_S)
        shard_names = self.data_verdict.shard_names if self.data_verdict is not None else ()
        result = combine_rows(rows, data_epoch=self.loader.data_epoch, shard_names=shard_names)
        if result.data_fault is not None and self.data_verdict is not None:
            result = dataclasses.replace(result, data_fault=self.data_verdict.in_own_words(result.data_fault))
        return result

    def optimizer_state_sha(self) -> str:
        return optimizer_state_sha(self.engine, self.env)
