"""Per-rank hardware telemetry: GPU utilisation from NVML, and peak FLOP/s for MFU.

NVML numbers GPUs physically and ignores ``CUDA_VISIBLE_DEVICES``, so a rank
finds its handle by the UUID of its torch device, never by ``local_rank``.
Without NVML or a GPU, utilisation is recorded as 0 and the run header says
it is unavailable: never a made-up number.
"""

from __future__ import annotations

import logging

log = logging.getLogger("albor")

# Dense bf16 peak FLOP/s by device-name fragment, for MFU (torchtitan keeps a
# similar table). Checked in order, so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("RTX 4090", 165e12),
    ("A10G", 70e12),
)


def peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when unknown (e.g. a CPU)."""
    if not device_name:
        return None
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment in device_name:
            return flops
    return None


class GpuUtilization:
    """Reads this rank's GPU utilisation (percent) through NVML."""

    def __init__(self, device_uuid: str | None) -> None:
        self.available = False
        self.reason = "no GPU"
        self._handle = None
        self._nvml = None
        if device_uuid is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = device_uuid if device_uuid.startswith(("GPU-", "MIG-")) else f"GPU-{device_uuid}"
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            self._nvml = pynvml
            self.available = True
            self.reason = ""
        except Exception as e:  # NVML missing, driver too old, MIG without util support…
            self.reason = f"NVML unavailable ({type(e).__name__}: {e})"

    def read(self) -> float:
        """Utilisation over NVML's last sample period, 0.0 when unavailable."""
        if not self.available:
            return 0.0
        try:
            return float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        except Exception as e:
            log.warning("NVML read failed, recording 0 from now on: %s", e)
            self.available = False
            self.reason = f"NVML read failed ({e})"
            return 0.0
