"""Tensor operations between captured modules: read from autograd's graph, no forward cost.

When a captured module reads a tensor ``a`` that is no captured output but has a ``grad_fn``,
:func:`trace` walks ``a``'s graph down to captured outputs. If every node on the way is a known
linear operation (and every other operand a constant), the walk returns an :class:`OpChain`; the
consumer then reads ``a.detach()`` and the engine carries ``(g, D)`` — the gradient and the
Hessian diagonal at ``a`` — back through the chain itself, with the diagonal approximation used
for modules (cross-branch terms dropped, as at fan-out)::

    a + αb, a − αb (broadcasting)   each operand: (±α g, α² D) summed over its broadcast dims
    a·c, a/c (c constant)           (g·c, D·c²), (g/c, D/c²), summed to the operand's shape
    −a                              (−g, D)
    cat / stack (any dim)           g and D split along the dim
    view, reshape, flatten, (un)squeeze, permute, transpose, expand, clone, dtype casts
                                    the inverse reshape (expand: summed over the expanded dims)
    indexing, slicing, select       g and D scattered back into zeros (``index_put`` accumulating)

Anything else (or an operand that needs a gradient but is no captured output) returns the
operation's name; the caller then keeps the exact route (the consumer reads ``a`` itself).
Operand shapes come from each node's input metadata, so nothing is recorded in the forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

#: (g, D) at a node's output → one (g, D) per input of the node (``None`` for constants)
Transfer = Callable[[Tensor, Tensor], list]


@dataclass
class OpChain:
    """One known operation: its transfer and its inputs (a call index, another chain, or ``None``)."""

    name: str
    transfer: Transfer
    inputs: list

    def scatter(self, g: Tensor, d: Tensor, add: Callable[[int, Tensor, Tensor], None]) -> None:
        """Carry ``(g, D)`` at this chain's output to the captured outputs it reads (``add``)."""
        for target, pair in zip(self.inputs, self.transfer(g, d)):
            if target is None:
                continue
            if isinstance(target, int):
                add(target, *pair)
            else:
                target.scatter(*pair, add)


def chain_leaves(chain: OpChain | int) -> list[int]:
    """The indices of the calls whose outputs a chain of known operations reads."""
    if isinstance(chain, int):
        return [chain]
    return [i for c in chain.inputs if c is not None for i in chain_leaves(c)]


class Unknown(Exception):
    """An operation without a transfer rule (its name is the message)."""


def _shape(fn, nr: int) -> torch.Size:
    return torch.Size(fn._input_metadata[nr].shape)


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    return t if t.shape == shape else t.sum_to_size(shape)


def _constant(value) -> Tensor | float:
    return value.detach() if isinstance(value, Tensor) else float(value)


def _add(node, shapes, sign: float):
    scales = [(1.0, 1.0), (sign * float(node._saved_alpha), float(node._saved_alpha) ** 2)]

    def transfer(g, d):
        return [None if s is None else (_sum_to(g * a, s), _sum_to(d * b, s)) for s, (a, b) in zip(shapes, scales)]
    return transfer


def _scale(node, shapes, divide: bool):
    if shapes[0] is None or shapes[1] is not None:
        raise Unknown(f"{'div' if divide else 'mul'} of two tensors that need gradients")
    c = _constant(node._saved_other)
    if divide:
        c = 1.0 / c

    def transfer(g, d):
        return [(_sum_to(g * c, shapes[0]), _sum_to(d * (c * c), shapes[0])), None]
    return transfer


def _mul(node, shapes):
    if shapes[0] is None and shapes[1] is not None:  # c·a: the constant is the first operand
        c, shape = _constant(node._saved_self), shapes[1]
        return lambda g, d: [None, (_sum_to(g * c, shape), _sum_to(d * (c * c), shape))]
    return _scale(node, shapes, divide=False)


def _reshape(node, shapes):
    shape = shapes[0]
    return lambda g, d: [(g.reshape(shape), d.reshape(shape))]


def _cast(node, shapes):
    dtype = node._input_metadata[0].dtype  # the output's; the input's comes from the next node
    src = node.next_functions[0]
    in_dtype = src[0]._input_metadata[src[1]].dtype if src[0] is not None else dtype
    return lambda g, d: [(g.to(in_dtype), d.to(in_dtype))]


def _permute(node, shapes):
    dims = [int(k) for k in node._saved_dims]
    inverse = sorted(range(len(dims)), key=dims.__getitem__)
    return lambda g, d: [(g.permute(inverse), d.permute(inverse))]


