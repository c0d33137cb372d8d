"""Allowed value ranges, declared once and checked in one place (torch-free).

``Range(lo=0, lo_open=True)`` is ``v > 0``; ``integer=True`` admits ints only (never ``bool``).
The agents' optimizer dict (:mod:`agents.optimizers`) and the experiment's configuration checks
(:mod:`agents.experiment.validation`) both test against these objects and describe them with
:meth:`Range.expected`, so a bound and its message cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """A closed, half-open or open interval of finite numbers (or of integers)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False

    def __contains__(self, v: Any) -> bool:
        if isinstance(v, bool):
            return False
        if self.integer:
            if not isinstance(v, int):
                return False
        elif not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.lo is not None and not (v > self.lo if self.lo_open else v >= self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def expected(self) -> str:
        """``"an integer >= 1"``, ``"a finite number > 0 and < 1"``, ..."""
        fmt = str if self.integer else (lambda x: f"{x:g}")
        bounds = []
        if self.lo is not None:
            bounds.append(("> " if self.lo_open else ">= ") + fmt(self.lo))
        if self.hi is not None:
            bounds.append(("< " if self.hi_open else "<= ") + fmt(self.hi))
        kind = "an integer" if self.integer else "a finite number"
        return " ".join([kind, " and ".join(bounds)]) if bounds else kind


POSITIVE = Range(0.0, lo_open=True)
NON_NEGATIVE = Range(0.0)
UNIT = Range(0.0, 1.0)
UNIT_HALF_OPEN = Range(0.0, 1.0, hi_open=True)
