"""StepSizeScaling's fused route: the wrapped optimizer's update, its scale and the step in one pass.

For an optimizer with a rule in :data:`~hesscale.optim._updates.RULES`, each param group (one
device and dtype) takes, without a snapshot of θ::

    1. g and ĥ (a small group: one flat copy of both, checked for NaN/inf by one sum)
    2. the optimizer's state (a small group: flat tensors, the per-param state being views of them)
    3. u from the rule (state updated as the optimizer's own step does), and
       c = the optimizer's sqrt(v) when that is sqrt(EMA_beta(ĥ²)), else sqrt of the wrapper's EMA
    4. T = Σ c·u², α = min(max_scale, sqrt(2δ/T)), θ ← θ − α·u (u = f·x as the rule returns it)

Small groups with equal options (e.g. an actor-critic's ``pi``, ``log_std`` and ``vf``) take steps
1–3 as one flat chunk and step 4 per group: the same numbers, a third of the launches. A group
whose gradient or curvature is non-finite is skipped before anything is touched; its batch's step
counts then differ for good, and its groups step on their own from then on.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import CurvatureOptimizer
from . import _common
from ._common import all_finite, finite, group_key, read_hess_diag
from ._flat import Chunk, FlatLayout, build_flat_layout, flatten_into, gather_gh, param_views
from ._updates import RULES, Rule, Work
from .adahessian import AdaHessian

#: the StepSizeScaling whose step this is (typed loosely: scaling imports this module)
Scaler = Any

__all__ = ["fused_rule", "fused_step"]


def fused_rule(scaler: Scaler, plans: list[tuple[list[int], list[Tensor]] | None]) -> Rule | None:
    """The rule of the wrapped optimizer when every group with gradients can take the fused route."""
    rule = RULES.get(type(scaler.optimizer))
    if rule is None:
        return None
    for gi, (group, plan) in enumerate(zip(scaler.param_groups, plans)):
        if plan is None:
            continue
        params = plan[1]
        if rule.why_not(group) is not None or len(scaler._chunks_for(gi, params)) != 1:
            return None
        if any(p.grad.is_sparse or p.is_complex() for p in params):
            return None
    return rule


def fused_step(scaler: Scaler, rule: Rule, plans: list[tuple[list[int], list[Tensor]] | None]) -> None:
    """One step of every group by the fused route (see the module docstring)."""
    inner = scaler.optimizer
    groups = scaler.param_groups
    if isinstance(inner, CurvatureOptimizer):
        inner._begin_step()
    if isinstance(inner, AdaHessian):  # AdaHessian draws ĥ itself, over all groups at once
        per_group = [inner._params_with_grad(gi, g) if plan else [] for gi, (g, plan) in enumerate(zip(groups, plans))]
        if any(per_group):
            inner._hutchinson([p for ps in per_group for p in ps])
    hess = [
        None if plan is None else [read_hess_diag(p, "StepSizeScaling", group, gi, pi) for pi, p in zip(*plan)]
        for gi, (group, plan) in enumerate(zip(groups, plans))
    ]  # every curvature read (and a missing one reported) before anything steps
    for batch in _batches(scaler, plans):
        if tuple(batch) in scaler._split:  # its state cannot be one flat layout: no gather into the batch
            _step_each(scaler, rule, batch, plans, hess)
        else:
            _step_batch(scaler, rule, batch, plans, hess)


def _batches(scaler: Scaler, plans: list[tuple[list[int], list[Tensor]] | None]) -> list[list[int]]:
    """The groups that step as one flat chunk: small groups with equal options (all but ``params``
    and ``name``) on one device and dtype, up to ``FLAT_LIMIT`` entries together; any other group
    alone. Each keeps its own α (the sums ``T`` are taken per group)."""
    batches: list[list[int]] = []
    entries: list[int] = []  # of each batch
    open_batches: dict[Any, int] = {}  # options → the index of the batch that takes such groups
    for gi, plan in enumerate(plans):
        if plan is None:
            continue
        (chunk,) = scaler._chunks_for(gi, plan[1])
        options = _options(scaler.param_groups[gi], chunk) if chunk.small else None
        b = open_batches.get(options) if options is not None else None
        if b is not None and entries[b] + chunk.numel <= _common.FLAT_LIMIT:
            batches[b].append(gi)
            entries[b] += chunk.numel
            continue
        if options is not None:
            open_batches[options] = len(batches)
        batches.append([gi])
        entries.append(chunk.numel)
    return batches


def _options(group: dict[str, Any], chunk: Chunk) -> tuple | None:
    """A group's options with its chunk's device and dtype, hashable; None when one is a tensor."""
    items = tuple(sorted((k, v) for k, v in group.items() if k not in ("params", "name")))
    if any(torch.is_tensor(v) or (isinstance(v, tuple) and any(map(torch.is_tensor, v))) for _, v in items):
        return None
    first = chunk.params[0]
    try:
        hash(items)
    except TypeError:
        return None
    return items + ((".device", first.device), (".dtype", first.dtype))


def _step_batch(scaler: Scaler, rule: Rule, gis: list[int], plans: list[tuple[list[int], list[Tensor]] | None],
                hess: list[list[Tensor] | None]) -> None:
    """Steps 1–4 of the module docstring for the groups ``gis`` (one chunk; several only when small)."""
    inner = scaler.optimizer
    curvature = isinstance(inner, CurvatureOptimizer)
    slot = gis[0] if len(gis) == 1 else tuple(gis)  # where its chunk and flat state are kept
    params = [p for gi in gis for p in plans[gi][1]]
    hs = [h for gi in gis for h in hess[gi]]
    (chunk,) = scaler._chunks_for(slot, params)
    grads = [p.grad for p in params]  # read under no_grad (step's decorator): no detach needed
    g = h = None
    if chunk.small:
        gh, g, h = gather_gh(chunk, grads, hs, scaler._storage)
        ok = finite(gh.sum())
    else:
        ok = all_finite(grads + hs)
    if not ok:
        if len(gis) > 1:  # find the groups at fault: each steps (or is skipped) on its own
            _step_each(scaler, rule, gis, plans, hess)
            return
        scaler.skipped_steps += 1
        if curvature:
            inner._skip_group(gis[0])
        return
    group = scaler.param_groups[gis[0]]  # the options every group of the batch shares
    states, layout = _flat_layout(scaler, rule, group, slot, chunk)
    if layout is None and len(gis) > 1:  # no flat state for the batch: its step counts differ, and
        scaler._split.add(slot)  # will (a group was skipped): from now on its groups step on their own
        _step_each(scaler, rule, gis, plans, hess)
        return
    state, steps, adopt = _state(rule, group, chunk.params, states, layout)
    flat = layout is not None
    gs, hs = ([g], [h]) if flat else (grads, hs)
    theta = None
    if group["weight_decay"] != 0:
        theta = [flatten_into(chunk, "theta", params)] if flat else params
    scratch = [chunk.buffer("u")] if flat else chunk.views_of("u")
    own_c = curvature and inner._sqrt_ema_is_scale(group, scaler.beta)
    # c: flat, a temporary of this step (no copy of it kept between steps); per tensor, kept
    # buffers (temporaries for all params at once would raise the step's own peak above the backward's)
    roots = ([torch.empty_like(scratch[0])] if flat else chunk.views_of("c")) if own_c else None
    x, f = rule.direction(group, Work(theta, gs, hs, state, steps, scratch, roots))  # u = f·x
    adopt()
    if not own_c:
        scaler._update_ema(chunk, hs, h)
    counts = tuple(len(plans[gi][1]) for gi in gis)  # params per group, in chunk order
    if flat:  # c is scratch: c·x in place, then T per group over its span
        c = roots[0] if own_c else torch.sqrt(scaler._ema(chunk))
        cx, x0 = c.mul_(x[0]), x[0]
        dots = [torch.dot(cx[a:b], x0[a:b]) for a, b in chunk.spans(counts)]
        totals = [dots[0].item()] if len(dots) == 1 else torch.stack(dots).tolist()
        views = _param_views(chunk, layout, x0, g)
    else:  # one group (batches are flat): per-param tensors; c of the EMA one param at a time
        cs = roots if own_c else map(torch.sqrt, chunk.views_of("ema"))
        dots = [torch.dot(ci.mul_(xi).view(-1), xi.reshape(-1)) for ci, xi in zip(cs, x)]
        totals = [dots[0].item() if len(dots) == 1 else torch.stack(dots).sum().item()]
        views = x
    first = 0
    for gi, count, total in zip(gis, counts, totals):
        alpha = scaler._alpha(f * f * total)
        torch._foreach_add_(params[first:first + count], views[first:first + count], alpha=-alpha * f)
        scaler.last_scales[group_key(scaler.param_groups[gi], gi)] = alpha
        first += count


def _step_each(scaler: Scaler, rule: Rule, gis: list[int], plans: list[tuple[list[int], list[Tensor]] | None],
               hess: list[list[Tensor] | None]) -> None:
    """The groups of a batch that cannot step as one, each on its own."""
    for gi in gis:
        _step_batch(scaler, rule, [gi], plans, hess)


def _flat_layout(scaler: Scaler, rule: Rule, group: dict[str, Any], slot: int | tuple[int, ...],
                 chunk: Chunk) -> tuple[list[dict[str, Any]], FlatLayout | None]:
    """The optimizer's per-param states of ``chunk.params`` (a first step's created as the optimizer
    would) and the flat layout of the group (or batch of groups) ``slot``: kept while intact, else
    built anew; None for a large chunk or a state that cannot be flat (step counts differ)."""
    params = chunk.params
    keys, lazy = rule.keys(group), rule.lazy(group)
    states = [scaler.optimizer.state[p] for p in params]
    for p, st in zip(params, states):
        if not st:  # a first step: the state torch's (or our) optimizer would create
            if rule.step == "tensor":
                st["step"] = torch.tensor(0.0, dtype=_step_dtype())
            elif rule.step == "int":
                st["step"] = 0
            for key in keys:
                st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if not chunk.small:
        return states, None
    layout = scaler._layouts.get(slot)
    if layout is None or not layout.intact(params, states, rule.step):
        layout = build_flat_layout(params, states, keys, lazy, rule.step)
        if layout is not None:
            scaler._layouts[slot] = layout
    return states, layout


def _state(rule: Rule, group: dict[str, Any], params: list[Tensor], states: list[dict[str, Any]],
           layout: FlatLayout | None):
    """The optimizer's state as the rule's lists (one flat tensor each with a ``layout``, else one
    tensor per param), the incremented step counts, and a function that stores tensors the rule
    created (lazy keys) back into the optimizer's state."""
    keys, lazy = rule.keys(group), rule.lazy(group)
    if layout is None:  # large (or irregular) group: the per-param state tensors themselves
        state = {key: [st.get(key) for st in states] for key in keys + lazy}
        steps = _increment(rule, states)

        def adopt() -> None:
            for key in lazy:
                for st, t in zip(states, state[key]):
                    st[key] = t

        return state, steps, adopt

    state = {key: [layout.flat[key]] for key in keys + lazy}
    if layout.steps is not None:
        layout.steps.add_(1)
        steps = [layout.steps[0].item()]
    else:
        steps = _increment(rule, states)[:1]

    def adopt_flat() -> None:
        for key in lazy:
            if layout.flat[key] is None:  # created by this first step: the state now views it
                layout.adopt(key, state[key][0], params, states)

    return state, steps, adopt_flat


def _param_views(chunk: Chunk, layout: FlatLayout, x: Tensor, g: Tensor) -> list[Tensor]:
    """Per-param views of the flat update ``x``: the ones kept for it when it is a known buffer."""
    if x is chunk.buffer("u"):
        return chunk.views_of("u")
    if x is g:
        return chunk.views_of("g")
    for key, t in layout.flat.items():
        if x is t:
            return layout.views[key]
    return param_views(chunk.params, x)


def _increment(rule: Rule, states: list[dict[str, Any]]) -> list[float]:
    """Add one to each param's step count; the new counts (1 per param for an optimizer without one)."""
    if rule.step == "tensor":
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        return [s.item() for s in steps]
    if rule.step == "int":
        for st in states:
            st["step"] += 1
        return [st["step"] for st in states]
    return [1.0] * len(states)


def _step_dtype() -> torch.dtype:
    """The dtype of torch's ``state["step"]`` tensors (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
