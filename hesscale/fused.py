"""The fused reverse pass: gradient and curvature of the captured calls in one walk.

Given, per recorded call ``i``, the outside part of ``g_i = ∂L/∂y_i`` and of ``D_i`` (from autograd
through the loss graph, or the caller's closed forms), the calls are walked in reverse. A rule
with ``fused = True`` turns ``(g_out, D_out)`` into its parameters' gradients and curvature and
the ``(g_in, D_in)`` of its input (per Linear ``gᵀx``, ``Dᵀ(x∘x)``, ``g·W``, ``D·(W∘W)``); any
other rule gets its gradients from one autograd vector-Jacobian product through that module only
(its forward graph is kept) and its curvature from :meth:`Rule.param_diag` / :meth:`Rule.input_diag`.
``(g_in, D_in)`` goes to the call that produced the input, directly or through a chain of known
tensor operations (:mod:`hesscale.between`); contributions of several consumers add up.
"""
from __future__ import annotations

from typing import Callable, Mapping, MutableSequence, Sequence

import torch
from torch import Tensor, nn

from .rules.base import Streams

#: route names, as :attr:`hesscale.capture.routes` reports them per module path
FUSED, AUTOGRAD, UNFUSED = "fused", "autograd", "unfused"


def _vjp_backward(call, g_out, d_out, gauss_newton, per_sample, need_input):
    """``(grads, hess, g_in, d_in)`` of a rule without a fused form: autograd for the gradient."""
    module, rule = call.module, call.rule
    named = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    wrt = [p for _, p in named]
    take_input = need_input and call.x.requires_grad
    if take_input:
        wrt.append(call.x)
    with torch.enable_grad():
        found = torch.autograd.grad(call.y, wrt, g_out, retain_graph=True, allow_unused=True) if wrt else ()
    grads = {n: g for (n, _), g in zip(named, found) if g is not None}
    hess = rule.param_diag(module, call.x, call.y, d_out, per_sample)
    if not need_input:
        return grads, hess, None, None
    g_in = found[-1] if take_input and found[-1] is not None else torch.zeros_like(call.x)
    d_in = rule.input_diag(module, call.x, call.y, d_out, None if gauss_newton else g_out, gauss_newton)
    return grads, hess, g_in, d_in


def fused_sweep(
    calls: MutableSequence, g_acc: list, d_acc: list, gauss_newton: bool, per_sample: bool, routes: dict,
    into: Mapping[Tensor, tuple[Tensor, Tensor]] | None = None,
) -> tuple[dict[nn.Parameter, Tensor], dict[nn.Parameter, Tensor]]:
    """Walk ``calls`` backwards from the outside parts ``g_acc[i]``, ``d_acc[i]`` (``None``: none).

    Returns ``({param: ∂L/∂θ}, {param: ĥ})`` (``ĥ`` per sample when ``per_sample``); records each
    call's route in ``routes`` (path → ``"fused"`` / ``"autograd"``). Consumes ``calls``, ``g_acc``
    and ``d_acc``: each call's entries are released once used, as autograd frees its buffers.
    ``into``: storage the fused rules may write a parameter's results into (see
    :func:`destinations`; not with ``per_sample``).
    """
    grads: dict[nn.Parameter, Tensor] = {}
    hess: dict[nn.Parameter, Tensor] = {}

    # whether each entry is the engine's own (a fused rule's fresh result, or a sum): only then
    # may the consuming rule overwrite it; the outside parts are the caller's or autograd's
    g_own, d_own = [False] * len(calls), [False] * len(calls)

    def add(index: int, g: Tensor, d: Tensor, fresh: bool = False) -> None:
        if g_acc[index] is None:
            g_acc[index], g_own[index] = g, fresh
        else:
            g_acc[index], g_own[index] = g_acc[index] + g, True
        if d_acc[index] is None:
            d_acc[index], d_own[index] = d, fresh
        else:
            d_acc[index], d_own[index] = d_acc[index] + d, True

    with torch.no_grad():
        for i in reversed(range(len(calls))):
            g_out, d_out = g_acc[i], d_acc[i]
            g_acc[i] = d_acc[i] = None  # handed to the rule, which frees them once used
            if g_out is None and d_out is None:
                continue
            call = calls[i]
            mine = (g_own[i] or g_out is None) and (d_own[i] or d_out is None)
            if g_out is None:  # the other has the output's shape (the call may keep no output)
                g_out = torch.zeros_like(d_out)
            if d_out is None:
                d_out = torch.zeros_like(g_out)
            streams = Streams.of(g_out, d_out, owned=mine)
            del g_out, d_out
            need_input = call.producer is not None or call.chain is not None
            if call.rule.fused:
                routes[call.path] = FUSED
                if into is not None:
                    streams.into = destinations(call.module, into, grads, hess)
                out = call.rule.fused_backward_from(call.module, call.x, call.y, streams, gauss_newton, per_sample, need_input)
            else:
                routes[call.path] = AUTOGRAD
                out = _vjp_backward(call, *streams, gauss_newton, per_sample, need_input)
            del streams
            p_grads, p_hess, g_in, d_in = out
            del out
            calls[i] = None  # its recorded tensors are freed once used, as autograd frees saved ones
            owned = call.module._parameters
            for name, g in p_grads.items():
                p = owned[name]
                grads[p] = g if p not in grads else grads[p] + g
            for name, h in p_hess.items():
                p = owned[name]
                hess[p] = h if p not in hess else hess[p] + h
            if call.producer is not None:
                add(call.producer, g_in, d_in, call.rule.fused and call.rule.fresh_outputs)
            elif call.chain is not None:
                call.chain.scatter(g_in, d_in, add)
            del g_in, d_in  # the producer's entries hold them now (none holds what no call reads)
    return grads, hess