def _transpose(node, shapes):
    d0, d1 = (0, 1) if not hasattr(node, "_saved_dim0") else (node._saved_dim0, node._saved_dim1)
    return lambda g, d: [(g.transpose(d0, d1), d.transpose(d0, d1))]


def _expand(node, shapes):
    shape = shapes[0]
    return lambda g, d: [(_sum_to(g, shape), _sum_to(d, shape))]


def _slice(node, shapes):
    dim, start, end, step = node._saved_dim, node._saved_start, node._saved_end, node._saved_step

    def back(t):
        return t.new_zeros(shapes[0]).slice_scatter(t, dim, start, end, step)
    return lambda g, d: [(back(g), back(d))]


def _select(node, shapes):
    dim, index = node._saved_dim, node._saved_index

    def back(t):
        return t.new_zeros(shapes[0]).select_scatter(t, dim, index)
    return lambda g, d: [(back(g), back(d))]


def _index(node, shapes):
    indices = list(node._saved_indices)

    def back(t):
        return torch.ops.aten.index_put.default(t.new_zeros(shapes[0]), indices, t, True)
    return lambda g, d: [(back(g), back(d))]


def _cat(node, shapes, out_shape):
    dim = node._saved_dim % len(out_shape)
    sizes = [None if s is None else s[dim] for s in shapes]
    if sizes.count(None) > 1:
        raise Unknown("cat with several constant operands")
    if None in sizes:
        sizes[sizes.index(None)] = out_shape[dim] - sum(s for s in sizes if s is not None)
    return lambda g, d: list(zip(g.split(sizes, dim), d.split(sizes, dim)))


def _stack(node, shapes, out_shape):
    dim = node._saved_dim % len(out_shape)
    return lambda g, d: list(zip(g.unbind(dim), d.unbind(dim)))


_RULES = {
    "AddBackward0": lambda n, s: _add(n, s, 1.0),
    "SubBackward0": lambda n, s: _add(n, s, -1.0),
    "AddBackward1": lambda n, s: lambda g, d: [(g, d)],
    "SubBackward1": lambda n, s: lambda g, d: [(g, d)],
    "RsubBackward1": lambda n, s: lambda g, d: [(-float(n._saved_alpha) * g, float(n._saved_alpha) ** 2 * d)],
    "NegBackward0": lambda n, s: lambda g, d: [(-g, d)],
    "MulBackward0": _mul,
    "MulBackward1": lambda n, s: _scale(n, [s[0], None], divide=False),
    "DivBackward0": lambda n, s: _scale(n, s, divide=True),
    "DivBackward1": lambda n, s: _scale(n, [s[0], None], divide=True),
    "CloneBackward0": lambda n, s: lambda g, d: [(g, d)],
    "AliasBackward0": lambda n, s: lambda g, d: [(g, d)],
    "ToCopyBackward0": _cast,
    "PermuteBackward0": _permute,
    "TransposeBackward0": _transpose,
    "TBackward0": _transpose,
    "ExpandBackward0": _expand,
    "SliceBackward0": _slice,
    "SelectBackward0": _select,
    "IndexBackward0": _index,
    **{name: _reshape for name in (
        "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0",
        "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3",
    )},
}
_SHAPED_RULES = {"CatBackward0": _cat, "StackBackward0": _stack}


def op_name(node) -> str:
    """``MulBackward0`` → ``mul``: the forward operation a graph node differentiates."""
    name = type(node).__name__
    return name.split("Backward")[0].lower() if "Backward" in name else name


def trace(node, out_shape: torch.Size, producer_of: Callable) -> OpChain | int:
    """The known-operation chain from captured outputs (``producer_of``: graph node → call index
    or ``None``) to a tensor with graph node ``node`` and shape ``out_shape``; raises :class:`Unknown`."""
    index = producer_of(node)
    if index is not None:
        return index
    name = type(node).__name__
    rule, shaped = _RULES.get(name), _SHAPED_RULES.get(name)
    if rule is None and shaped is None:
        raise Unknown("a parameter or input that needs a gradient" if name == "AccumulateGrad" else op_name(node))
    inputs, shapes = [], []
    for fn, nr in node.next_functions:
        if fn is None:
            inputs.append(None)
            shapes.append(None)
        else:
            shapes.append(_shape(fn, nr))
            inputs.append(trace(fn, shapes[-1], producer_of))
    transfer = shaped(node, shapes, out_shape) if shaped is not None else rule(node, shapes)
    return OpChain(op_name(node), transfer, inputs)
