"""``capture``: record the forward calls of captured modules, then one fused reverse pass.

Recording: each captured leaf module gets a forward wrapper, built once at construction and set
on the instance only inside the ``with`` block (nothing runs during rollouts or under
``no_grad``). The forward code receives an *alias* of each captured output, and captured
consumers read the real output instead; a consumer that reads known tensor operations on
captured outputs (:mod:`hesscale.between`) reads their detached result, so the alias's gradient
is exactly the outside part. Each call keeps only what its rule reads (:mod:`hesscale.record`).

Data flow of :meth:`capture.backward` (fused route, the default):

1. one autograd call through the outside graph only gives ``g = ∂L/∂y`` at every alias the rest
   of the computation reads (distributions, clamps, other networks, the loss), the gradients of
   leaf and external parameters and — by autograd through that small graph, or a closed form the
   caller passes — the per-sample loss Hessian diagonal ``D`` at those outputs; leaf parameters
   get their exact diagonal the same way. A caller with closed forms of the whole outside
   gradient too (``output_grads``, e.g. PPO/A2C's Gaussian heads) skips this autograd call;
2. the recorded calls are walked in reverse (:func:`hesscale.fused.fused_sweep`): each module's
   rule turns ``(g_out, D_out)`` into its parameters' ``.grad`` and curvature and the
   ``(g_in, D_in)`` of the call, or chain of known operations, that produced its input
   (contributions of several consumers add up); modules without a fused rule take one autograd
   vector-Jacobian product for the gradient.

``fused=False`` keeps the unfused route (:mod:`hesscale.unfused`: autograd's whole backward,
then a separate sweep), the reference the tests compare against. :attr:`capture.routes` says
which route each module took in the last backward (also logged at DEBUG level).
"""
from __future__ import annotations

import logging
import warnings
import weakref
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from . import unfused
from .between import OpChain, Unknown, chain_leaves, op_name, trace
from .fused import UNFUSED, accumulate_grad, fused_sweep, given_output_hessians, given_outside_gradients
from .leaves import caller_stacklevel, direct_params_of_non_leaves, leaf_modules, named_roots
from .names import SWEEP_METHODS
from .output_hessians import exact_param_diag, exact_per_sample_diag
from .record import Call
from .rules import Rule, rule_for

