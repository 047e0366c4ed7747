"""Per-epoch validation: every rank a slice of the same held-out batches, loss all-reduced."""

from __future__ import annotations

import torch

from albor.data.loader import ValidationLoader
from albor.distributed.process_group import DistEnv
from albor.distributed.step import batch_loss
from albor.faults import FaultPlan


class DeepSpeedValidation:
    """Mean cross-entropy over every validation token, identical on every rank."""

    def __init__(
        self, engine, loader: ValidationLoader, env: DistEnv, faults: FaultPlan | None = None, *,
        loss_chunk_tokens: int = 0,
    ) -> None:
        self.engine = engine
        self.loss_chunk_tokens = loss_chunk_tokens  # the training step's loss, so train and val losses compare
        self.loader = loader
        self.env = env
        self.faults = faults

    @torch.no_grad()
    def __call__(self, epoch: int) -> float:
        self.engine.eval()
        try:
            totals = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # (loss sum, tokens)
            for inputs, targets in self.loader:
                inputs = inputs.to(self.env.device, non_blocking=True)
                targets = targets.to(self.env.device, non_blocking=True)
                totals[0] += batch_loss(self.engine, inputs, targets, self.loss_chunk_tokens).double() * targets.numel()
                totals[1] += targets.numel()
            if self.faults is not None:  # the val-spike drill scales this rank's share before the reduce
                totals[0] *= self.faults.val_loss_factor(self.env.rank, epoch)
            loss_sum, tokens = self.env.all_reduce_sum_(totals).tolist()
            return loss_sum / tokens
        finally:
            self.engine.train()
