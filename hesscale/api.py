"""``hessian_diagonal``: one call from a model, a loss and a batch to ``param.hess_diag``."""
from __future__ import annotations

import weakref
from typing import Callable, Iterable

from torch import Tensor, nn

from .comparators import COMPARATORS, call_loss
from .output_hessians import closed_form_output_derivatives
from .rules.registry import registry_version
from .sweep import SWEEP_METHODS, capture

METHODS = SWEEP_METHODS + tuple(COMPARATORS)


def hessian_diagonal(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    inputs: Tensor,
    targets: Tensor | None = None,
    method: str = "hesscale",
    **method_kwargs,
) -> dict[str, Tensor]:
    """Approximate (or, for comparators, reference) Hessian diagonal of ``loss_fn(model(inputs), targets)``.

    Returns ``{name: diag}`` for every entry of ``model.named_parameters()`` that the loss reaches,
    stores it as ``param.hess_diag`` and accumulates ``param.grad`` as ``loss.backward()`` does.

    Methods: ``"hesscale"``, ``"hesscale_gn"`` (drops ``σ''·g``), ``"bl89"`` (for
    ``nn.CrossEntropyLoss`` the softmax is element-wise: ``D_z = onehot(y)·(p − p²)/N``; otherwise
    equal to HesScale); reference comparators ``"exact"`` and ``"ggn"`` (at most
    ``comparators.MAX_EXACT_PARAMS`` parameters unless ``max_params=`` is given), ``"ggn_mc"``
    (MSE / cross-entropy only) and ``"hutchinson"`` (both take ``samples=``, ``generator=``).
    Sweep methods accept ``per_sample=True`` and ``modules=``: submodules of ``model`` (objects or
    attribute paths such as ``"encoder.0"``) to capture instead of the whole model; only their
    parameters get ``hess_diag`` (the rest of the model counts as loss: its curvature reaches the
    captured modules exactly, by autograd, and nothing passes upstream of them), every parameter
    gets ``.grad``. Use it to leave out a module without a rule. ``fused=False`` takes the unfused
    route (see :class:`hesscale.capture`); ``into=optimizer.gradient_storage()`` writes gradients and
    ĥ straight into the optimizer's flat buffers (see :meth:`hesscale.capture.backward`).
    """
    if method in SWEEP_METHODS:
        return _sweep(model, loss_fn, inputs, targets, method, **method_kwargs)
    if method not in COMPARATORS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    diags = COMPARATORS[method](model, loss_fn, inputs, targets, **method_kwargs)
    call_loss(loss_fn, model(inputs), targets).backward()
    params = dict(model.named_parameters())
    for name, diag in diags.items():
        params[name].hess_diag = diag
    return diags


def _captured_subset(model: nn.Module, modules: Iterable[nn.Module | str]) -> dict[str, nn.Module]:
    """``{attribute path: submodule}`` for ``modules`` given as submodules or paths of ``model``."""
    paths = {id(m): name for name, m in model.named_modules()}
    named = {}
    for m in modules:
        if isinstance(m, str):
            named[m] = model.get_submodule(m)  # AttributeError naming the missing attribute
        elif id(m) in paths:
            named[paths[id(m)]] = m
        else:
            raise ValueError(f"modules: {type(m).__name__} object is not a submodule of the model")
    if not named:
        raise ValueError("modules: capture at least one submodule (None captures the whole model)")
    return named


#: model → (signature, {key: (capture, named captured params, external params)}): the captures
#: built for it (one per method and options), reused while the model's modules, parameters and the
#: rule registry are unchanged (a change drops them all)
_CAPTURES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _structure(model: nn.Module) -> tuple[int, ...]:
    """The ids of ``model``'s modules and parameters (changes when one is added, removed or
    replaced); a plain walk of ``_modules`` / ``_parameters``, several times cheaper than
    ``modules()`` + ``parameters()`` — it runs on every call."""
    ids, stack = [], [model]
    while stack:
        m = stack.pop()
        ids.append(id(m))
        ids.extend(map(id, m._parameters.values()))
        stack.extend(c for c in m._modules.values() if c is not None)
    return tuple(ids)


def _capture_for(model: nn.Module, modules, method: str, per_sample: bool, fused: bool):
    """``(capture, [(name, param)] captured, [param] outside)`` for ``model``, cached."""
    signature = (_structure(model), registry_version())
    key = (method, per_sample, fused, None if modules is None else tuple(m if isinstance(m, str) else id(m) for m in modules))
    cached = _CAPTURES.get(model)
    if cached is None or cached[0] != signature:
        cached = _CAPTURES[model] = (signature, {})
    found = cached[1].get(key)
    if found is not None:
        return found
    captured = model if modules is None else _captured_subset(model, modules)
    cap = capture(captured, method=method, per_sample=per_sample, fused=fused)
    roots = [model] if modules is None else list(captured.values())
    params = {id(p) for root in roots for p in root.parameters()}
    named = [(name, p) for name, p in model.named_parameters() if id(p) in params]
    outside = [p for p in model.parameters() if id(p) not in params]
    found = cached[1][key] = (cap, named, outside)
    return found


def _sweep(model, loss_fn, inputs, targets, method, per_sample: bool = False, modules=None, fused: bool = True,
           into=None):
    cap, named, outside = _capture_for(model, modules, method, per_sample, fused)
    with cap:
        output = model(inputs)
        closed = closed_form_output_derivatives(loss_fn, output, targets, elementwise_softmax=method == "bl89")
        if closed is not None and not cap.is_captured_output(output):
            closed = None
        # closed forms of the whole outside part: no autograd call and no loss graph, where nothing
        # else needs one (no parameter outside the capture or read directly)
        no_graph = closed is not None and fused and not outside and not any(p.requires_grad for p in cap.leaf_params)
        loss = None if no_graph else call_loss(loss_fn, output, targets)
    if method == "bl89" and isinstance(loss_fn, nn.CrossEntropyLoss) and closed is None:
        raise ValueError("bl89 supports nn.CrossEntropyLoss with class-index targets, 2-D logits, no weight and no label smoothing")
    for _, p in named:
        p.hess_diag = None  # a parameter the loss does not reach this time gets none
    given = None if closed is None else {output: closed[1]}
    if no_graph:
        cap.backward(None, output_hessians=given, output_grads={output: closed[0]}, into=into)
    else:
        cap.backward(loss, output_hessians=given, external_grads=outside, into=into)
    return {name: p.hess_diag for name, p in named if p.hess_diag is not None}
