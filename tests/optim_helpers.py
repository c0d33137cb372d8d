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


def assert_steps_in_lockstep(opt, params, twin, twin_params, gen, steps, same=None):
    """Feed both optimizers the same fresh g and ĥ for ``steps`` steps; after each, their params are
    bit-identical (and ``same(opt, twin)`` holds when given)."""
    for _ in range(steps):
        gs, hs = draw(params, gen)
        for q, g, h in zip(twin_params, gs, hs):
            q.grad, q.hess_diag = g.clone(), h.clone()
        opt.step()
        twin.step()
        if same is not None:
            assert same(opt, twin)
        for p, q in zip(params, twin_params):
            assert torch.equal(p.detach(), q.detach())


def assert_rewound_optimizer_continues_identically(opt, params, build, gen, same=None):
    """Save ``opt`` after 2 steps, take 2 more, load the save back into ``opt`` and into a fresh
    ``build(fresh_params)``: both then take bit-identical steps (``same(opt, fresh_opt)`` too)."""
    import io

    for _ in range(2):
        draw(params, gen)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = [p.detach().clone() for p in params]
    for _ in range(2):  # move on, then rewind
        draw(params, gen)
        opt.step()
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    fresh = [torch.nn.Parameter(s.clone()) for s in saved]
    buf.seek(0)
    opt_fresh = build(fresh)
    opt_fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    assert_steps_in_lockstep(opt, params, opt_fresh, fresh, gen, 2, same)
