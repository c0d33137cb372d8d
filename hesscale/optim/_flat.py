"""Flat buffers: one contiguous tensor per param group (and device, dtype) instead of one per param.

On CPU every kernel launch costs about as much as a small layer's arithmetic. For small groups
(up to ``_common.FLAT_LIMIT`` elements) the optimizers keep their moments as flat tensors
(:class:`FlatLayout`) and StepSizeScaling does its element-wise work and reductions on flat
buffers (:class:`Chunk`): a handful of launches per step instead of several per parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import _common

__all__ = ["BUFFERS", "Chunk", "FlatLayout", "GradientStorage", "build_flat_layout", "cached_chunks", "flatten_into",
           "gather_gh", "make_chunks", "param_views"]


@dataclass
class FlatLayout:
    """An optimizer's state of a small param group as one flat tensor per key; the per-param state
    entries are views of them (so ``state_dict`` and the optimizer's own step see the same values)."""

    key: tuple[int, ...]  # ids of the params, in order
    views: dict[str, list[Tensor]] = field(default_factory=dict)
    flat: dict[str, Tensor | None] = field(default_factory=dict)  # None: a lazy key not created yet
    steps: Tensor | None = None  # torch's per-param step tensors as one flat tensor (their views in the state)

    def intact(self, params: list[Tensor], states: list[dict[str, Any]], step: str | None) -> bool:
        """True while the params are the same and every per-param state entry is still this layout's
        view (no ``load_state_dict`` since); for integer step counts, while they are all equal."""
        if self.key != tuple(id(p) for p in params):
            return False
        for key, views in self.views.items():
            if any(st.get(key) is not view for st, view in zip(states, views)):
                return False
        return step != "int" or len({st["step"] for st in states}) == 1

    def adopt(self, key: str, flat: Tensor, params: list[Tensor], states: list[dict[str, Any]]) -> None:
        """Make ``flat`` the tensor of ``key`` and put views of it into the per-param state."""
        self.flat[key] = flat
        self.views[key] = param_views(params, flat)
        for st, view in zip(states, self.views[key]):
            st[key] = view


def build_flat_layout(params: list[Tensor], states: list[dict[str, Any]], keys: tuple[str, ...],
                      lazy: tuple[str, ...] = (), step: str | None = None) -> FlatLayout | None:
    """Copy the per-param state ``keys`` (and ``lazy`` keys where present) into flat tensors and put
    views of them in its place. ``step``: ``"tensor"`` (torch's step tensors, made views of one flat
    tensor), ``"int"`` or None. None (nothing changed) when the step counts differ, or a lazy key
    exists for some params only."""
    if step is not None and len({float(st["step"]) for st in states}) != 1:
        return None
    present = {key: [key in st for st in states] for key in keys + lazy}
    if any(any(has) and not all(has) for has in present.values()):
        return None
    layout = FlatLayout(tuple(id(p) for p in params))
    for key in keys + lazy:
        if all(present[key]):
            layout.adopt(key, torch.cat([st[key].reshape(-1) for st in states]), params, states)
        else:
            layout.flat[key] = None
    if step == "tensor":
        layout.steps = torch.stack([st["step"] for st in states])
        for i, st in enumerate(states):
            st["step"] = layout.steps[i]
        layout.views["step"] = [st["step"] for st in states]
    return layout


#: the flat work buffers of a :class:`Chunk`; each holds one quantity for a whole step
BUFFERS: dict[str, str] = {
    "gh": "g and ĥ side by side (2n entries; small chunks: one sum checks both for NaN/inf)",
    "theta": "θ at the start of the step",
    "u": "the update u of the wrapped optimizer (θ_after = θ_before − u)",
    "c": "the curvature scale c = sqrt(EMA_beta(ĥ²)), multiplied by u in place for T = Σ (c·u)·u",
    "ema": "EMA_beta(ĥ²): StepSizeScaling's state (per-param views of it live in its state)",
}


@dataclass
class Chunk:
    """Parameters of one group that share a device and dtype, with named flat buffers (:data:`BUFFERS`)."""

    params: list[Tensor]
    positions: list[int]  # index of each param in the list of the group's stepping params
    buffers: dict[str, Tensor] = field(default_factory=dict)
    views: dict[str, list[Tensor]] = field(default_factory=dict)
    _halves: tuple[Tensor, Tensor] | None = None
    _spans: dict[tuple[int, ...], list[tuple[int, int]]] = field(default_factory=dict)
    numel: int = field(init=False)  # entries of all params (a chunk's params never change)

    def __post_init__(self) -> None:
        self.numel = sum(p.numel() for p in self.params)

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

    def halves(self) -> tuple[Tensor, Tensor]:
        """The ``g`` and ``ĥ`` halves of ``gh`` as flat views (made once)."""
        if self._halves is None:
            gh, n = self.buffer("gh"), self.numel
            self._halves = (gh[:n], gh[n:])
        return self._halves

    def spans(self, counts: tuple[int, ...]) -> list[tuple[int, int]]:
        """The entry ranges ``[a, b)`` of consecutive runs of ``counts`` params (the groups of a
        batch, in order); made once per ``counts``."""
        cached = self._spans.get(counts)
        if cached is None:
            ends = [0]
            for p in self.params:
                ends.append(ends[-1] + p.numel())
            firsts = [sum(counts[:i]) for i in range(len(counts) + 1)]
            cached = self._spans[counts] = [(ends[a], ends[b]) for a, b in zip(firsts, firsts[1:])]
        return cached

    def views_of(self, name: str) -> list[Tensor]:
        """Per-parameter views (shaped like the params) into the flat buffer ``name`` ("g", "h": the
        halves of ``gh``); made once."""
        if name not in self.views:
            if name in ("g", "h"):
                flat = self.halves()[0 if name == "g" else 1]
            else:
                flat = self.buffer(name)
            self.views[name] = param_views(self.params, flat)
        return self.views[name]


def param_views(params: list[Tensor], flat: Tensor) -> list[Tensor]:
    """``flat`` cut into consecutive views shaped like ``params``."""
    return [x.view_as(p) for x, p in zip(flat.split([p.numel() for p in params]), params)]


def cached_chunks(store: dict[Any, tuple[tuple[int, ...], list[Chunk]]], slot: Any, params: list[Tensor]) -> list[Chunk]:
    """The chunks of ``slot`` (a group's index, or a batch's) kept in ``store``, made anew when its
    stepping params changed."""
    key = tuple(id(p) for p in params)
    cached = store.get(slot)
    if cached is None or cached[0] != key:
        cached = store[slot] = (key, make_chunks(params))
    return cached[1]


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


def gather_gh(chunk: Chunk, grads: list[Tensor], hess: list[Tensor],
              storage: GradientStorage | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``g`` and ``ĥ`` of a small chunk copied side by side into ``gh`` (one launch into the cached
    per-param views, no reshapes): (gh, g, ĥ). A tensor that already is its view (the backward
    wrote it there, see :class:`GradientStorage`) is not copied; ``storage`` notes the chunk."""
    moved = [(v, t) for v, t in zip(chunk.views_of("g") + chunk.views_of("h"), grads + hess) if v is not t]
    if moved:
        torch._foreach_copy_([v for v, _ in moved], [t for _, t in moved])
    if storage is not None:
        storage.note(chunk)
    g, h = chunk.halves()
    return chunk.buffer("gh"), g, h


class GradientStorage:
    """Where the next backward may write each parameter's gradient and ĥ: its views into the
    ``gh`` buffers of the flat chunks the optimizer gathered into at its last step.

    ``hesscale.capture.backward(into=views)`` makes ``p.grad`` and ``p.hess_diag`` those views
    (for a parameter whose ``grad`` is None), so the next :func:`gather_gh` copies nothing. Like
    ``zero_grad(set_to_none=False)``, this reuses the tensors: a reference to an old ``p.grad``
    sees the next backward's values. Correctness never depends on it being current: a tensor that
    is not its chunk's view is copied as before.
    """

    def __init__(self) -> None:
        self.views: dict[Tensor, tuple[Tensor, Tensor]] = {}
        self._noted: list[Chunk] = []
        self._chunks: list[Chunk] = []

    def note(self, chunk: Chunk) -> None:
        """``chunk`` was gathered into during this step."""
        self._noted.append(chunk)

    def settle(self) -> None:
        """End of a step: the views are those of the chunks noted in it (rebuilt when they changed)."""
        if len(self._noted) != len(self._chunks) or any(a is not b for a, b in zip(self._noted, self._chunks)):
            self._chunks = self._noted
            self.views = {p: (g, h) for ch in self._chunks
                          for p, g, h in zip(ch.params, ch.views_of("g"), ch.views_of("h"))}
        self._noted = []
