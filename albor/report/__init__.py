"""``albor report``: a run directory's figure and summary (no torch, so it starts in a second).

:mod:`run_reader` reads the run's files, :mod:`summary` computes the numbers,
:mod:`figure` draws them, :mod:`command` is the command line.
"""

from albor.report.command import main

__all__ = ["main"]
