"""Step-size scaling: a curvature trust region on the update of any torch optimizer."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._base import CurvatureOptimizer, evaluate_closure
from ._common import (
    all_finite,
    check_in_unit_interval,
    check_positive,
    clear_hess_diag,
    group_key,
    read_hess_diag,
)
from ._flat import Chunk, FlatLayout, GradientStorage, cached_chunks, flatten_into, gather_gh
from ._fused import fused_rule, fused_step

__all__ = ["StepSizeScaling"]


class StepSizeScaling(torch.optim.Optimizer):
    r"""Shrink each step of any optimizer to a trust region of a diagonal quadratic model.

    Elsayed, Farrahi, Dangel & Mahmood (ICML 2024, arXiv 2406.03276), §6 of the method notes.
    On ``step()`` the wrapped optimizer computes its update ``u`` (learning rate included,
    ``θ_after = θ_before − u``); then, per param group::

        c ← sqrt(EMA_beta(ĥ²))          (ĥ = p.hess_diag, no bias correction)
        T = Σ c·u²
        α = min(max_scale, sqrt(2·delta / T))      (α = max_scale when T = 0)
        θ ← θ_before − α·u

    α is the largest step along ``u`` whose model change ``½·α²·Σ c·u²`` stays within ``delta``;
    with ``max_scale = 1`` it only ever shrinks a step. "Scaled Adam" is
    ``StepSizeScaling(torch.optim.Adam(...))``; "Scaled AdaHesScale" is
    ``StepSizeScaling(AdaHesScale(...))`` (its own ``v`` is this EMA when ``beta`` equals its β2,
    and is then reused rather than kept twice). Works with Adam, RMSprop, SGD, AdaHesScale,
    AdaHessian (which produces ``hess_diag`` itself during its step).

    It is a ``torch.optim.Optimizer`` that shares the wrapped optimizer's ``param_groups`` (so
    SB3's ``update_learning_rate`` and torch's LR schedulers reach it), and ``zero_grad()`` (which
    also clears ``hess_diag``), ``state_dict()``/``load_state_dict()`` (wrapped state + the EMA)
    and ``step(closure)`` behave as torch's. ``last_scales`` maps each group's ``name`` (else its
    index) to its last α; ``skipped_steps`` counts groups skipped because a gradient or curvature
    was non-finite (the wrapped optimizer's state is then left untouched).

    Two routes give the same step up to rounding; ``last_route`` names the one the last step took.
    *fused* (Adam, AdamW, RMSprop, SGD, AdaHesScale, AdaHessian, one device and dtype per group,
    no ``differentiable``/``capturable``/``fused`` torch option): the update ``u`` is computed from
    the optimizer's own state by the rule in ``_updates`` and applied once as ``θ ← θ − α·u``
    (the wrapped optimizer's ``step()`` is not called, nor hooks registered on it: register
    them on this wrapper).
    *snapshot* (any other optimizer, or ``fused=False``): θ is copied, the wrapped optimizer steps,
    and ``u = θ_before − θ_after`` is rescaled. On the fused route, small groups with equal options
    step as one flat batch (α still per group); :meth:`gradient_storage` tells a backward where to
    write the next gradients and ĥ so that the step copies nothing in.

    Args:
        optimizer: the optimizer to wrap.
        delta: the allowed model decrease δ (> 0).
        max_scale: the largest α (> 0); 1 means the scaling only ever shrinks a step.
        beta: the EMA factor of ĥ², in [0, 1).
        fused: take the fused route where the update is known (False: always the snapshot route).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        delta: float = 1e-8,
        max_scale: float = 1.0,
        beta: float = 0.999,
        fused: bool = True,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"StepSizeScaling wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, StepSizeScaling):
            raise TypeError("StepSizeScaling cannot wrap another StepSizeScaling")
        check_positive("delta", delta)
        check_positive("max_scale", max_scale)
        check_in_unit_interval("beta", beta)
        # torch's own initialisation (hooks, state, step patching) on copies of the wrapped groups;
        # then the wrapped optimizer's list of groups and defaults are shared, not copied.
        super().__init__([dict(g) for g in optimizer.param_groups], optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.optimizer = optimizer
        if isinstance(optimizer, CurvatureOptimizer):
            optimizer.keep_curvature_scale = True  # lets us reuse its sqrt(v) when it is our c
        self.delta = float(delta)
        self.max_scale = float(max_scale)
        self.beta = float(beta)
        self.last_scales: dict[str | int, float] = {}
        self.skipped_steps = 0
        self.fused = bool(fused)
        self.last_route = ""
        self._chunks: dict[Any, tuple[tuple[int, ...], list[Chunk]]] = {}  # flat work buffers per group (or batch)
        self._layouts: dict[Any, FlatLayout] = {}  # the fused route's flat state of small groups (or batches)
        self._split: set[tuple[int, ...]] = set()  # batches whose step counts came to differ: groups step alone
        self._storage = GradientStorage()

    # -- sharing the wrapped optimizer's groups -----------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the group to the wrapped optimizer (whose list of groups this one shares)."""
        if "optimizer" not in self.__dict__:  # inside Optimizer.__init__: torch's own bookkeeping
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"StepSizeScaling(delta={self.delta}, max_scale={self.max_scale}, beta={self.beta}, fused={self.fused},\n"
            f"  {self.optimizer!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fused", True)
        self.__dict__.setdefault("last_route", "")
        self.__dict__.setdefault("_layouts", {})
        self.__dict__.setdefault("_split", set())
        self.__dict__.setdefault("_storage", GradientStorage())

    # -- the torch optimizer interface ----------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """``zero_grad`` of the wrapped optimizer, and ``hess_diag`` cleared too (by the wrapped
        optimizer itself when it is a curvature optimizer)."""
        self.optimizer.zero_grad(set_to_none)
        if not isinstance(self.optimizer, CurvatureOptimizer):
            clear_hess_diag(self.param_groups)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The wrapped optimizer's update of each group, rescaled by its α (fused or snapshot route)."""
        loss = evaluate_closure(closure)
        plans: list[tuple[list[int], list[Tensor]] | None] = []
        for group in self.param_groups:
            indices = [pi for pi, p in enumerate(group["params"]) if p.grad is not None]
            plans.append((indices, [group["params"][pi] for pi in indices]) if indices else None)
        rule = fused_rule(self, plans) if self.fused else None
        self.last_route = "fused" if rule is not None else "snapshot"
        if rule is not None:
            fused_step(self, rule, plans)
        else:
            self._snapshot_step(plans)
        self._storage.settle()
        return loss

    def gradient_storage(self) -> dict[Tensor, tuple[Tensor, Tensor]]:
        """Parameter → ``(g, ĥ)`` views of the flat buffers the last step gathered into (this
        wrapper's, else its wrapped curvature optimizer's): where the next backward may write them
        (``hesscale.capture.backward(into=...)``; see :class:`~hesscale.optim._flat.GradientStorage`)."""
        if self._storage.views or not isinstance(self.optimizer, CurvatureOptimizer):
            return self._storage.views
        return self.optimizer.gradient_storage()

    def _snapshot_step(self, plans: list[tuple[list[int], list[Tensor]] | None]) -> None:
        """The route for any optimizer: snapshot θ, let it step, recover ``u = θ_before − θ_after``."""
        inner = self.optimizer
        checks_itself = isinstance(inner, CurvatureOptimizer)
        groups = self.param_groups

        # 1. Per group: the stepping params and θ_before. For a plain torch optimizer, also read
        #    the curvature, check finiteness and update the EMA now; a non-finite group gets its
        #    grads hidden so that the wrapped optimizer skips it and leaves its state untouched.
        chunked: list[tuple[list[int], list[Tensor], list[Chunk]] | None] = []
        skipped: set[int] = set()
        hidden: list[tuple[Tensor, Tensor]] = []
        for gi, (group, plan) in enumerate(zip(groups, plans)):
            if plan is None:
                chunked.append(None)
                continue
            indices, params = plan
            chunks = self._chunks_for(gi, params)
            if not checks_itself:
                hess = [read_hess_diag(p, "StepSizeScaling", group, gi, pi) for pi, p in zip(indices, params)]
                per_chunk = [[hess[i] for i in ch.positions] for ch in chunks]
                flat_h, sums = [], []
                for ch, h in zip(chunks, per_chunk):
                    if ch.small:
                        gh, _, h_flat = gather_gh(ch, [p.grad for p in ch.params], h, self._storage)
                        sums.append(gh.sum())
                        flat_h.append(h_flat)
                    else:
                        sums += [t.sum() for t in [p.grad for p in ch.params] + h]
                        flat_h.append(None)
                if not all_finite(sums):  # NaN/±inf propagate into the sums
                    skipped.add(gi)
                    hidden.extend((p, p.grad) for p in params)
                    chunked.append(None)
                    continue
                for ch, h, h_flat in zip(chunks, per_chunk, flat_h):
                    self._update_ema(ch, h, h_flat)
            for ch in chunks:
                flatten_into(ch, "theta", ch.params)
            chunked.append((indices, params, chunks))

        # 2. The wrapped optimizer's own step.
        for p, _ in hidden:
            p.grad = None
        try:
            inner.step()
        finally:
            for p, g in hidden:
                p.grad = g
        if checks_itself:
            skipped = set(inner.last_skipped_groups)
        self.skipped_steps += len(skipped)

        # 3. Per group: u = θ_before − θ_after, c, T = Σ c·u², α, θ = θ_before − α·u.
        for gi, (group, plan) in enumerate(zip(groups, chunked)):
            if plan is None or gi in skipped:
                continue
            indices, params, chunks = plan
            roots = inner.curvature_scale(gi, params, self.beta) if checks_itself else None
            hess = None
            if checks_itself and roots is None:  # e.g. AdaHessian makes hess_diag during its step
                hess = [read_hess_diag(p, "StepSizeScaling", group, gi, pi) for pi, p in zip(indices, params)]
            dots = []
            for ch in chunks:
                u = flatten_into(ch, "u", ch.params)  # θ_after, then u = θ_before − θ_after
                torch.sub(ch.buffer("theta"), u, out=u)
                if roots is not None:
                    c = flatten_into(ch, "c", [roots[i] for i in ch.positions])
                else:
                    if hess is not None:
                        self._update_ema(ch, [hess[i] for i in ch.positions], None)
                    c = torch.sqrt(self._ema(ch), out=ch.buffer("c"))
                dots.append(torch.dot(c.mul_(u), u))  # c is scratch: c·u in place
            alpha = self._alpha(_sum_scalars(dots))
            if alpha != 1.0:
                for ch in chunks:  # θ_after + (1−α)·u = θ_before − α·u
                    torch._foreach_add_(ch.params, ch.views_of("u"), alpha=1.0 - alpha)
            self.last_scales[group_key(group, gi)] = alpha

    def _alpha(self, total: float) -> float:
        """``min(max_scale, sqrt(2δ/T))``; ``max_scale`` for T = 0, 0 (no step) for T = inf or NaN."""
        if total == 0.0:
            return self.max_scale
        if not math.isfinite(total):
            return 0.0
        return min(self.max_scale, math.sqrt(2.0 * self.delta / total))

    def _chunks_for(self, slot: int | tuple[int, ...], params: list[Tensor]) -> list[Chunk]:
        """The chunks of group ``slot`` (a tuple: a batch of groups stepped as one, see ``_fused``)."""
        return cached_chunks(self._chunks, slot, params)

    def _ema(self, ch: Chunk) -> Tensor:
        """The flat EMA of a chunk; per-param views of it are this wrapper's state. A param whose
        state is another chunk's view (its group stepped alone, or in a batch, since) is copied in."""
        views = ch.views_of("ema")
        for p, view in zip(ch.params, views):
            old = self.state[p].get("curvature_ema")
            if old is not view:
                view.copy_(old) if old is not None else view.zero_()
                self.state[p]["curvature_ema"] = view
        return ch.buffer("ema")

    def _update_ema(self, ch: Chunk, hess: list[Tensor], flat: Tensor | None) -> None:
        """``e ← beta·e + (1−beta)·ĥ²``: on the flat copy ``flat`` of ``hess`` if given, else per tensor."""
        ema = self._ema(ch)
        if flat is not None:
            ema.mul_(self.beta).addcmul_(flat, flat, value=1.0 - self.beta)
        else:
            views = ch.views_of("ema")
            torch._foreach_mul_(views, self.beta)
            torch._foreach_addcmul_(views, hess, hess, value=1.0 - self.beta)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": wrapped state_dict, "scaler": EMA per param index + settings}``."""
        index = self._param_indices()
        ema = {index[id(p)]: dict(s) for p, s in self.state.items() if id(p) in index}
        scaler = dict(
            state=ema,
            delta=self.delta,
            max_scale=self.max_scale,
            beta=self.beta,
            skipped_steps=self.skipped_steps,
            last_scales=dict(self.last_scales),
        )
        return {"optimizer": self.optimizer.state_dict(), "scaler": scaler}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.param_groups = self.optimizer.param_groups  # torch rebuilt the wrapped list: share it again
        scaler = state_dict["scaler"]
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = defaultdict(dict)
        for i, s in scaler["state"].items():
            p = params[int(i)]
            self.state[p] = {k: v.to(dtype=p.dtype, device=p.device).clone() for k, v in s.items()}
        self.delta = float(scaler["delta"])
        self.max_scale = float(scaler["max_scale"])
        self.beta = float(scaler["beta"])
        self.skipped_steps = int(scaler["skipped_steps"])
        self.last_scales = dict(scaler["last_scales"])
        self._chunks, self._layouts, self._split = {}, {}, set()  # rebuilt from the loaded state at the next step
        self._storage = GradientStorage()

    def _param_indices(self) -> dict[int, int]:
        index: dict[int, int] = {}
        for p in (p for g in self.param_groups for p in g["params"]):
            index.setdefault(id(p), len(index))
        return index

    # -- construction for libraries that build the optimizer themselves (SB3) --------------------
    @classmethod
    def factory(
        cls,
        optimizer_class: type[torch.optim.Optimizer],
        delta: float = 1e-8,
        max_scale: float = 1.0,
        beta: float = 0.999,
    ) -> Callable[..., StepSizeScaling]:
        """A picklable ``optimizer_class`` for SB3's ``policy_kwargs``.

        ``StepSizeScaling.factory(torch.optim.Adam, delta=1e-8)(params, lr=3e-4, eps=1e-5)`` is
        ``StepSizeScaling(torch.optim.Adam(params, lr=3e-4, eps=1e-5), delta=1e-8)``.
        """
        return functools.partial(_build_scaled, optimizer_class, delta, max_scale, beta)


def _build_scaled(
    optimizer_class: type[torch.optim.Optimizer],
    delta: float,
    max_scale: float,
    beta: float,
    params: Any,
    **kwargs: Any,
) -> StepSizeScaling:
    return StepSizeScaling(optimizer_class(params, **kwargs), delta=delta, max_scale=max_scale, beta=beta)


def _sum_scalars(values: list[Tensor]) -> float:
    if len(values) == 1:
        return values[0].item()
    if len({v.device for v in values}) > 1:
        return float(sum(v.item() for v in values))
    return torch.stack(values).sum().item()