def destinations(module: nn.Module, into: Mapping[Tensor, tuple[Tensor, Tensor]], grads: Mapping,
                 hess: Mapping) -> dict[str, tuple[Tensor | None, Tensor]] | None:
    """Where ``module``'s rule may write its parameters' ``(gradient, ĥ)`` (by attribute name): the
    storage ``into`` gives for a parameter (its shape, dtype, device) that no earlier call wrote (a
    shared parameter's later contributions add up in fresh tensors); the gradient only while the
    parameter has no ``.grad`` (``backward`` accumulates into an existing one)."""
    out = {}
    for name, p in module._parameters.items():
        dest = into.get(p) if p is not None else None
        if dest is None or p in grads or p in hess:
            continue
        g_dest, h_dest = dest
        if not all(t.shape == p.shape and t.dtype == p.dtype and t.device == p.device for t in dest):
            continue
        out[name] = (g_dest if p.grad is None else None, h_dest)
    return out or None


def given_output_hessians(index_of: Callable[[Tensor], int | None], given: Mapping[Tensor, Tensor]) -> dict[int, Tensor]:
    """The caller's closed-form output Hessians as ``{call index: D}``, each key and shape checked."""
    d_acc = {}
    for output, diag in given.items():
        index = index_of(output)
        if index is None:
            raise ValueError("output_hessians keys must be outputs of captured modules")
        if diag.shape != output.shape:
            raise ValueError(f"output Hessian of shape {tuple(diag.shape)} for an output of shape {tuple(output.shape)}")
        d_acc[index] = diag.detach()
    return d_acc


def given_outside_gradients(
    calls: Sequence, index_of: Callable[[Tensor], int | None], owned: set[int],
    output_grads: Mapping[Tensor, Tensor], d_given: Mapping[int, Tensor],
) -> tuple[list, list[tuple[Tensor, Tensor]]]:
    """The caller's closed-form outside gradients as ``(g_acc, [(outside param, grad)])``: ``g_acc[i]``
    for call ``i`` whose output (as the forward code received it) has an entry, None otherwise.

    Every entry is checked before anything is used: an output needs its Hessian in ``d_given``
    (index → D) and its own shape; a captured module's parameter is refused (the sweep makes it).
    """
    g_acc: list = [None] * len(calls)
    external = []
    for key, g in output_grads.items():
        index = index_of(key)
        if index is None:
            if id(key) in owned:
                raise ValueError("output_grads: a captured module's parameter gets its gradient from the sweep")
            external.append((key, g.detach()))
        elif index not in d_given:
            raise ValueError(f"output_grads: the output of {calls[index].path!r} needs its Hessian in output_hessians")
        elif g.shape != key.shape:
            raise ValueError(f"output gradient of shape {tuple(g.shape)} for an output of shape {tuple(key.shape)}")
        else:
            g_acc[index] = g.detach()
    return g_acc, external


def accumulate_grad(p: Tensor, g: Tensor) -> None:
    """``p.grad += g`` as ``loss.backward()`` accumulates it."""
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)
