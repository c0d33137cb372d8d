"""Divergence handling: a run whose loss, parameters, curvature or actions become NaN/Inf stops cleanly.

The agents never let such a run crash the caller. ``learn()`` returns normally, the model carries
``model.divergence = {"step": <env steps>, "reason": <text>}`` (``None`` while healthy), the event is
logged (``train/diverged`` and ``train/diverged_step`` in the SB3 logger, and a warning through
Python's ``logging`` under the ``agents`` logger), and later ``learn()`` calls return at once.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch as th

from hesscale.optim._common import all_finite

log = logging.getLogger("agents")


class Diverged(RuntimeError):
    """Raised inside an update when a non-finite value is found; caught by the agents' ``train()``."""


def is_divergence_error(exc: BaseException, params: Iterable[th.Tensor] = ()) -> bool:
    """Whether ``exc`` is the symptom of a diverged run rather than a programming error.

    torch's distributions raise ``ValueError("Expected parameter loc ... but found invalid values")``
    when their parameters are NaN; any ``ValueError`` raised while the parameters are non-finite also
    counts.
    """
    if isinstance(exc, Diverged):
        return True
    if not isinstance(exc, ValueError):
        return False
    if "found invalid values" in str(exc):
        return True
    return not all_finite(list(params))

