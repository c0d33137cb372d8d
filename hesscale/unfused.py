"""The unfused route (``capture(..., fused=False)``): autograd's backward, then a separate sweep.

1. one ordinary backward gives ``.grad`` and, by tensor hooks, ``g = ∂L/∂y`` at the outputs of
   non-linear element-wise modules (for the ``σ''·g`` term) and which captured outputs the *rest*
   of the computation reads (distributions, clamps, other networks, the loss);
2. the loss Hessian diagonal w.r.t. each of those outputs, exactly and per sample, by autograd
   through that small outside graph only (or a closed form the caller passes); leaf parameters
   get their exact diagonal the same way;
3. the recorded calls are walked in reverse; each module's rule turns ``d_out`` into its
   parameters' curvature and the ``d_in`` it passes to the call that produced its input.

The reference the fused route is tested against. Tensor operations between captured modules
are not recorded here: such a consumer reads the operation's result, which counts as loss.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .output_hessians import exact_param_diag, exact_per_sample_diag


def backward_with_grad_hooks(
    calls: Sequence, loss: Tensor, params: list, external_grads, open_calls: list[int], gauss_newton: bool, retain: bool
) -> list[int]:
    """Step 1: the ordinary backward, catching ``∂L/∂y`` where a rule needs it.

    Returns the open calls whose output the loss reads from outside the captured modules
    (their aliases receive a gradient); the graph is kept (``retain``) for their exact Hessians.
    """
    used: list[int] = []
    handles = []
    if not gauss_newton:
        for call in calls:
            if call.rule.needs_grad_output:
                handles.append(call.y.register_hook(_grad_catcher(call)))
    for i in open_calls:
        handles.append(calls[i].alias.register_hook(lambda g, i=i: used.append(i)))
    try:
        if external_grads is True:
            loss.backward(retain_graph=retain)
        else:
            params = [p for p in params + list(external_grads or ()) if p.requires_grad]
            if params:
                torch.autograd.backward(loss, inputs=params, retain_graph=retain)
    finally:
        for handle in handles:
            handle.remove()
    return sorted(set(used))


def _grad_catcher(call):
    def hook(grad):
        call.g_out = grad if call.g_out is None else call.g_out + grad

    return hook


def exact_boundary_hessians(
    calls: Sequence, loss: Tensor, leaf_params: list, d_acc: dict[int, Tensor], used: list[int]
) -> dict[nn.Parameter, Tensor]:
    """Step 2: exact per-sample output diagonals (into ``d_acc``) and leaf-parameter diagonals."""
    leaf = [p for p in leaf_params if p.requires_grad]
    inputs = [calls[i].alias for i in used] + leaf
    if not inputs:
        return {}
    grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    for i, grad in zip(used, grads):
        if grad is not None:
            d_acc[i] = exact_per_sample_diag(grad, calls[i].alias).detach()
    return {p: exact_param_diag(grad, p).detach() for p, grad in zip(leaf, grads[len(used):]) if grad is not None}


def reverse_sweep(calls: Sequence, d_acc: dict[int, Tensor], gauss_newton: bool, per_sample: bool) -> dict[nn.Parameter, Tensor]:
    """Step 3: walk the calls backwards, applying each module's rule."""
    hess: dict[nn.Parameter, Tensor] = {}
    with torch.no_grad():
        for i in reversed(range(len(calls))):
            d_out = d_acc.pop(i, None)
            if d_out is None:
                continue
            call = calls[i]
            for name, h in call.rule.param_diag(call.module, call.x, call.y, d_out, per_sample).items():
                p = getattr(call.module, name)
                hess[p] = h if p not in hess else hess[p] + h
            if call.producer is not None:
                g_out = call.g_out
                if g_out is None and call.rule.needs_grad_output and not gauss_newton:
                    g_out = torch.zeros_like(call.y)  # no gradient reached this output
                d_in = call.rule.input_diag(call.module, call.x, call.y, d_out, g_out, gauss_newton)
                prev = d_acc.get(call.producer)
                d_acc[call.producer] = d_in if prev is None else prev + d_in
    return hess
