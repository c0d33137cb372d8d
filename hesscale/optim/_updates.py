"""The updates ``u`` of the optimizers StepSizeScaling knows, computed without touching θ.

For these, StepSizeScaling's fused route (``_fused``) asks the rule of the wrapped optimizer for
its update (``θ_after = θ − u``, learning rate and weight decay included), scales it and applies
``θ ← θ − α·u`` itself. Each rule updates the optimizer's own state exactly as its ``step()``
does (same keys, same values up to floating-point rounding)::

    Adam, AdamW   g ← g + wd·θ (Adam) ;  m, v ← EMAs of g, g²  (amsgrad: v ← max(v_max, v))
                  u = lr·(m/bc1) / (sqrt(v/bc2) + eps)  (+ lr·wd·θ for AdamW's decoupled decay)
    RMSprop       g ← g + wd·θ ;  s ← α·s + (1−α)·g² ;  d = sqrt(s − ḡ²) + eps  (centered: ḡ = EMA g)
                  u = lr·g/d,  or with momentum μ:  b ← μ·b + g/d,  u = lr·b
    SGD           g ← g + wd·θ ;  b ← μ·b + (1−τ)·g  (b = g at the first step) ;  u = lr·b  (Nesterov: lr·(g + μ·b))
    AdaHesScale   m, v ← EMAs of g, ĥ² (or |ĥ|) ;  u = lr·(m/bc1)/((v/bc2)^½ + eps)  ("newton": ^1) + lr·wd·θ
    AdaHessian    m, v ← EMAs of g, D² ;  u = lr·(m/bc1)/((v/bc2)^(k/2) + eps) + lr·wd·θ

(``maximize`` negates g first.) The functions take lists of tensors — one flat tensor per list for
a small param group, one tensor per param otherwise — and return the update as ``(x, f)`` with
``u = f·x``: x is a scratch tensor, or the optimizer's own momentum buffer or g where u is a
multiple of it, so that no pass only copies or scales.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._common import bias_corrected_denominators, sqrt_into, update_moments
from .adahessian import AdaHessian
from .adahesscale import AdaHesScale, power_of

__all__ = ["RULES", "Rule", "Work"]


@dataclass
class Work:
    """What a rule reads and writes for one param group (lists of equally shaped tensors)."""

    theta: list[Tensor] | None  # θ (only when the group has weight decay)
    g: list[Tensor]
    h: list[Tensor]  # ĥ (unused by the first-order rules)
    state: dict[str, list[Tensor | None]]  # the optimizer's state tensors by key (None: not created yet)
    steps: list[float]  # the step count t of each tensor, already incremented
    scratch: list[Tensor]  # work tensors the rule may write (its update is usually returned in them)
    roots: list[Tensor] | None = None  # receives sqrt(v) when the scaler uses it as c


@dataclass(frozen=True)
class Rule:
    """How one optimizer class steps, for the fused route.

    ``keys``: the state tensors it creates as zeros at a param's first step; ``lazy``: those its
    first step creates from g (SGD's momentum buffer); ``step``: how it counts steps in
    ``state["step"]`` (``"tensor"``: torch's scalar tensor, ``"int"``, or None); ``why_not``: a
    group option the rule does not reproduce (the scaler then takes the snapshot route).
    """

    direction: Callable[[dict[str, Any], Work], tuple[list[Tensor], float]]
    keys: Callable[[dict[str, Any]], tuple[str, ...]]
    lazy: Callable[[dict[str, Any]], tuple[str, ...]] = lambda group: ()
    step: str | None = "tensor"
    why_not: Callable[[dict[str, Any]], str | None] = lambda group: None


# --------------------------------------------------------------------------- shared pieces
def _quotient(num: list[Tensor], denom: list[Tensor]) -> list[Tensor]:
    """``num / denom`` written into ``denom`` (one of the rule's scratch tensors)."""
    for n, d in zip(num, denom):
        torch.div(n, d, out=d)
    return denom


def _factored(group: dict[str, Any], work: Work, x: list[Tensor], scale: float | list[float],
              decoupled: bool) -> tuple[list[Tensor], float]:
    """``(x, f)`` with ``u = f·x = scale·x`` (+ ``lr·wd·θ``, decoupled weight decay ``θ ← θ − lr·wd·θ``)."""
    if isinstance(scale, list):  # step counts differ between the tensors: fold them in
        torch._foreach_mul_(x, scale)
        scale = 1.0
    wd = group["weight_decay"] if decoupled else 0.0
    if wd != 0 and scale != 0:
        torch._foreach_add_(x, work.theta, alpha=group["lr"] * wd / scale)
    return x, scale


def _gradient(group: dict[str, Any], work: Work, l2: bool = True) -> list[Tensor]:
    """g, negated for ``maximize`` and with torch's L2 weight decay ``g + wd·θ`` when ``l2``."""
    g = work.g
    if group.get("maximize", False):
        g = torch._foreach_neg(g)
    if l2 and group["weight_decay"] != 0:
        g = torch._foreach_add(g, work.theta, alpha=group["weight_decay"])
    return g


def _torch_why_not(group: dict[str, Any]) -> str | None:
    for flag in ("differentiable", "capturable", "fused"):
        if group.get(flag):
            return f"{flag}=True"
    if any(torch.is_tensor(x) for x in (group["lr"], *group.get("betas", ()))):
        return "a tensor hyperparameter"
    return None


# --------------------------------------------------------------------------- the rules
def _adam(group: dict[str, Any], work: Work) -> tuple[list[Tensor], float]:
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    decoupled = bool(group.get("decoupled_weight_decay", False))
    g = _gradient(group, work, l2=not decoupled)
    m, v = work.state["exp_avg"], work.state["exp_avg_sq"]
    update_moments(g, g, m, v, beta1, beta2)
    if group["amsgrad"]:
        torch._foreach_maximum_(work.state["max_exp_avg_sq"], v)
        v = work.state["max_exp_avg_sq"]
    denom, scale = bias_corrected_denominators(v, work.steps, lr, beta1, beta2, eps, out=work.scratch)
    return _factored(group, work, _quotient(m, denom), scale, decoupled)


def _rmsprop(group: dict[str, Any], work: Work) -> tuple[list[Tensor], float]:
    lr, alpha, eps, momentum = group["lr"], group["alpha"], group["eps"], group["momentum"]
    g = _gradient(group, work)
    square_avg = work.state["square_avg"]
    torch._foreach_mul_(square_avg, alpha)
    torch._foreach_addcmul_(square_avg, g, g, value=1 - alpha)
    avg = work.scratch
    if group["centered"]:
        grad_avg = work.state["grad_avg"]
        torch._foreach_lerp_(grad_avg, g, 1 - alpha)
        torch._foreach_copy_(avg, square_avg)
        torch._foreach_addcmul_(avg, grad_avg, grad_avg, value=-1)
        torch._foreach_sqrt_(avg)
    else:
        sqrt_into(avg, square_avg)
    torch._foreach_add_(avg, eps)
    if momentum > 0:
        buf = work.state["momentum_buffer"]
        torch._foreach_mul_(buf, momentum)
        torch._foreach_addcdiv_(buf, g, avg)
        return buf, lr
    return _quotient(g, avg), lr


def _sgd(group: dict[str, Any], work: Work) -> tuple[list[Tensor], float]:
    momentum, dampening = group["momentum"], group["dampening"]
    d = _gradient(group, work)
    if momentum != 0:
        bufs = work.state["momentum_buffer"]
        if any(b is None for b in bufs):  # the first step: b = g
            for i, b in enumerate(bufs):
                bufs[i] = d[i].clone() if b is None else b.mul_(momentum).add_(d[i], alpha=1 - dampening)
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, d, alpha=1 - dampening)
        d = torch._foreach_add(d, bufs, alpha=momentum) if group["nesterov"] else bufs
    return d, group["lr"]


def _curvature(second_moment: str, power: Callable[[dict[str, Any]], float]) -> Callable[..., Any]:
    """AdaHesScale's / AdaHessian's update: the moments of g and ĥ, then the bias-corrected step."""

    def direction(group: dict[str, Any], work: Work) -> tuple[list[Tensor], float]:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        m, v = work.state["exp_avg"], work.state[second_moment]
        update_moments(work.g, work.h, m, v, beta1, beta2, squared=group.get("variant", "adam") == "adam")
        denom, scale = bias_corrected_denominators(
            v, work.steps, lr, beta1, beta2, eps, power(group), work.roots, out=work.scratch
        )
        return _factored(group, work, _quotient(m, denom), scale, decoupled=True)

    return direction


_ADAM = Rule(
    _adam,
    keys=lambda group: ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()),
    why_not=_torch_why_not,
)

#: the optimizer classes (exactly these, not subclasses) whose update the fused route computes
RULES: dict[type, Rule] = {
    torch.optim.Adam: _ADAM,
    torch.optim.AdamW: _ADAM,
    torch.optim.RMSprop: Rule(
        _rmsprop,
        keys=lambda group: ("square_avg",)
        + (("momentum_buffer",) if group["momentum"] > 0 else ())
        + (("grad_avg",) if group["centered"] else ()),
        why_not=_torch_why_not,
    ),
    torch.optim.SGD: Rule(
        _sgd,
        keys=lambda group: (),
        lazy=lambda group: ("momentum_buffer",) if group["momentum"] != 0 else (),
        step=None,
        why_not=_torch_why_not,
    ),
    AdaHesScale: Rule(_curvature("exp_avg_sq", lambda group: power_of(group["variant"])), keys=lambda group: (
        "exp_avg", "exp_avg_sq"), step="int"),
    AdaHessian: Rule(_curvature("exp_hessian_diag_sq", lambda group: group["hessian_power"] / 2),
                     keys=lambda group: ("exp_avg", "exp_hessian_diag_sq"), step="int"),
}
