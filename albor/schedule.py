"""The contract's learning-rate schedule: linear warmup, then cosine decay."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr_max: float, lr_min: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for ``step`` (0-based).

    Linear from 0 to ``lr_max`` over ``warmup_steps``, cosine from ``lr_max``
    to ``lr_min`` between ``warmup_steps`` and ``total_steps``, ``lr_min`` after.
    """
    if step < warmup_steps:
        return lr_max * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0 or step >= total_steps:
        return lr_min
    progress = (step - warmup_steps) / decay_steps
    return lr_min + (lr_max - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