_log = logging.getLogger("hesscale")


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
        fused: gradient and curvature in one reverse pass (default); ``False``: autograd's
            backward, then the sweep (the reference route; tensor operations between captured
            modules then count as loss, one Hessian-vector product per feature).

    Limits: the loss must be separable over samples along dim 0 (a batch-coupling loss makes the
    per-sample output Hessians wrong); captured modules take one tensor and return one tensor,
    and their parameters are read only through their calls; in-place activations work on a copy
    of their input; don't modify captured outputs in place.
    """

    def __init__(
        self,
        modules: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module],
        leaf_params: Iterable[nn.Parameter] = (),
        method: str = "hesscale",
        per_sample: bool = False,
        fused: bool = True,
    ):
        if method not in SWEEP_METHODS:
            raise ValueError(f"method={method!r} is not a sweep method; valid: {', '.join(SWEEP_METHODS)}")
        roots_named = named_roots(modules)
        roots = [m for _, m in roots_named]
        self.method = method
        self.per_sample = per_sample
        self.fused = bool(fused)
        self._leaves = [(path, module, rule_for(module, path)) for path, module in leaf_modules(roots_named)]
        module_params = [p for _, m, _ in self._leaves for p in m.parameters(recurse=False)]
        owned = {id(p) for p in module_params}
        leaf = []
        for p in [*leaf_params, *direct_params_of_non_leaves(roots)]:
            if id(p) not in owned:
                owned.add(id(p))
                leaf.append(p)
        self._module_params = module_params
        self._leaf_params = leaf
        self._owned = owned
        self._wrappers = [(module, self._wrapper(path, module, rule)) for path, module, rule in self._leaves]
        self._saved_forwards: list | None = None
        self._calls: list[Call] = []
        self._alias_index: dict[int, int] = {}
        self._internal: list[bool] = []
        self._warned_outside_edge = False
        #: module path → route of its last backward: "fused", "autograd" (a rule without a fused
        #: form: one vector-Jacobian product) or "unfused"
        self.routes: dict[str, str] = {}
        #: consumer path → the operation that kept its input on the exact route (last forward)
        self.outside_ops: dict[str, str] = {}

    # -- recording -------------------------------------------------------------------------
    def __enter__(self) -> "capture":
        if self._saved_forwards is not None:
            raise RuntimeError("this capture is already active; nested blocks need separate capture objects")
        self._calls, self._alias_index, self._internal, self.outside_ops = [], {}, [], {}
        self._saved_forwards = [module.__dict__.get("forward") for module, _ in self._wrappers]
        for module, wrapper in self._wrappers:
            module.__dict__["forward"] = wrapper
        return self

    def __exit__(self, *exc) -> None:
        for (module, _), saved in zip(self._wrappers, self._saved_forwards or ()):
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = saved
        self._saved_forwards = None

    def _wrapper(self, path: str, module: nn.Module, rule: Rule):
        """The instance ``forward`` set inside the ``with`` block (built once per leaf).

        A call runs in one of three modes: connected to autograd's graph (the unfused route, and
        downstream of an operation the engine does not carry: the exact route needs the graph);
        under ``no_grad`` (fused rules: the engine computes the gradient itself; the forward code
        gets a detached leaf as the alias); or on a graph local to the module (other rules: one
        vector-Jacobian product through it at backward).
        """
        forward = module.__dict__.get("forward") or type(module).forward.__get__(module)
        inplace = getattr(module, "inplace", False)
        keep_x, keep_y = "x" in rule.fused_reads, "y" in rule.fused_reads
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))

        def wrapped(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            if len(args) != 1 or not isinstance(args[0], Tensor):
                raise TypeError(f"captured module {path!r} must be called with exactly one tensor")
            x, producer, chain, graph = self._input(path, args[0])
            live = producer is not None or chain is not None
            if graph:
                y = forward(x.clone() if inplace else x, **kwargs)
            elif not (live or trainable):
                return forward(x, **kwargs)  # a constant: nothing to record
            elif rule.fused:
                torch._C._set_grad_enabled(False)  # as torch.no_grad(), without the context object
                try:
                    y = forward(x.clone() if inplace else x, **kwargs)
                finally:
                    torch._C._set_grad_enabled(True)
            else:
                x = x.detach().requires_grad_(live)
                y = forward(x.clone() if inplace else x, **kwargs)
            if not isinstance(y, Tensor):
                raise TypeError(f"captured module {path!r} must return one tensor")
            if graph and not y.requires_grad:
                return y
            if y.requires_grad:  # on autograd's graph or a local one: everything is kept
                alias = y.view_as(y)
                call = Call(module, path, rule, x, y, alias, producer, chain, graph)
            else:  # a fused rule under no_grad: what the rule reads, as autograd keeps a node's saved
                # tensors; the alias only weakly (the forward code, or a graph reading it, holds it)
                alias = y.detach().requires_grad_(True)
                call = Call(module, path, rule, x if keep_x else None, y if keep_y else None,
                            weakref.ref(alias), producer, chain, graph)
            self._alias_index[id(alias)] = len(self._calls)
            self._calls.append(call)
            self._internal.append(False)
            return alias

        return wrapped

    def _input(self, path: str, a: Tensor) -> tuple[Tensor, int | None, OpChain | None, bool]:
        """``(x, producer, chain, graph)``: what the consumer at ``path`` reads for its argument
        ``a``, and whether the call must stay connected to autograd's graph."""
        producer = self._index_of(a)
        if producer is not None:
            self._internal[producer] = True
            return self._output_of(producer, a), producer, None, self._calls[producer].graph
        if not a.requires_grad:
            return a, None, None, not self.fused
        if not self._calls:
            return a, None, None, True  # upstream of the capture: autograd carries it
        if self.fused:
            try:
                chain = trace(a.grad_fn, a.shape, self._producer_of_node) if a.grad_fn is not None else None
            except Unknown as exc:
                op = str(exc)
            else:
                if chain is None:
                    return a, None, None, True  # a leaf that needs a gradient: as upstream
                if isinstance(chain, int):  # the alias itself under another tensor object
                    self._internal[chain] = True
                    return self._output_of(chain, a), chain, None, self._calls[chain].graph
                for i in chain_leaves(chain):
                    self._internal[i] = True
                return a.detach(), None, chain, False
        else:
            op = op_name(a.grad_fn) if a.grad_fn is not None else "a leaf"
        self.outside_ops[path] = op
        if not self._warned_outside_edge:
            self._warned_outside_edge = True
            warnings.warn(
                f"captured module {path!r} reads a tensor made by {op!r} on captured outputs, an "
                "operation the sweep does not carry; that part is treated as loss and differentiated "
                "exactly (one Hessian-vector product per feature). Wrap it in a module with a rule "
                "to keep the sweep cheap.",
                stacklevel=caller_stacklevel(),
            )
        return a, None, None, True

    def _index_of(self, tensor: Tensor) -> int | None:
        """The index of the call whose alias ``tensor`` is (its id alone could be a freed alias's)."""
        i = self._alias_index.get(id(tensor))
        return i if i is not None and self._calls[i].alias is tensor else None

    def _output_of(self, i: int, alias: Tensor) -> Tensor:
        """What a captured consumer of call ``i``'s output reads: the real output (same values as
        ``alias``; a detached alias where the call keeps no output)."""
        y = self._calls[i].y
        return alias.detach() if y is None else y

    def _producer_of_node(self, node) -> int | None:
        """The call whose alias is graph node ``node`` (a view node, or a leaf's AccumulateGrad)."""
        variable = getattr(node, "variable", None)
        if variable is not None:
            return self._index_of(variable)
        for i, call in enumerate(self._calls):
            alias = call.alias
            if alias is not None and alias.grad_fn is node:
                return i
        return None

    # -- backward --------------------------------------------------------------------------
    def backward(
        self,
        loss: Tensor | None,
        output_hessians: Mapping[Tensor, Tensor] | None = None,
        external_grads: bool | Iterable[Tensor] = False,
        output_grads: Mapping[Tensor, Tensor] | None = None,
        into: Mapping[Tensor, tuple[Tensor, Tensor]] | None = None,
    ) -> None:
        """Accumulate ``.grad`` and set ``.hess_diag`` on the captured and leaf parameters.

        Args:
            loss: scalar loss computed inside the ``with`` block (``None`` with ``output_grads`` on
                the fused route, which does not differentiate it).
            output_hessians: optional closed forms: captured output (the tensor the forward code
                received) → per-sample ``diag ∂²L/∂output²``; other outputs the loss reads get the
                exact one by autograd.
            external_grads: also accumulate gradients of parameters outside the capture: ``True``
                all of them, as ``loss.backward()`` would, or the given ones (default: none).
            output_grads: closed forms of the whole outside gradient (captured output → ``∂L/∂output``,
                parameter outside the capture → ``∂L/∂param``, accumulated): no autograd call on the
                fused route (the unfused one differentiates ``loss``); an output without an entry gets
                no outside gradient, one with an entry needs ``output_hessians``; no leaf parameters.
            into: optional storage, captured parameter → ``(g, ĥ)`` tensors shaped like it (an
                optimizer's ``gradient_storage()``): on the fused route a rule that can writes the
                parameter's gradient (if its ``.grad`` is None) and ĥ there, and they become its
                ``.grad`` and ``.hess_diag`` (not per sample; a parameter shared by several calls
                gets the first); other parameters get fresh tensors as without it.
        """
        if self._saved_forwards is not None:
            raise RuntimeError("call capture.backward() after the `with` block has closed")
        if loss is None and not (self.fused and output_grads is not None):
            raise ValueError("loss=None needs output_grads on the fused route (the unfused one differentiates the loss)")
        if loss is not None and loss.dim() != 0:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss.shape)}")
        d_given = given_output_hessians(self._index_of, output_hessians or {})
        self.routes = {}
        into = into if into and not self.per_sample else None
        if self.fused and output_grads is not None:
            module_hess, leaf_hess = self._closed_form_backward(output_grads, d_given, into), {}
        elif self.fused:
            module_hess, leaf_hess = self._fused_backward(loss, d_given, external_grads, into)
        else:
            module_hess, leaf_hess = self._unfused_backward(loss, d_given, external_grads)
        for p, h in [*module_hess.items(), *leaf_hess.items()]:
            if self.per_sample and h.dim() == p.dim() + 1:
                p.hess_diag_per_sample = h
                h = h.sum(0)
            p.hess_diag = h
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("hesscale backward routes: %s; exact-route inputs: %s", self.routes, self.outside_ops)
        self._calls, self._alias_index, self._internal = [], {}, []

    def _external(self, loss: Tensor, external_grads: bool | Iterable[Tensor]) -> list[Tensor]:
        """The tensors outside the capture whose gradient is accumulated too."""
        if external_grads is False:
            return []
        if external_grads is not True:
            return [p for p in external_grads if p.requires_grad and id(p) not in self._owned]
        found, seen, stack = [], set(), [loss.grad_fn]
        while stack:  # every leaf of loss's graph, as loss.backward() reaches them
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            variable = getattr(fn, "variable", None)
            if variable is not None:
                if id(variable) not in self._owned and self._index_of(variable) is None:
                    found.append(variable)
                continue
            stack.extend(f for f, _ in fn.next_functions)
        return found

    def _fused_backward(self, loss, d_given, external_grads, into):
        """Steps 1 and 2 of the module docstring."""
        calls, n = self._calls, len(self._calls)
        leaf = [p for p in self._leaf_params if p.requires_grad]
        external = self._external(loss, external_grads)
        aliases = {i: a for i, a in enumerate(c.alias for c in calls) if a is not None}  # freed: unread
        # with a graph at once where an exact diagonal is sure to be needed (an outside leaf)
        create = bool(leaf) or any(i not in d_given and not self._internal[i] for i in aliases)
        inputs = [*aliases.values(), *leaf, *external]
        grads = [None] * len(inputs)
        if loss.requires_grad and inputs:
            grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True, create_graph=create)
        g_out = dict(zip(aliases, grads))
        used = [i for i, g in g_out.items() if g is not None and i not in d_given]
        exact = {i: g_out[i] for i in used}
        if used and not create:
            exact = dict(zip(used, torch.autograd.grad(loss, [aliases[i] for i in used], create_graph=True)))
        d_acc = [d_given.get(i) for i in range(n)]
        for i, g in exact.items():
            d_acc[i] = exact_per_sample_diag(g, aliases[i]).detach()
        rest = grads[len(aliases):]
        leaf_hess = {p: exact_param_diag(g, p).detach() for p, g in zip(leaf, rest) if g is not None}
        g_acc = [None if g_out.get(i) is None else g_out[i].detach() for i in range(n)]
        module_grads, module_hess = fused_sweep(
            calls, g_acc, d_acc, self.method == "hesscale_gn", self.per_sample, self.routes, into
        )
        for p, g in module_grads.items():  # made under no_grad
            accumulate_grad(p, g)
        for p, g in zip(leaf + external, rest):
            if g is not None:
                accumulate_grad(p, g.detach())
        return module_hess, leaf_hess

    def _closed_form_backward(self, output_grads, d_given, into):
        """Step 2 of the module docstring from the caller's outside gradients (no autograd call)."""
        if any(p.requires_grad for p in self._leaf_params):
            raise ValueError("output_grads: leaf parameters need their exact diagonal by autograd; pass their "
                             "gradient in output_grads only for parameters outside the capture")
        calls = self._calls
        g_acc, external = given_outside_gradients(calls, self._index_of, self._owned, output_grads, d_given)
        d_acc = [d_given.get(i) for i in range(len(calls))]
        module_grads, module_hess = fused_sweep(
            calls, g_acc, d_acc, self.method == "hesscale_gn", self.per_sample, self.routes, into
        )
        for p, g in [*external, *module_grads.items()]:
            accumulate_grad(p, g)
        return module_hess

    def _unfused_backward(self, loss, d_given, external_grads):
        calls = self._calls
        gauss_newton = self.method == "hesscale_gn"
        open_calls = [i for i in range(len(calls)) if i not in d_given]
        retain = bool(open_calls or self._leaf_params)
        used = unfused.backward_with_grad_hooks(
            calls, loss, self._module_params + self._leaf_params, external_grads, open_calls, gauss_newton, retain
        )
        leaf_hess = unfused.exact_boundary_hessians(calls, loss, self._leaf_params, d_given, used)
        module_hess = unfused.reverse_sweep(calls, d_given, gauss_newton, self.per_sample)
        self.routes = {call.path: UNFUSED for call in calls}
        return module_hess, leaf_hess

    def outputs(self, module: nn.Module) -> list[Tensor]:
        """The outputs of ``module``'s calls recorded so far, in call order, as the forward code
        received them (valid keys of :meth:`backward`'s ``output_hessians``; ``None`` for an output
        that nothing holds any more); read them before :meth:`backward`, which clears the record."""
        return [call.alias for call in self._calls if call.module is module]

    @property
    def leaf_params(self) -> list[Tensor]:
        """The parameters the loss reads directly, whose diagonal is exact by autograd."""
        return self._leaf_params

    def is_captured_output(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` is an output of a captured module, as the forward code received it."""
        return self._index_of(tensor) is not None
