"""Optimizers that use the curvature stored in ``param.hess_diag``.

* :class:`AdaHesScale` — Adam-style steps with ``v = EMA(ĥ²)`` (or the "sqrt"/"newton" variants).
* :class:`StepSizeScaling` — wraps any torch optimizer and shrinks each group's step so that
  ``½α²·Σ c·u² ≤ δ`` with ``c = sqrt(EMA(ĥ²))``.
* :class:`AdaHessian` — the Hutchinson baseline; computes its own ``hess_diag``.
* :class:`CountsSkippedSteps`, :class:`ReportsStepScales`, :class:`StoresGradients` — what a
  caller reads off an optimizer.
"""

from ._common import MissingCurvatureError
from .adahessian import AdaHessian
from .adahesscale import AdaHesScale
from .protocols import CountsSkippedSteps, ReportsStepScales, StoresGradients
from .scaling import StepSizeScaling

__all__ = ["AdaHesScale", "AdaHessian", "CountsSkippedSteps", "MissingCurvatureError", "ReportsStepScales",
           "StepSizeScaling", "StoresGradients"]
