"""Status lines of runs and sweeps on the console."""

from __future__ import annotations

import sys
from typing import IO


def say(line: str, stream: IO[str] | None = None) -> None:
    """Write ``line`` and its newline in one call, then flush (default stream: stdout).

    Parallel sweep workers share one pipe, and with ``PYTHONUNBUFFERED`` set ``print`` writes the
    text and the newline in two calls, so two workers' lines could merge into one.
    """
    stream = sys.stdout if stream is None else stream
    stream.write(line + "\n")
    stream.flush()
