"""AdaHesScale: Adam with the squared gradient replaced by a Hessian-diagonal estimate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from . import _common
from ._base import CurvatureOptimizer, evaluate_closure, foreach_update
from ._common import (
    all_finite,
    bias_corrected_denominators,
    finite,
    read_hess_diag,
    update_moments,
)
from ._flat import FlatLayout, build_flat_layout, cached_chunks, gather_gh

__all__ = ["AdaHesScale"]

Variant = Literal["adam", "sqrt", "newton"]
VARIANTS: tuple[str, ...] = ("adam", "sqrt", "newton")


class AdaHesScale(CurvatureOptimizer):
    r"""AdaHesScale (Elsayed & Mahmood, arXiv 2210.11639): Adam-style steps scaled by curvature.

    Reads ``p.grad`` (g) and ``p.hess_diag`` (ĥ, e.g. from ``hesscale.hessian_diagonal``); which
    curvature (HesScale, GN, BL89, ...) is decided where ĥ is computed, not here. Per step t::

        θ ← θ − lr·wd·θ                                  (decoupled weight decay, first)
        m ← β1·m + (1−β1)·g
        v ← β2·v + (1−β2)·ĥ²        variant "adam"  (the paper's)
        v ← β2·v + (1−β2)·|ĥ|       variants "sqrt" and "newton"
        θ ← θ − lr·(m/bc1) / (sqrt(v/bc2) + eps)      "adam", "sqrt"
        θ ← θ − lr·(m/bc1) / (v/bc2 + eps)            "newton"

    with ``bc1 = 1−β1^t``, ``bc2 = 1−β2^t``. Param groups may set their own hyperparameters and a
    ``name`` (used in errors and by ``StepSizeScaling.last_scales``). A parameter without a
    gradient is skipped; one with a gradient but no ``hess_diag`` raises
    :class:`~hesscale.optim._common.MissingCurvatureError`. A group with a non-finite gradient or
    curvature is skipped and counted in ``skipped_steps``. ``zero_grad()`` clears ``hess_diag``.

    Args:
        params: parameters or param-group dicts (``named_parameters()`` works too).
        lr: learning rate (>= 0).
        betas: (β1, β2), each in [0, 1).
        eps: added to the denominator (> 0). The paper's RL runs used 1e-5.
        weight_decay: decoupled weight decay (>= 0).
        variant: "adam", "sqrt" or "newton" (see above).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        variant: Variant = "adam",
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, variant=variant)
        self._validate_group(defaults)
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if group["variant"] not in VARIANTS:
            raise ValueError(f"Invalid variant: {group['variant']!r} (must be one of {VARIANTS})")

    def _sqrt_ema_is_scale(self, group: dict[str, Any], beta: float) -> bool:
        return group["variant"] == "adam" and group["betas"][1] == beta

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every param group (see the class docstring for the equations)."""
        loss = evaluate_closure(closure)
        self._begin_step()
        for gi, group in enumerate(self.param_groups):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            hess: list[Tensor] = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaHesScale does not support sparse gradients")
                hess.append(read_hess_diag(p, "AdaHesScale", group, gi, pi))
                params.append(p)
                grads.append(p.grad)  # under no_grad: no detach (a view of our storage stays itself)
            if not params:
                continue
            flat = self._flat_state(gi, params)
            if flat is not None:
                self._step_flat(gi, group, params, grads, hess, flat)
            else:
                self._step_foreach(gi, group, params, grads, hess)
        self._storage.settle()
        return loss

    def _step_foreach(
        self, gi: int, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], hess: list[Tensor]
    ) -> None:
        """The general path: foreach launches over the group's tensors (grouped by device, dtype)."""
        if not all_finite(grads + hess):
            self._skip_group(gi)
            return
        exp_avgs, exp_avg_sqs, steps = self._state_lists(params)
        roots = self._root_scratch(params) if group["variant"] == "adam" else None
        foreach_update(params, grads, hess, exp_avgs, exp_avg_sqs, steps, group, power_of(group["variant"]),
                       squared=group["variant"] == "adam", roots=roots)
        if roots is not None:
            self._keep_roots(gi, roots)

    def _step_flat(
        self,
        gi: int,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        hess: list[Tensor],
        flat: FlatLayout,
    ) -> None:
        """The path of small groups: one flat copy of g and ĥ, a handful of launches in all."""
        (chunk,) = cached_chunks(self._chunks, gi, params)
        gh, g, h = gather_gh(chunk, grads, hess, self._storage)
        if not finite(gh.sum()):
            self._skip_group(gi)
            return
        for p in params:
            self.state[p]["step"] += 1
        keep = self.keep_curvature_scale and group["variant"] == "adam"
        root = chunk.buffer("c") if keep else None
        t = self.state[params[0]]["step"]
        scale = _flat_update(g, h, flat.flat["exp_avg"], flat.flat["exp_avg_sq"], t, group, root, chunk.buffer("u"))
        if group["weight_decay"] != 0.0:
            torch._foreach_mul_(params, 1.0 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, chunk.views_of("u"), alpha=-scale)
        if root is not None:
            self._keep_roots(gi, chunk.views_of("c"))

    def _flat_state(self, gi: int, params: list[Tensor]) -> FlatLayout | None:
        """Flat ``exp_avg``/``exp_avg_sq`` of a small, uniform group (per-param state = views), else None."""
        first = params[0]
        if sum(p.numel() for p in params) > _common.FLAT_LIMIT:
            return None
        if any(p.device != first.device or p.dtype != first.dtype for p in params):
            return None
        states = [self.state[p] for p in params]
        cached = self._flat_cache.get(gi)
        if cached is not None and cached.intact(params, states, "int"):
            return cached
        self._ensure_state(params)
        # None when the step counts differ (bias corrections per param): the general path handles it
        layout = build_flat_layout(params, states, ("exp_avg", "exp_avg_sq"), step="int")
        if layout is not None:
            self._flat_cache[gi] = layout
        return layout


def power_of(variant: str) -> float:
    """The exponent of ``v/bc2`` in the denominator: 1 for "newton", 1/2 otherwise."""
    return 1.0 if variant == "newton" else 0.5


def _flat_update(
    g: Tensor, h: Tensor, m: Tensor, v: Tensor, t: int, group: dict[str, Any], root: Tensor | None, out: Tensor
) -> float:
    """The same update on flat tensors: ``out = m/denom``; returns ``s`` (the step is ``s·out``, decay aside)."""
    lr, (beta1, beta2), eps, variant = group["lr"], group["betas"], group["eps"], group["variant"]
    update_moments([g], [h], [m], [v], beta1, beta2, squared=variant == "adam")
    roots = [root] if root is not None else None
    _, scale = bias_corrected_denominators([v], [t], lr, beta1, beta2, eps, power_of(variant), roots, out=[out])
    torch.div(m, out, out=out)
    return scale
