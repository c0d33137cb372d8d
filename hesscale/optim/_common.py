"""Small helpers shared by the optimizers: validation, parameter labels, curvature access."""

from __future__ import annotations

import cmath
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FLAT_LIMIT",
    "MissingCurvatureError",
    "all_finite",
    "bias_corrected_denominators",
    "check_betas",
    "check_in_unit_interval",
    "check_nonnegative",
    "check_positive",
    "clear_hess_diag",
    "finite",
    "group_key",
    "negated",
    "param_label",
    "read_hess_diag",
    "scratch_buffers",
    "sqrt_into",
]

# Up to this many elements, element-wise work over a list of tensors is launch-bound on CPU and
# is done on flat copies / with foreach launches; above it, memory traffic dominates and the
# optimizers avoid extra copies instead. 2^18 holds SB3's 256×256 nets whole: a SAC actor (~72k
# entries), its twin critics and PPO's separate 256×256 actor and critic (~143k, the main job's
# group: its scaled AdaHesScale step 916 → 585 µs, Adam's 775 µs); a group of four 256×256 layers
# (263k) is still faster flat (650 against 741 µs), the 873k-entry MLP per tensor.
# (Tests lower it to run both code paths.)
FLAT_LIMIT = 262_144


class MissingCurvatureError(RuntimeError):
    """A parameter has a gradient but no ``hess_diag`` when the optimizer needs one."""


# --------------------------------------------------------------------------- validation
def check_nonnegative(name: str, value: Any) -> None:
    """``ValueError`` unless ``value`` is a finite number ``>= 0``."""
    if not _is_real(value) or not value >= 0.0 or math.isinf(value):
        raise ValueError(f"Invalid {name} value: {value!r} (must be >= 0)")


def check_positive(name: str, value: Any) -> None:
    """``ValueError`` unless ``value`` is a finite number ``> 0``."""
    if not _is_real(value) or not value > 0.0 or math.isinf(value):
        raise ValueError(f"Invalid {name} value: {value!r} (must be > 0)")


def check_in_unit_interval(name: str, value: Any) -> None:
    """``ValueError`` unless ``0 <= value < 1``."""
    if not _is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name} value: {value!r} (must be in [0, 1))")


def check_betas(betas: Any) -> None:
    """``ValueError`` unless ``betas`` is a pair with both entries in ``[0, 1)``."""
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    check_in_unit_interval("beta parameter at index 0", betas[0])
    check_in_unit_interval("beta parameter at index 1", betas[1])


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


# --------------------------------------------------------------------------- naming
def group_key(group: dict[str, Any], group_index: int) -> str | int:
    """The key of a param group in logs: its ``name`` if it has one, else its index."""
    return group.get("name", group_index)


def param_label(group: dict[str, Any], group_index: int, param_index: int) -> str:
    """A readable name for a parameter in error messages.

    Uses torch's ``param_names`` (optimizer built from ``named_parameters()``) when present,
    else ``<group name or 'group i'>[j]``.
    """
    names = group.get("param_names")
    if names is not None and param_index < len(names):
        return str(names[param_index])
    prefix = group.get("name", f"group {group_index}")
    return f"{prefix}[{param_index}]"


# --------------------------------------------------------------------------- curvature
def read_hess_diag(p: Tensor, who: str, group: dict[str, Any], group_index: int, param_index: int) -> Tensor:
    """``p.hess_diag`` detached and in ``p``'s dtype; a clear error naming ``p`` when it is missing."""
    h = getattr(p, "hess_diag", None)
    if h is None:
        label = param_label(group, group_index, param_index)
        raise MissingCurvatureError(
            f"{who}: parameter '{label}' (shape {tuple(p.shape)}) has a gradient but no `hess_diag`. "
            "Compute the curvature before step(), e.g. with "
            "hesscale.hessian_diagonal(model, loss_fn, inputs, targets), or leave this parameter "
            "out of the optimizer."
        )
    if h.shape != p.shape:
        label = param_label(group, group_index, param_index)
        raise MissingCurvatureError(
            f"{who}: parameter '{label}' has `hess_diag` of shape {tuple(h.shape)}, "
            f"expected {tuple(p.shape)}."
        )
    if h.requires_grad:
        h = h.detach()
    if h.dtype != p.dtype or h.device != p.device:
        h = h.to(dtype=p.dtype, device=p.device)
    return h


def clear_hess_diag(param_groups: Iterable[dict[str, Any]]) -> None:
    """Set every ``p.hess_diag`` (and the core's ``p.hess_diag_per_sample``) to None.

    Always dropped, whatever ``zero_grad``'s ``set_to_none`` says: a zero curvature is not a
    neutral value for these optimizers, and stale curvature must never be reused.
    """
    for group in param_groups:
        for p in group["params"]:
            for attr in _CURVATURE_ATTRS:
                if getattr(p, attr, None) is not None:
                    setattr(p, attr, None)


_CURVATURE_ATTRS = ("hess_diag", "hess_diag_per_sample")


