"""The base class of the curvature optimizers: what AdaHesScale and AdaHessian share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _common
from ._common import (
    bias_corrected_denominators,
    check_betas,
    check_nonnegative,
    check_positive,
    clear_hess_diag,
    negated,
    scratch_buffers,
    update_moments,
)
from ._flat import Chunk, FlatLayout, GradientStorage

__all__ = ["CurvatureOptimizer", "evaluate_closure", "foreach_update"]


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """torch's ``step(closure)`` contract: the closure's loss, evaluated with gradients on (None without one)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class CurvatureOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that also reads ``param.hess_diag``.

    Adds to torch's behaviour:

    * ``zero_grad()`` clears ``hess_diag`` as well as ``grad``;
    * a group whose gradient or curvature holds a NaN/inf is skipped (state untouched) and counted
      in ``skipped_steps``; the indices of the groups skipped by the last ``step()`` are in
      ``last_skipped_groups``;
    * hyperparameters are validated for every param group, including ones added later;
    * ``state_dict()`` also carries ``skipped_steps``.
    """

    skipped_steps: int
    last_skipped_groups: set[int]
    keep_curvature_scale: bool
    #: state key of the second moment ``v`` (AdaHessian keeps its historical name)
    second_moment_key: str = "exp_avg_sq"

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self.skipped_steps = 0
        self.last_skipped_groups = set()
        self.keep_curvature_scale = False
        self._roots: dict[int, list[Tensor]] = {}
        self._root_buffers: dict[Tensor, Tensor] = {}
        self._flat_cache: dict[int, FlatLayout] = {}
        self._chunks: dict[Any, tuple[tuple[int, ...], list[Chunk]]] = {}  # flat work buffers per group (or batch)
        self._storage = GradientStorage()
        super().__init__(params, defaults)

    # -- hooks for subclasses ----------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for an invalid hyperparameter of ``group`` (subclasses add theirs)."""
        check_nonnegative("learning rate", group["lr"])
        check_betas(group["betas"])
        check_positive("epsilon", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])

    def _sqrt_ema_is_scale(self, group: dict[str, Any], beta: float) -> bool:
        """True when this optimizer's ``sqrt(v)`` for ``group`` is ``sqrt(EMA_beta(ĥ²))``."""
        return False

    def curvature_scale(self, group_index: int, params: list[Tensor], beta: float) -> list[Tensor] | None:
        """``c = sqrt(EMA_beta(ĥ²))`` (no bias correction) of ``params`` from the last step, if known.

        ``StepSizeScaling`` sets ``keep_curvature_scale`` and calls this right after ``step()``,
        so that it need neither keep a second copy of an average this optimizer already has nor
        take its square root again. None when unknown (the wrapper then keeps its own average).
        """
        group = self.param_groups[group_index]
        roots = self._roots.get(group_index)
        if roots is None or not self._sqrt_ema_is_scale(group, beta) or len(roots) != len(params):
            return None
        return roots

    def _root_scratch(self, params: list[Tensor]) -> list[Tensor] | None:
        """Work tensors to receive ``sqrt(v)`` when a wrapper wants it, else None."""
        if not self.keep_curvature_scale:
            return None
        return scratch_buffers(self._root_buffers, params)

    def _keep_roots(self, group_index: int, roots: list[Tensor]) -> None:
        self._roots[group_index] = roots

    def _ensure_state(self, params: list[Tensor]) -> None:
        """Create the state of params that have none: step 0, zero ``m`` and ``v``."""
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state[self.second_moment_key] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _state_lists(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """``m``, ``v`` and the incremented step count of each param (created on first use)."""
        exp_avgs, second_moments, steps = [], [], []
        self._ensure_state(params)
        for p in params:
            state = self.state[p]
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
            second_moments.append(state[self.second_moment_key])
            steps.append(state["step"])
        return exp_avgs, second_moments, steps

    def gradient_storage(self) -> dict[Tensor, tuple[Tensor, Tensor]]:
        """Parameter → ``(g, ĥ)`` views of the flat buffers the last step gathered into: where the
        next backward may write them (``hesscale.capture.backward(into=...)``; see
        :class:`~hesscale.optim._flat.GradientStorage`). Empty before the first step."""
        return self._storage.views

    # -- torch.optim.Optimizer overrides ------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset ``grad`` (as torch does) and ``hess_diag`` of every parameter."""
        super().zero_grad(set_to_none)
        clear_hess_diag(self.param_groups)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        skipped = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)
        self.skipped_steps = skipped
        self._flat_cache = {}  # flat buffers are rebuilt from the loaded per-param state
        self._storage = GradientStorage()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(skipped_steps=self.skipped_steps, keep_curvature_scale=self.keep_curvature_scale)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("skipped_steps", 0)
        self.__dict__.setdefault("last_skipped_groups", set())
        self.__dict__.setdefault("keep_curvature_scale", False)
        self.__dict__.setdefault("_roots", {})
        self.__dict__.setdefault("_root_buffers", {})
        self.__dict__.setdefault("_flat_cache", {})
        self.__dict__.setdefault("_chunks", {})
        self.__dict__.setdefault("_storage", GradientStorage())

    def _begin_step(self) -> None:
        self.last_skipped_groups = set()
        self._roots = {}

    def _skip_group(self, group_index: int) -> None:
        self.skipped_steps += 1
        self.last_skipped_groups.add(group_index)


def foreach_update(
    params: list[Tensor], grads: list[Tensor], hess: list[Tensor], exp_avgs: list[Tensor],
    second_moments: list[Tensor], steps: list[int], group: dict[str, Any], power: float, squared: bool = True,
    roots: list[Tensor] | None = None,
) -> None:
    """The foreach step of AdaHesScale and AdaHessian on one param group (per device and dtype)::

        θ ← θ·(1 − lr·wd),  m ← EMA_β1(g),  v ← EMA_β2(ĥ², or |ĥ| unless squared),
        θ ← θ − lr·(m/bc1) / ((v/bc2)^power + eps)

    writing ``sqrt(v)`` into ``roots`` if given. The tensors go in batches of at most
    ``FLAT_LIMIT`` elements (or one tensor), so the denominators (and ``|ĥ|``) a batch allocates
    stay that small: the peak is the largest batch's, not the group's size again.
    """
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    grouped = torch.optim.Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, hess, exp_avgs, second_moments], with_indices=True
    )
    for tensors, indices in grouped.values():
        for batch in element_batches([tensors[0][k].numel() for k in range(len(indices))]):
            p, g, h, m, v = ([ts[k] for k in batch] for ts in tensors)
            if weight_decay != 0.0:
                torch._foreach_mul_(p, 1.0 - lr * weight_decay)
            update_moments(g, h, m, v, beta1, beta2, squared=squared)
            rs = [roots[indices[k]] for k in batch] if roots is not None else None
            denom, scale = bias_corrected_denominators(
                v, [steps[indices[k]] for k in batch], lr, beta1, beta2, eps, power, rs
            )
            torch._foreach_addcdiv_(p, m, denom, negated(scale))


def element_batches(sizes: list[int], limit: int | None = None) -> list[list[int]]:
    """Consecutive positions of ``sizes`` in batches of at most ``limit`` (default ``FLAT_LIMIT``)
    elements in all; a larger tensor is a batch of its own."""
    limit = _common.FLAT_LIMIT if limit is None else limit
    batches: list[list[int]] = []
    total = 0
    for k, n in enumerate(sizes):
        if not batches or total + n > limit:
            batches.append([])
            total = 0
        batches[-1].append(k)
        total += n
    return batches
