"""AdaHessian: the Hutchinson-curvature baseline (Yao et al., 2021) as the HesScale papers run it."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._base import CurvatureOptimizer, evaluate_closure, foreach_update
from ._common import (
    all_finite,
    param_label,
)

__all__ = ["AdaHessian"]


class AdaHessian(CurvatureOptimizer):
    r"""AdaHessian: Adam-style steps with a one-sample Hutchinson estimate of the Hessian diagonal.

    Needs gradients that carry their graph (``loss.backward(create_graph=True)``, or
    ``p.grad = torch.autograd.grad(loss, params, create_graph=True)``). Per step t, with one
    Rademacher vector z (entries ±1) per step over all parameters that have a gradient::

        D ← |z ⊙ Hz|                                     (Hz: one Hessian-vector product)
        θ ← θ − lr·wd·θ                                  (decoupled weight decay, first)
        m ← β1·m + (1−β1)·g
        v ← β2·v + (1−β2)·D²
        θ ← θ − lr·(m/bc1) / ((sqrt(v)/sqrt(bc2))^k + eps)

    with ``bc1 = 1−β1^t``, ``bc2 = 1−β2^t`` and ``k = hessian_power``. The estimate D is stored as
    ``p.hess_diag`` so that :class:`~hesscale.optim.StepSizeScaling` can wrap this optimizer.
    The gradients' graph is kept (optimizers of several networks may share one loss graph);
    ``zero_grad()`` releases it. Unlike the original AdaHessian, no spatial averaging over
    convolution kernels is done.

    Args:
        params: parameters or param-group dicts (optional ``name`` per group).
        lr: learning rate (>= 0).
        betas: (β1, β2), each in [0, 1).
        eps: added to the denominator (> 0).
        weight_decay: decoupled weight decay (>= 0).
        hessian_power: k in [0, 1].
        generator: a ``torch.Generator`` for z (reproducible runs); the global RNG if None.
    """

    second_moment_key = "exp_hessian_diag_sq"

    def __init__(
        self,
        params: Any,
        lr: float = 0.15,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        hessian_power: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, hessian_power=hessian_power)
        self._validate_group(defaults)
        self.generator = generator
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        k = group["hessian_power"]
        if not isinstance(k, numbers.Real) or isinstance(k, bool) or not 0.0 <= k <= 1.0:
            raise ValueError(f"Invalid hessian_power value: {k!r} (must be in [0, 1])")

    def _sqrt_ema_is_scale(self, group: dict[str, Any], beta: float) -> bool:
        return group["betas"][1] == beta

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["generator"] = self.generator
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("generator", None)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if generator_state is not None and self.generator is not None:
            self.generator.set_state(generator_state)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Estimate D by one Hessian-vector product, then update every param group."""
        loss = evaluate_closure(closure)
        self._begin_step()
        per_group = [self._params_with_grad(gi, group) for gi, group in enumerate(self.param_groups)]
        params = [p for ps in per_group for p in ps]
        if not params:
            return loss
        self._hutchinson(params)
        for gi, (group, ps) in enumerate(zip(self.param_groups, per_group)):
            if not ps:
                continue
            grads = [p.grad.detach() for p in ps]
            hess = [p.hess_diag for p in ps]
            if not all_finite(grads + hess):
                self._skip_group(gi)
                continue
            roots = self._root_scratch(ps)
            foreach_update(ps, grads, hess, *self._state_lists(ps), group, group["hessian_power"] / 2, roots=roots)
            if roots is not None:
                self._keep_roots(gi, roots)
        return loss

    def _params_with_grad(self, gi: int, group: dict[str, Any]) -> list[Tensor]:
        params = []
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.grad_fn is None:
                raise RuntimeError(
                    f"AdaHessian: the gradient of parameter '{param_label(group, gi, pi)}' carries no graph, "
                    "so no Hessian-vector product can be taken. Build gradients with "
                    "loss.backward(create_graph=True) (or torch.autograd.grad(loss, params, "
                    "create_graph=True)) before step()."
                )
            params.append(p)
        return params

    def _hutchinson(self, params: list[Tensor]) -> None:
        """Set ``p.hess_diag = |z ⊙ Hz|`` for one Rademacher z over all ``params``."""
        zs = [
            torch.randint(0, 2, p.shape, generator=self.generator, device=p.device).to(p.dtype).mul_(2).sub_(1)
            for p in params
        ]
        with torch.enable_grad():
            hzs = torch.autograd.grad(
                [p.grad for p in params], params, grad_outputs=zs, retain_graph=True, allow_unused=True
            )
        for p, z, hz in zip(params, zs, hzs):
            p.hess_diag = torch.zeros_like(p) if hz is None else (z * hz.detach()).abs_()
