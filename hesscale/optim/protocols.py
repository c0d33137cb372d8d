"""What a caller may read off an optimizer after ``step()``, without knowing its class.

``agents.second_order.CurvatureUpdate`` checks these instead of reaching into a wrapped optimizer:
:class:`~hesscale.optim.AdaHesScale`, :class:`~hesscale.optim.AdaHessian` and
:class:`~hesscale.optim.StepSizeScaling` count skipped steps (the wrapper's count includes its
wrapped optimizer's); only the wrapper reports step scales. All three offer the flat storage the
next backward may write gradients and ĥ into.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["CountsSkippedSteps", "ReportsStepScales", "StoresGradients"]


@runtime_checkable
class CountsSkippedSteps(Protocol):
    """``skipped_steps``: param-group steps skipped so far for a non-finite gradient or curvature."""

    skipped_steps: int


@runtime_checkable
class ReportsStepScales(Protocol):
    """``last_scales``: each param group's ``name`` (else its index) → its last step scale α."""

    last_scales: dict[str | int, float]


@runtime_checkable
class StoresGradients(Protocol):
    """``gradient_storage()``: parameter → ``(g, ĥ)`` tensors shaped like it that the next backward
    may write into (``hesscale.capture.backward(into=...)``; see ``_flat.GradientStorage``)."""

    def gradient_storage(self) -> Mapping[Tensor, tuple[Tensor, Tensor]]: ...
