"""Shared pieces of the optimizer tests: parameters, hand-set g and ĥ, both update paths."""
import pytest
import torch

from hesscale.optim import _common


def make_params(shapes, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def draw(params, gen, hess_scale=1.0):
    """Fresh random g and ĥ (ĥ of both signs, like HesScale's) for each param; returns them."""
    gs, hs = [], []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        h = hess_scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad, p.hess_diag = g.clone(), h.clone()
        gs.append(g)
        hs.append(h)
    return gs, hs


@pytest.fixture(params=["flat", "per-tensor"])
def both_paths(request, monkeypatch):
    """Small groups run on flat copies, large ones per tensor: run a test through both."""
    if request.param == "per-tensor":
        monkeypatch.setattr(_common, "FLAT_LIMIT", 0)
    return request.param
