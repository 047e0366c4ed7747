"""Deterministic kernels for a run (gate 006: same seed, same loss and grad norm at every step).

A fixed seed alone is not enough on a GPU: cuBLAS split-K reductions, atomic-add
backward kernels and cuDNN's attention backward can sum in a different order on
every run. ``apply_determinism(True, ...)`` forbids those paths; off, nothing is
forced and torch picks its fastest kernels.
"""

from __future__ import annotations

import os
from typing import Any

import torch

#: cuBLAS reads this when it creates its handle (the first matmul): a fixed
#: workspace layout makes its reductions run in one order. ':4096:8' is the
#: larger of the two settings NVIDIA documents; it costs ~24 MiB per stream.
CUBLAS_WORKSPACE = ":4096:8"


def apply_determinism(on: bool, device_type: str) -> dict[str, Any]:
    """Force (``on``) or release deterministic algorithms; returns what it set, for the run's records.

    Call it before the model is built and before the first matmul on the device.
    """
    torch.use_deterministic_algorithms(on, warn_only=False)
    if not on:
        return {"deterministic": False}
    # setdefault: a user's own setting (':16:8' saves memory) is kept; either value is deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    # Only conv layers reach cuDNN here, but its autotuner would pick kernels per run.
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    done: dict[str, Any] = {
        "deterministic": True,
        "cublas_workspace_config": os.environ["CUBLAS_WORKSPACE_CONFIG"],
    }
    if device_type == "cuda":
        # SDPA backward under strict determinism (torch 2.13): flash and math are
        # deterministic, mem-efficient runs its single-split (deterministic) backward,
        # cuDNN attention's backward is not, so it is switched off rather than left to
        # raise mid-run. Flash serves bf16; mem-efficient or math serves fp32.
        torch.backends.cuda.enable_cudnn_sdp(False)
        done["sdpa_backends"] = ["flash", "mem_efficient", "math"]
    return done
