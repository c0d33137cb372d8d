"""The report's statistics: IQM and 95% stratified-bootstrap intervals (rliable)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def iqm(x: np.ndarray, axis: int | None = 0) -> np.ndarray:
    """Interquartile mean: the mean of the middle 50% (25% trimmed from each end)."""
    from scipy.stats import trim_mean

    return trim_mean(x, 0.25, axis=axis)


def interval(scores: np.ndarray | tuple[np.ndarray, ...], func: Callable, reps: int, seed: int):
    """Point estimate and 95% stratified-bootstrap CI (rliable) of ``func`` over runs (axis 0).

    ``scores`` is one array ``(runs, ...)`` or a tuple of arrays ``(runs_k, tasks)`` for
    independent arms (``func(*scores)``, each arm resampled on its own, e.g. the probability of
    improvement). The CI is NaN when no arm has two runs or ``reps <= 0``.
    """
    from rliable import library as rly

    arms = scores if isinstance(scores, tuple) else (scores,)
    point = func(*arms)
    if max(a.shape[0] for a in arms) < 2 or reps <= 0:
        nan = np.full_like(np.asarray(point, dtype=float), np.nan)
        return point, np.stack([nan, nan])
    import warnings

    with warnings.catch_warnings():  # arch warns about rliable's RandomState argument
        warnings.simplefilter("ignore", FutureWarning)
        pts, cis = rly.get_interval_estimates({"x": scores}, func, reps=reps,
                                              random_state=np.random.RandomState(seed))
    return pts["x"], cis["x"]
