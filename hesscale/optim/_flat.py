"""Flat buffers: one contiguous tensor per param group (and device, dtype) instead of one per param.

On CPU every kernel launch costs about as much as a small layer's arithmetic. For small groups
(up to ``_common.FLAT_LIMIT`` elements) the optimizers keep their moments as flat tensors
(:class:`FlatState`) and StepSizeScaling does its element-wise work and reductions on flat
buffers (:class:`Chunk`): a handful of launches per step instead of several per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _common

__all__ = ["BUFFERS", "Chunk", "FlatState", "flatten_into", "gather_gh", "make_chunks"]


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


#: the flat work buffers of a :class:`Chunk`; each holds one quantity for a whole step
BUFFERS: dict[str, str] = {
    "gh": "g and ĥ side by side (2n entries; small chunks: one sum checks both for NaN/inf)",
    "theta": "θ at the start of the step",
    "u": "the update u of the wrapped optimizer (θ_after = θ_before − u)",
    "c": "the curvature scale c = sqrt(EMA_beta(ĥ²))",
    "cu": "c·u",
    "ema": "EMA_beta(ĥ²): StepSizeScaling's state (per-param views of it live in its state)",
}


@dataclass
class Chunk:
    """Parameters of one group that share a device and dtype, with named flat buffers (:data:`BUFFERS`)."""

    params: list[Tensor]
    positions: list[int]  # index of each param in the list of the group's stepping params
    buffers: dict[str, Tensor] = field(default_factory=dict)
    views: dict[str, list[Tensor]] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def small(self) -> bool:
        """Small chunks copy into flat buffers (few launches); large ones use per-param views."""
        return self.numel <= _common.FLAT_LIMIT

    def buffer(self, name: str) -> Tensor:
        """The flat buffer ``name`` (allocated on first use; ``ema`` starts at zero)."""
        buf = self.buffers.get(name)
        if buf is None:
            if name not in BUFFERS:
                raise KeyError(f"unknown buffer {name!r}; valid: {', '.join(BUFFERS)}")
            first = self.params[0]
            n = self.numel * (2 if name == "gh" else 1)
            make = torch.zeros if name == "ema" else torch.empty
            buf = self.buffers[name] = make(n, device=first.device, dtype=first.dtype)
        return buf

    def views_of(self, name: str) -> list[Tensor]:
        """Per-parameter views (shaped like the params) into the flat buffer ``name``."""
        if name not in self.views:
            flat = self.buffer(name)
            out, offset = [], 0
            for p in self.params:
                n = p.numel()
                out.append(flat[offset : offset + n].view(p.shape))
                offset += n
            self.views[name] = out
        return self.views[name]


def make_chunks(params: list[Tensor]) -> list[Chunk]:
    """Split ``params`` by (device, dtype)."""
    parts: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        parts.setdefault((p.device, p.dtype), []).append(i)
    return [Chunk([params[i] for i in positions], positions) for positions in parts.values()]


def flatten_into(chunk: Chunk, name: str, tensors: list[Tensor]) -> Tensor:
    """Copy ``tensors`` (shaped like ``chunk.params``) into the flat buffer ``name``; return it."""
    torch._foreach_copy_(chunk.views_of(name), tensors)
    return chunk.buffer(name)


def gather_gh(chunk: Chunk, grads: list[Tensor], hess: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``g`` and ``ĥ`` of a small chunk copied side by side into ``gh`` (one launch): (gh, g, ĥ)."""
    gh = chunk.buffer("gh")
    torch.cat([t.reshape(-1) for t in grads] + [t.reshape(-1) for t in hess], out=gh)
    n = gh.numel() // 2
    return gh, gh[:n], gh[n:]
