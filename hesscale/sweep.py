"""``capture``: record the forward calls of captured modules, then one reverse HesScale sweep.

Data flow of :meth:`capture.backward`:

1. one ordinary backward gives ``.grad`` and, by tensor hooks, ``g = ∂L/∂y`` at the outputs of
   non-linear element-wise modules (for the ``σ''·g`` term) and which captured outputs the *rest*
   of the computation reads (distributions, clamps, other networks, the loss);
2. the loss Hessian diagonal w.r.t. each of those outputs, exactly and per sample, by autograd
   through that small outside graph only (or a closed form the caller passes); leaf parameters
   get their exact diagonal the same way;
3. the recorded calls are walked in reverse; each module's rule turns ``d_out`` into its
   parameters' curvature and the ``d_in`` it passes to the call that produced its input
   (contributions of several consumers add up).

To keep step 1 to the outside graph, the forward code receives an *alias* of each captured
output, and captured consumers read the real output instead: the alias's gradient is then
exactly the outside part.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .names import SWEEP_METHODS
from .output_hessians import exact_param_diag, exact_per_sample_diag
from .rules import Rule, rule_for

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class _Call:
    module: nn.Module
    path: str
    rule: Rule
    x: Tensor  # input values (before any in-place change)
    y: Tensor  # the module's real output
    alias: Tensor  # what the forward code received
    producer: int | None  # index of the call whose output is ``x``
    g_out: Tensor | None = None


_INTERNAL_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def _caller_stacklevel() -> int:
    """``stacklevel`` of the first frame outside torch and hesscale: the line whose forward code
    called the module (a warning then points there, not into ``nn.Module.__call__``)."""
    frame, level = sys._getframe(2), 2  # level 1: the hook that calls this and warns
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _named_roots(modules: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """``(path prefix, root)`` pairs: a mapping's keys, else ``""`` for one root, ``[r]`` for several."""
    if isinstance(modules, Mapping):
        named = list(modules.items())
    else:
        roots = [modules] if isinstance(modules, nn.Module) else list(modules)
        named = [("" if len(roots) == 1 else f"[{r}]", root) for r, root in enumerate(roots)]
    if not named or not all(isinstance(m, nn.Module) for _, m in named):
        raise TypeError(
            "capture() needs an nn.Module, a non-empty iterable of nn.Modules or a {path: nn.Module} mapping"
        )
    return named


