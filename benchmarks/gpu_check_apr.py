"""The GPU check's .apr row: a finished run's epoch .apr against DeepSpeed's ``zero_to_fp32`` of the same checkpoint.

The .apr must hold the fp32 master weights bit for bit: on a GPU the module
trains in bf16, and an .apr widened from it would differ from the masters in
almost every element. tests/test_dist_checkpoint.py makes the same comparison on
an engine it builds itself; this one reads a real ``albor pretrain`` run.

The model may pad its embedding and head rows (``--vocab-multiple``); DeepSpeed's
files hold the padded rows, the .apr only the vocabulary's: such a tensor is
compared on the .apr's rows, and the padding reported.

    python benchmarks/gpu_check_apr.py RUN_DIR     # one JSON line on stdout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def compare(run_dir: Path) -> dict[str, Any]:
    """The newest epoch .apr of ``run_dir`` against ``zero_to_fp32`` of its DeepSpeed tag."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from albor.apr import read_apr

    aprs = sorted((run_dir / "ckpt").glob("epoch-*.apr"))
    if not aprs:
        return {"error": f"no epoch .apr in {run_dir / 'ckpt'}"}
    apr_path = aprs[-1]
    header, apr = read_apr(apr_path)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "ckpt" / "deepspeed"), tag=apr_path.stem)
    vocab = header["vocab_size"]
    different, missing, padded = [], [], {}
    for name, tensor in apr.items():
        other = consolidated.get(name)
        if other is None:
            missing.append(name)
            continue
        if other.shape != tensor.shape and tensor.shape[0] == vocab and other.shape[0] > vocab \
                and other.shape[1:] == tensor.shape[1:]:
            padded[name] = [int(tensor.shape[0]), int(other.shape[0])]
            other = other[:vocab]
        if other.shape != tensor.shape or not torch.equal(other, tensor):
            different.append(name)
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    return {
        "apr": apr_path.name,
        "tensors": len(apr),
        "elements": sum(t.numel() for t in apr.values()),
        "different": different,
        "missing": missing,
        "padded": padded,
        "apr_dtypes": sorted({str(t.dtype) for t in apr.values()}),
        "bf16": bool(ds_config.get("bf16", {}).get("enabled", False)),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python benchmarks/gpu_check_apr.py RUN_DIR", file=sys.stderr)
        return 2
    result = compare(Path(argv[0]))
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