def all_finite(tensors: list[Tensor]) -> bool:
    """True when no entry of any tensor is NaN or ±inf.

    Tests sums (NaN and ±inf propagate into them) with one sync: one concatenation for few
    elements (launch-bound), one sum per tensor otherwise. A finite tensor whose sum overflows
    (entries near the dtype's maximum) also counts as non-finite, which is the safe side.
    """
    if not tensors:
        return True
    if sum(t.numel() for t in tensors) <= FLAT_LIMIT:
        try:
            return finite(torch.cat([t.reshape(-1) for t in tensors]).sum())
        except RuntimeError:  # tensors on several devices
            pass
    sums = [t.sum() for t in tensors]
    device = sums[0].device
    if any(s.device != device for s in sums):
        return all(finite(s) for s in sums)
    return finite(torch.stack(sums).sum())


def finite(scalar: Tensor) -> bool:
    """Whether a one-element tensor (a sum: NaN and ±inf propagate into it) is finite: its value is
    read (one sync) and tested in Python, which costs ~0.4 µs where ``torch.isfinite`` costs ~7."""
    value = scalar.item()
    return cmath.isfinite(value) if isinstance(value, complex) else math.isfinite(value)


def scratch_buffers(store: dict[Tensor, Tensor], params: list[Tensor]) -> list[Tensor]:
    """One persistent work tensor per parameter (kept in ``store``, reallocated if ``p`` changed).

    Reusing them avoids allocating parameter-sized temporaries on every step, which on CPU costs
    page faults comparable to the arithmetic itself.
    """
    out = []
    for p in params:
        buf = store.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = store[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
        out.append(buf)
    return out


def sqrt_into(out: list[Tensor], src: list[Tensor]) -> list[Tensor]:
    """``out[i] = sqrt(src[i])`` without temporaries; returns ``out``.

    Few, large tensors: one ``sqrt(out=)`` each (one pass). Many small ones: two foreach launches.
    """
    if len(src) <= 4 or sum(t.numel() for t in src) > FLAT_LIMIT:
        for o, s in zip(out, src):
            torch.sqrt(s, out=o)
    else:
        torch._foreach_copy_(out, src)
        torch._foreach_sqrt_(out)
    return out


def update_moments(
    grads: list[Tensor], x: list[Tensor], exp_avgs: list[Tensor], second_moments: list[Tensor],
    beta1: float, beta2: float, squared: bool = True,
) -> None:
    """``m ← β1·m + (1−β1)·g``, ``v ← β2·v + (1−β2)·(x² or |x|)`` (foreach; x = g for Adam, ĥ here)."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(second_moments, beta2)
    if squared:
        torch._foreach_addcmul_(second_moments, x, x, value=1.0 - beta2)
    else:
        torch._foreach_add_(second_moments, torch._foreach_abs(x), alpha=1.0 - beta2)


def bias_corrected_denominators(
    v: list[Tensor], steps: list[int] | list[float], lr: float, beta1: float, beta2: float, eps: float,
    power: float = 0.5, roots: list[Tensor] | None = None, out: list[Tensor] | None = None,
) -> tuple[list[Tensor], float | list[float]]:
    r"""The Adam-family step ``u = lr·(m/bc1) / ((v/bc2)^power + eps)`` as ``u = s·m / denom``.

    The one place the bias corrections ``bc1 = 1−β1^t``, ``bc2 = 1−β2^t`` (t per tensor) enter:
    with ``k = bc2^power`` the same step is ``(lr·k/bc1)·m / (v^power + eps·k)``, one pass less.
    ``power`` 1/2: Adam and AdaHesScale "adam"/"sqrt"; 1: AdaHesScale "newton"; ``k/2``: AdaHessian
    with ``hessian_power`` k. Returns ``denom`` (written into ``out`` if given, else new tensors
    shaped like ``v``) and ``s`` (one float if every t is equal, else one per tensor). ``roots``,
    if given, receive ``sqrt(v)`` (``power`` ≠ 1 only).
    """
    same_t = all(t == steps[0] for t in steps)
    bc1 = [1.0 - beta1**t for t in steps]
    bc2 = [1.0 - beta2**t for t in steps]
    k = [math.sqrt(b) if power == 0.5 else b**power for b in bc2]
    eps_k = _one_or_all([eps * ki for ki in k], same_t)
    scale = _one_or_all([lr * ki / b for ki, b in zip(k, bc1)], same_t)
    if power == 1.0:
        base = v
    elif roots is not None:
        base = sqrt_into(roots, v)
    else:
        base = sqrt_into(out, v) if out is not None else torch._foreach_sqrt(v)
    if power not in (0.5, 1.0):
        base = torch._foreach_pow(base, 2.0 * power)
    if base is out or (out is None and base is not v and base is not roots):
        torch._foreach_add_(base, eps_k)  # a temporary (or ``out``) of ours: in place
        return base, scale
    if out is None:
        return torch._foreach_add(base, eps_k), scale
    for i, (o, b) in enumerate(zip(out, base)):
        torch.add(b, eps_k if same_t else eps_k[i], out=o)
    return out, scale


def _one_or_all(values: list[float], same: bool) -> float | list[float]:
    return values[0] if same else values


def negated(scale: float | list[float]) -> float | list[float]:
    """``-scale`` for one scalar or each of a list (foreach scalar arguments)."""
    return -scale if isinstance(scale, float) else [-s for s in scale]