def _leaf_modules(roots: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    seen: set[int] = set()
    leaves = []
    for prefix, root in roots:
        for path, module in root.named_modules(prefix=prefix):
            if id(module) in seen or next(module.children(), None) is not None:
                continue
            seen.add(id(module))
            if not isinstance(module, _CONTAINERS):  # an empty container is the identity
                leaves.append((path, module))
    return leaves


def _direct_params_of_non_leaves(roots: Sequence[nn.Module]) -> list[nn.Parameter]:
    params = []
    for root in roots:
        for module in root.modules():
            if next(module.children(), None) is not None:
                params.extend(module.parameters(recurse=False))
    return params


class capture:
    """Context manager: HesScale curvature for the parameters of ``modules``.

    Example::

        with hesscale.capture(policy, method="hesscale") as cap:
            dist = policy.get_distribution(obs)          # any forward code
            loss = -(adv * dist.log_prob(actions)).mean()
        cap.backward(loss)          # .grad and .hess_diag on every captured parameter

    Args:
        modules: a module or modules whose leaf modules are recorded; each leaf needs a rule
            (:func:`hesscale.register_rule`), otherwise :class:`UnsupportedModuleError`, naming
            the leaf's path, is raised here, before any forward. A ``{path: module}`` mapping
            names the roots (errors then say ``features_extractor.bn``, not ``[0].bn``).
        leaf_params: parameters the loss reads directly (SB3's ``log_std``); their diagonal is
            exact, by autograd. Direct parameters of non-leaf captured modules are added
            automatically.
        method: ``"hesscale"``; ``"hesscale_gn"`` drops every ``σ''·g`` term; ``"bl89"`` is
            ``"hesscale"`` here (it differs only through the softmax output Hessian, which
            :func:`hesscale.hessian_diagonal` applies for ``nn.CrossEntropyLoss``).
        per_sample: also store ``param.hess_diag_per_sample`` (``[N, *param.shape]``) for
            module parameters; costs N× parameter memory.

    Limits: the loss must be separable over samples along dim 0 (a batch-coupling loss makes the
    per-sample output Hessians wrong); captured modules take one tensor and return one tensor;
    in-place activations work on a copy of their input; don't modify captured outputs in place.
    """

    def __init__(
        self,
        modules: nn.Module | Iterable[nn.Module],
        leaf_params: Iterable[nn.Parameter] = (),
        method: str = "hesscale",
        per_sample: bool = False,
    ):
        if method not in SWEEP_METHODS:
            raise ValueError(f"method={method!r} is not a sweep method; valid: {', '.join(SWEEP_METHODS)}")
        named_roots = _named_roots(modules)
        roots = [m for _, m in named_roots]
        self.method = method
        self.per_sample = per_sample
        self._leaves = [(path, module, rule_for(module, path)) for path, module in _leaf_modules(named_roots)]
        module_params = [p for _, m, _ in self._leaves for p in m.parameters(recurse=False)]
        owned = {id(p) for p in module_params}
        leaf = []
        for p in [*leaf_params, *_direct_params_of_non_leaves(roots)]:
            if id(p) not in owned:
                owned.add(id(p))
                leaf.append(p)
        self._module_params = module_params
        self._leaf_params = leaf
        self._handles: list = []
        self._calls: list[_Call] = []
        self._alias_index: dict[int, int] = {}
        self._pending: dict[int, list[tuple[Tensor, int | None]]] = {}
        self._warned_outside_edge = False

    # -- recording -------------------------------------------------------------------------
    def __enter__(self) -> "capture":
        self._calls, self._alias_index, self._pending = [], {}, {}
        for path, module, rule in self._leaves:
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(path)))
            self._handles.append(module.register_forward_hook(self._post_hook(path, rule)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_hook(self, path: str):
        def hook(module, args):
            if not torch.is_grad_enabled():
                return None
            if len(args) != 1 or not isinstance(args[0], Tensor):
                raise TypeError(f"captured module {path!r} must be called with exactly one tensor")
            x = args[0]
            producer = self._alias_index.get(id(x))
            if producer is not None:
                x = self._calls[producer].y  # captured consumers read the real output
            elif x.grad_fn is not None and self._calls and not self._warned_outside_edge:
                self._warned_outside_edge = True
                warnings.warn(
                    f"captured module {path!r} reads a tensor made by non-module operations on "
                    "captured outputs; that part is treated as loss and differentiated exactly "
                    "(one Hessian-vector product per feature). Wrap such operations in a module "
                    "with a rule to keep the sweep cheap.",
                    stacklevel=_caller_stacklevel(),
                )
            self._pending.setdefault(id(module), []).append((x, producer))
            return (x.clone() if getattr(module, "inplace", False) else x,)

        return hook

    def _post_hook(self, path: str, rule: Rule):
        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return None
            x, producer = self._pending[id(module)].pop()
            if not isinstance(output, Tensor):
                raise TypeError(f"captured module {path!r} must return one tensor")
            if not output.requires_grad:
                return None
            alias = output.view_as(output)
            self._alias_index[id(alias)] = len(self._calls)
            self._calls.append(_Call(module, path, rule, x, output, alias, producer))
            return alias

        return hook

    # -- backward --------------------------------------------------------------------------
    def backward(
        self,
        loss: Tensor,
        output_hessians: Mapping[Tensor, Tensor] | None = None,
        external_grads: bool = False,
    ) -> None:
        """Accumulate ``.grad`` and set ``.hess_diag`` on the captured and leaf parameters.

        Args:
            loss: scalar loss computed inside the ``with`` block.
            output_hessians: optional closed forms: captured output (the tensor the forward code
                received) → per-sample ``diag ∂²L/∂output²``; other outputs the loss reads get the
                exact one by autograd.
            external_grads: also accumulate gradients of parameters outside the capture, as
                ``loss.backward()`` would (default: leave them untouched).
        """
        if self._handles:
            raise RuntimeError("call capture.backward() after the `with` block has closed")
        if loss.dim() != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        d_acc = self._given_output_hessians(output_hessians or {})
        open_calls = [i for i in range(len(self._calls)) if i not in d_acc]
        used = self._backward_with_grad_hooks(loss, external_grads, open_calls)
        leaf_hess = self._exact_boundary_hessians(loss, d_acc, used)
        module_hess = self._reverse_sweep(d_acc)
        for p, h in [*module_hess.items(), *leaf_hess.items()]:
            if self.per_sample and h.dim() == p.dim() + 1:
                p.hess_diag_per_sample = h
                h = h.sum(0)
            p.hess_diag = h
        self._calls, self._alias_index = [], {}

    def _given_output_hessians(self, given: Mapping[Tensor, Tensor]) -> dict[int, Tensor]:
        d_acc = {}
        for output, diag in given.items():
            index = self._alias_index.get(id(output))
            if index is None:
                raise ValueError("output_hessians keys must be outputs of captured modules")
            if diag.shape != output.shape:
                raise ValueError(f"output Hessian of shape {tuple(diag.shape)} for an output of shape {tuple(output.shape)}")
            d_acc[index] = diag.detach()
        return d_acc

    def _backward_with_grad_hooks(self, loss: Tensor, external_grads: bool, open_calls: list[int]) -> list[int]:
        """Step 1: the ordinary backward, catching ``∂L/∂y`` where a rule needs it.

        Returns the open calls whose output the loss reads from outside the captured modules
        (their aliases receive a gradient); the graph is kept for their exact Hessians.
        """
        used: list[int] = []
        handles = []
        if self.method != "hesscale_gn":
            for call in self._calls:
                if call.rule.needs_grad_output:
                    handles.append(call.y.register_hook(self._grad_catcher(call)))
        for i in open_calls:
            handles.append(self._calls[i].alias.register_hook(lambda g, i=i: used.append(i)))
        retain = bool(open_calls or self._leaf_params)
        try:
            if external_grads:
                loss.backward(retain_graph=retain)
            else:
                params = [p for p in self._module_params + self._leaf_params if p.requires_grad]
                if params:
                    torch.autograd.backward(loss, inputs=params, retain_graph=retain)
        finally:
            for handle in handles:
                handle.remove()
        return sorted(set(used))

    def _exact_boundary_hessians(
        self, loss: Tensor, d_acc: dict[int, Tensor], used: list[int]
    ) -> dict[nn.Parameter, Tensor]:
        """Step 2: exact per-sample output diagonals (into ``d_acc``) and leaf-parameter diagonals."""
        leaf = [p for p in self._leaf_params if p.requires_grad]
        inputs = [self._calls[i].alias for i in used] + leaf
        if not inputs:
            return {}
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
        for i, grad in zip(used, grads):
            if grad is not None:
                d_acc[i] = exact_per_sample_diag(grad, self._calls[i].alias).detach()
        return {
            p: exact_param_diag(grad, p).detach()
            for p, grad in zip(leaf, grads[len(used):])
            if grad is not None
        }

    @staticmethod
    def _grad_catcher(call: _Call):
        def hook(grad):
            call.g_out = grad if call.g_out is None else call.g_out + grad

        return hook

    def _reverse_sweep(self, d_acc: dict[int, Tensor]) -> dict[nn.Parameter, Tensor]:
        """Step 3: walk the calls backwards, applying each module's rule."""
        gauss_newton = self.method == "hesscale_gn"
        hess: dict[nn.Parameter, Tensor] = {}
        with torch.no_grad():
            for i in reversed(range(len(self._calls))):
                d_out = d_acc.pop(i, None)
                if d_out is None:
                    continue
                call = self._calls[i]
                for name, h in call.rule.param_diag(call.module, call.x, call.y, d_out, self.per_sample).items():
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

    def outputs(self, module: nn.Module) -> list[Tensor]:
        """The outputs of ``module``'s calls recorded so far, in call order, as the forward code
        received them (valid keys of :meth:`backward`'s ``output_hessians``); read them before
        :meth:`backward`, which clears the record."""
        return [call.alias for call in self._calls if call.module is module]

    def is_captured_output(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is an output of a captured module, as the forward code received it."""
        return id(tensor) in self._alias_index
