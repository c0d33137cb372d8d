"""The one shared second-order update: losses of a network → gradient + curvature → optimizer step.

Every agent's curvature-path ``train()`` mirrors upstream SB3's loss computation and replaces
SB3's optimisation block::

    self.policy.optimizer.zero_grad()
    loss.backward()
    th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
    self.policy.optimizer.step()

by::

    with update.capture() as cap:                     # around the forward of the network
        values, log_prob, entropy = self.policy.evaluate_actions(obs, actions)
    ... upstream's loss code, unchanged ...
    update.step(cap, loss)                            # grads + hess_diag, clip, step, diagnostics

Clipping is SB3's: the algorithm's own ``max_grad_norm`` (PPO/A2C; SAC never clips), so both arms
of a comparison clip alike; ĥ is scaled with the gradient's clip factor (:meth:`CurvatureUpdate._clip`).

:class:`CurvatureUpdate` owns one optimizer (which may have several named param groups) and the
modules whose parameters it updates. Curvature comes from :class:`hesscale.capture` (HesScale,
HesScaleGN or BL89 sweep; exact per-sample loss Hessians w.r.t. the captured outputs, or the closed
forms the caller passes in ``output_hessians``), or — for AdaHessian — from gradients built with
``create_graph=True`` (the optimizer then draws its own Hutchinson estimate).

Diagnostics, accumulated between :meth:`CurvatureUpdate.record` calls and written there under
``train/``: ``step_scale/<group>`` (mean α of step-size scaling), ``hess_diag_mean/<group>`` and
``hess_diag_max/<group>`` (mean and max of ĥ over the group's entries, averaged / maxed over the
updates), and ``skipped_steps`` (the optimizer's count of skipped group steps).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch as th
from torch import nn

from hesscale.optim.protocols import CountsSkippedSteps, ReportsStepScales, StoresGradients

from .divergence import Diverged


_NO_STORAGE = (None, None)  # a parameter without storage in CurvatureUpdate._into


def named_in(root: nn.Module, modules: Iterable[nn.Module]) -> dict[str, nn.Module]:
    """``{attribute path in root: module}`` for submodules of ``root`` (``features_extractor``)."""
    paths = {id(m): name for name, m in root.named_modules()}
    missing = [type(m).__name__ for m in modules if id(m) not in paths]
    if missing:
        raise ValueError(f"not submodules of the {type(root).__name__}: {', '.join(missing)}")
    return {paths[id(m)]: m for m in modules}


class _StatsLayout(NamedTuple):
    """Where :class:`_CurvatureStats` accumulates one set of ĥ tensors."""

    key: tuple  # (group name, param ids) per group
    sums: list[th.Tensor]  # per-tensor views of flat_sum
    maxes: list[th.Tensor]  # per-tensor views of flat_max
    flat_sum: th.Tensor  # Σ_t ĥ_t, entry-wise
    flat_max: th.Tensor  # max_t ĥ_t, entry-wise
    segments: list[tuple[str, int, int]]  # (group, first, end) entries of the flat buffers


class _CurvatureStats:
    """Running ĥ diagnostics per param group: the mean over a group's entries averaged over the
    updates, and the max over entries and updates.

    Per update, for all groups at once: two ``_foreach`` ops into flat buffers kept between
    updates, ``Σ_t ĥ_t`` and ``max_t ĥ_t`` entry-wise (the interval's first update copies ĥ in);
    no host sync, no allocation. The reductions over entries run once, in :meth:`flush`. A group's
    mean is ``Σ_t mean(ĥ_t) = Σ(Σ_t ĥ_t) / numel`` while the same parameters carry ĥ; when that
    set changes, the buffers are reduced first and laid out anew.
    """

    def __init__(self, group_names: list[str]) -> None:
        self.group_names = group_names
        self._layout: _StatsLayout | None = None
        self.reset()

    def reset(self) -> None:
        self.mean_sum = {n: 0.0 for n in self.group_names}  # Σ over updates of the mean over entries
        self.max: dict[str, th.Tensor | None] = {n: None for n in self.group_names}
        self.count = {n: 0 for n in self.group_names}  # updates in which the group had any ĥ
        self._updates = 0  # updates accumulated in the buffers since the last flush

    def add(self, groups: list[tuple[str, list[th.Tensor]]]) -> None:
        """One update: ``[(group name, params)]``; each param's ``hess_diag`` is read if it has one."""
        present = [(name, [p for p in params if getattr(p, "hess_diag", None) is not None]) for name, params in groups]
        hs = [p.hess_diag for _, params in present for p in params]
        if not hs:
            return
        key = tuple((name, tuple(map(id, params))) for name, params in present)
        if self._layout is None or key != self._layout.key:
            self.flush()
            self._layout = self._lay_out(key, present, hs)
        layout = self._layout
        if self._updates == 0:
            th._foreach_copy_(layout.sums + layout.maxes, hs + hs)
        else:
            th._foreach_add_(layout.sums, hs)
            th._foreach_maximum_(layout.maxes, hs)
        self._updates += 1

    @staticmethod
    def _lay_out(key: tuple, present: list[tuple[str, list[th.Tensor]]], hs: list[th.Tensor]) -> _StatsLayout:
        """Flat Σ and max buffers for ``hs``, their per-tensor views and each group's segment."""
        sizes = [h.numel() for h in hs]
        flat_sum, flat_max = hs[0].new_empty(sum(sizes)), hs[0].new_empty(sum(sizes))
        views = [[v.view_as(h) for v, h in zip(flat.split(sizes), hs)] for flat in (flat_sum, flat_max)]
        segments, first = [], 0
        for name, params in present:
            if params:
                end = first + sum(p.numel() for p in params)
                segments.append((name, first, end))
                first = end
        return _StatsLayout(key, views[0], views[1], flat_sum, flat_max, segments)

    def flush(self) -> None:
        """Reduce the buffers into the per-group figures."""
        if self._updates:
            layout = self._layout
            for name, first, end in layout.segments:
                self.mean_sum[name] += float(layout.flat_sum[first:end].sum()) / (end - first)
                top = layout.flat_max[first:end].max()
                self.max[name] = top if self.max[name] is None else th.maximum(self.max[name], top)
                self.count[name] += self._updates
        self._updates = 0


class CurvatureUpdate:
    """Gradient + Hessian diagonal + optimizer step for the parameters of one optimizer.

    Args:
        optimizer: a torch optimizer over named param groups (``group["name"]``); may be a
            ``hesscale.optim.StepSizeScaling`` wrapper.
        modules: the modules to capture, best as ``{attribute path: module}`` (see
            :func:`named_in`) so that errors name them as the model does; their leaf modules need
            HesScale rules, checked by :meth:`check_modules` or on the first :meth:`capture`.
        leaf_params: parameters read directly by the loss (SB3's state-independent ``log_std``).
        method: ``"hesscale"``, ``"hesscale_gn"`` or ``"bl89"``.
        max_grad_norm: clip the global gradient norm of ``clip_params`` before the step, as SB3
            clips (``None`` or ``inf``: no clipping); ``ĥ`` is scaled with the same factor (see
            :meth:`_clip`).
        create_graph: AdaHessian mode — no capture; gradients are built with ``create_graph=True``.
        first_order: no capture and no curvature: ``loss.backward()`` and the optimizer's step, as
            SB3's own update (SAC's ``critic_optimizer``).
        clip_params: the parameters whose norm is clipped (default: the optimizer's), in the order
            SB3 uses so the clipping coefficient rounds identically.
    """

    def __init__(
        self,
        optimizer: th.optim.Optimizer,
        modules: Sequence[nn.Module] | Mapping[str, nn.Module],
        leaf_params: Iterable[nn.Parameter] = (),
        method: str = "hesscale",
        max_grad_norm: float | None = None,
        create_graph: bool = False,
        clip_params: Iterable[nn.Parameter] | None = None,
        first_order: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.modules = dict(modules) if isinstance(modules, Mapping) else list(modules)
        self.leaf_params = list(leaf_params)
        self.method = method
        self.max_grad_norm = None if max_grad_norm is None or max_grad_norm == float("inf") else float(max_grad_norm)
        self.create_graph = create_graph
        self.first_order = first_order
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.clip_params = list(clip_params) if clip_params is not None else self.params
        self.group_names = [str(g.get("name", i)) for i, g in enumerate(optimizer.param_groups)]
        self._capture = None
        # runtime-checkable Protocol checks are slow: once here, not per step
        self._reports_scales = isinstance(optimizer, ReportsStepScales)
        self._counts_skips = isinstance(optimizer, CountsSkippedSteps)
        self._stores_gradients = isinstance(optimizer, StoresGradients)
        self._into: Mapping[th.Tensor, tuple[th.Tensor, th.Tensor]] = {}  # the storage of the current update
        self._curvature_stats = _CurvatureStats(self.group_names)
        self._reset_stats()

    def check_modules(self) -> None:
        """Build the capture (once; re-entered for every update, entering resets its record).

        Raises :class:`hesscale.UnsupportedModuleError`, naming the module's path and type, for a
        module without a rule. Deferred to here so that a model can be built (``load()``) and act
        without one.
        """
        if self._capture is None and not (self.create_graph or self.first_order):
            import hesscale

            self._capture = hesscale.capture(self.modules, leaf_params=self.leaf_params, method=self.method)

    # -- one update ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self) -> Iterator[object | None]:
        """Record the forward of the captured modules (a no-op in AdaHessian mode)."""
        self.check_modules()
        if self._capture is None:
            yield None
            return
        with self._capture as cap:
            yield cap

    def step(
        self,
        cap,
        loss: th.Tensor,
        output_hessians: Mapping[th.Tensor, th.Tensor] | None = None,
        leaf_hessians: Mapping[th.Tensor, th.Tensor] | None = None,
        output_grads: Mapping[th.Tensor, th.Tensor] | None = None,
    ) -> None:
        """``zero_grad`` → grads and ``hess_diag`` → optional clipping → ``optimizer.step()``.

        Args:
            cap: what :meth:`capture` yielded.
            loss: the scalar loss (separable over samples).
            output_hessians: closed-form per-sample loss Hessian diagonals for captured outputs
                (see :class:`hesscale.capture`); the others are computed exactly by autograd.
            leaf_hessians: closed-form Hessian diagonals of parameters the loss reads directly
                and that are *not* captured (their gradient then comes from the same backward).
            output_grads: closed forms of the whole outside gradient (captured outputs and the
                ``leaf_hessians`` parameters; see :meth:`hesscale.capture.backward`): no autograd call.

        Raises :class:`~agents.divergence.Diverged` when the loss is non-finite (parameters
        untouched) or when the optimizer skipped a group for a non-finite gradient or curvature.
        """
        value = loss.item()
        if not math.isfinite(value):
            raise Diverged(f"non-finite loss ({value})")
        self.optimizer.zero_grad()
        if self.first_order:
            loss.backward()
        elif self.create_graph:
            params = [p for p in self.params if p.requires_grad]
            grads = th.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
        else:
            # g and ĥ straight into the optimizer's flat buffers where it offers them (no copy at its step)
            self._into = self.optimizer.gradient_storage() if self._stores_gradients else {}
            cap.backward(loss, output_hessians=output_hessians, external_grads=list(leaf_hessians or ()),
                         output_grads=output_grads, into=self._into)
            for p, h in (leaf_hessians or {}).items():
                p.hess_diag = h
        if self.max_grad_norm is not None:
            self._clip()
        skipped_before = self.skipped_steps
        self.optimizer.step()
        if self.skipped_steps > skipped_before:
            # The optimizers check gradients and curvature themselves and skip a non-finite group.
            raise Diverged("non-finite gradient or curvature: the optimizer skipped a step")
        self._record_step()

    def _clip(self) -> None:
        r"""SB3's clipping, ``g ← c·g`` with ``c = min(1, max_grad_norm / (‖g‖ + 1e-6))`` over
        ``clip_params`` (torch's ``clip_grad_norm_``, so ``c`` rounds as SB3's does), and ``ĥ ← c·ĥ``.

        Why ĥ too: clipping is the step on the rescaled loss ``c·L`` of this batch, whose Hessian
        diagonal is ``c·ĥ``; scaling both keeps g and ĥ the derivatives of one loss. AdaHesScale then
        reacts to a clip as Adam does (its ``m/sqrt(v)`` is invariant to a rescaled loss exactly where
        Adam's is, because v tracks ĥ² where Adam's tracks g²), and the trust region's model
        ``½·Σ c_ema·u²`` is the model of the loss that is stepped on. Clipping g alone would shrink
        AdaHesScale's step by c (as SGD's) while Adam's barely moves. AdaHessian's Hutchinson
        ``ĥ`` comes from the clipped (graph-carrying) gradient, so it is scaled by c by construction.
        """
        if not self.create_graph:
            grads = [p.grad for p in self.clip_params if p.grad is not None]
            if not grads:
                return
            with th.no_grad():
                if len({(g.device, g.dtype) for g in grads}) == 1:  # clip_grad_norm_'s ops, not its dispatch
                    total = th.linalg.vector_norm(th.stack(th._foreach_norm(grads)))
                    coef = th.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
                    th._foreach_mul_(grads, coef)
                else:
                    total = th.nn.utils.clip_grad_norm_(self.clip_params, self.max_grad_norm)
                    coef = th.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
                owners = [p for p in self.clip_params if getattr(p, "hess_diag", None) is not None]
                # in place where ĥ is in the optimizer's storage (ours alone), else out of place (a
                # closed form may hand one tensor to several); one launch each
                stored = [p.hess_diag is self._into.get(p, _NO_STORAGE)[1] for p in owners]
                if any(stored):
                    th._foreach_mul_([p.hess_diag for p, mine in zip(owners, stored) if mine], coef)
                    owners = [p for p, mine in zip(owners, stored) if not mine]
                scaled = th._foreach_mul([p.hess_diag for p in owners], coef) if owners else []
            for p, h in zip(owners, scaled):
                p.hess_diag = h
            return
        # Gradients that carry a graph must be scaled out of place (AdaHessian differentiates them).
        grads = [p.grad for p in self.clip_params if p.grad is not None]
        if not grads:
            return
        total = th.linalg.vector_norm(th.stack([th.linalg.vector_norm(g.detach()) for g in grads]))
        coef = th.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        for p in self.clip_params:
            if p.grad is not None:
                p.grad = p.grad * coef

    # -- diagnostics --------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        self._scale_sum = {n: 0.0 for n in self.group_names}
        self._scale_n = {n: 0 for n in self.group_names}
        self._curvature_stats.reset()

    def _record_step(self) -> None:
        scales = self.optimizer.last_scales if self._reports_scales else None
        per_group = []
        for i, (name, group) in enumerate(zip(self.group_names, self.optimizer.param_groups)):
            if scales is not None:
                key = group.get("name", i)
                if key in scales:
                    self._scale_sum[name] += float(scales[key])
                    self._scale_n[name] += 1
            per_group.append((name, group["params"]))
        self._curvature_stats.add(per_group)

    def record(self, logger) -> None:
        """Write the diagnostics accumulated since the last call to SB3's ``logger``, then reset."""
        stats = self._curvature_stats
        stats.flush()
        for name in self.group_names:
            if self._scale_n[name]:
                logger.record(f"train/step_scale/{name}", self._scale_sum[name] / self._scale_n[name])
            if stats.count[name]:
                logger.record(f"train/hess_diag_mean/{name}", stats.mean_sum[name] / stats.count[name])
                logger.record(f"train/hess_diag_max/{name}", float(stats.max[name]))
        self._reset_stats()

    @property
    def skipped_steps(self) -> int:
        """The optimizer's count of skipped group steps (0 for one that never skips, e.g. torch's)."""
        return self.optimizer.skipped_steps if self._counts_skips else 0
