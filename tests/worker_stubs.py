"""Stand-ins for ``albor.data.unit_worker._run_unit`` that run in real prepare-data worker processes.

A worker imports this module by name to unpickle the function (tests/ is on
the path of the process that starts the forkserver). What a stand-in does is
read from its unit's file name, and it leaves ``pid-N`` (N: the worker's pid)
in the file's directory, so that a test can find its workers and watch them go.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from albor.errors import DataError

SLEEP_S = 30  # far longer than any test waits: a worker still running it was never stopped


def pids(directory: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("pid-")) for p in Path(directory).glob("pid-*"))


def run_unit(unit_id: int, unit: Any) -> dict[str, Any]:
    """``sleep*``: a unit that never gets to a batch (a huge file whose records the filters drop);
    ``fail*``: a bad record, once another worker is busy too; anything else: done at once."""
    directory = Path(unit.path).parent
    (directory / f"pid-{os.getpid()}").touch()
    name = Path(unit.path).name
    if name.startswith("sleep"):
        time.sleep(SLEEP_S)
    elif name.startswith("fail"):
        deadline = time.monotonic() + 10
        while len(pids(directory)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        raise DataError(f"{unit.path}:1: not a JSON object; fix or remove the line")
    return {"unit": unit_id}
