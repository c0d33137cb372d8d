"""Which leaf modules a capture records, and where its warnings point."""
from __future__ import annotations

import os
import sys
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_INTERNAL_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def caller_stacklevel() -> int:
    """``stacklevel`` of the first frame outside torch and hesscale: the line whose forward code
    called the module (a warning then points there, not into ``nn.Module.__call__``)."""
    frame, level = sys._getframe(2), 2  # level 1: the hook that calls this and warns
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def named_roots(modules: nn.Module | Iterable[nn.Module] | Mapping[str, nn.Module]) -> list[tuple[str, nn.Module]]:
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


def leaf_modules(roots: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
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


def direct_params_of_non_leaves(roots: Sequence[nn.Module]) -> list[nn.Parameter]:
    params = []
    for root in roots:
        for module in root.modules():
            if next(module.children(), None) is not None:
                params.extend(module.parameters(recurse=False))
    return params
