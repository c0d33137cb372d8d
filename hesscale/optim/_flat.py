"""Flat buffers: one contiguous tensor per param group (and device, dtype) instead of one per param.

On CPU every kernel launch costs about as much as a small layer's arithmetic. For small groups
(up to ``_common.FLAT_LIMIT`` elements) AdaHesScale keeps its moments as flat tensors
(:class:`FlatState`) and StepSizeScaling does its element-wise work and reductions on flat copies
(:class:`Chunk`): a handful of launches per step instead of several per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _common

__all__ = ["Chunk", "FlatState", "flatten_into", "make_chunks", "partial_sums"]


@dataclass
class FlatState:
    """The moment buffers of a small param group as two flat tensors (per-param state = views)."""

    key: tuple[int, ...]
    sizes: list[int]
    shapes: list[torch.Size]
    exp_avg: Tensor
    exp_avg_sq: Tensor

    @classmethod
    def build(cls, key: tuple[int, ...], params: list[Tensor]) -> FlatState:
        sizes = [p.numel() for p in params]
        zeros = torch.zeros(sum(sizes), dtype=params[0].dtype, device=params[0].device)
        return cls(key, sizes, [p.shape for p in params], zeros, torch.zeros_like(zeros))

    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` cut into per-parameter views of the parameters' shapes."""
        return [x.view(shape) for x, shape in zip(flat.split(self.sizes), self.shapes)]


@dataclass
class Chunk:
    """Parameters of one group that share a device and dtype, with their flat buffers."""

    params: list[Tensor]
    positions: list[int]  # index of each param in the list of the group's stepping params
    before: Tensor  # θ_before, then u = θ_before − θ_after
    work: Tensor  # ĥ, then c, then c·u
    ema: Tensor | None = None  # EMA_beta(ĥ²), flat; per-param views live in the optimizer state
    views: dict[str, list[Tensor]] = field(default_factory=dict)

    @property
    def small(self) -> bool:
        """Small chunks copy into flat buffers (few launches); large ones use per-param views."""
        return self.work.numel() <= _common.FLAT_LIMIT

    def views_of(self, name: str) -> list[Tensor]:
        """Per-parameter views (shaped like the params) into the flat buffer ``name``."""
        if name not in self.views:
            flat = getattr(self, name)
            out, offset = [], 0
            for p in self.params:
                n = p.numel()
                out.append(flat[offset : offset + n].view(p.shape))
                offset += n
            self.views[name] = out
        return self.views[name]


def make_chunks(params: list[Tensor]) -> list[Chunk]:
    """Split ``params`` by (device, dtype) and allocate two flat buffers for each part."""
    parts: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        parts.setdefault((p.device, p.dtype), []).append(i)
    chunks = []
    for (device, dtype), positions in parts.items():
        ps = [params[i] for i in positions]
        n = sum(p.numel() for p in ps)
        chunks.append(
            Chunk(
                params=ps,
                positions=positions,
                before=torch.empty(n, device=device, dtype=dtype),
                work=torch.empty(n, device=device, dtype=dtype),
            )
        )
    return chunks


def flatten_into(chunk: Chunk, name: str, tensors: list[Tensor]) -> Tensor:
    """Copy ``tensors`` (shaped like ``chunk.params``) into the flat buffer ``name``; return it."""
    torch._foreach_copy_(chunk.views_of(name), tensors)
    return getattr(chunk, name)


def partial_sums(chunk: Chunk, name: str, tensors: list[Tensor]) -> list[Tensor]:
    """Sums whose total is ``Σ`` over all entries of ``tensors`` (NaN/inf propagate into them).

    Small chunks sum a flat copy, kept in the buffer ``name``; large ones sum each tensor.
    """
    if chunk.small:
        return [flatten_into(chunk, name, tensors).sum()]
    return [t.sum() for t in tensors]
