"""Tensor operations between captured modules (issue 10 item 1), carried by the fused engine.

Exact where the approximation is exact (one hidden layer per branch feeding a scalar output:
every Hessian the sweep passes on is diagonal), against the autograd double-backward loop;
against a recursion written out here where two captured branches meet (cross terms dropped).
"""
import warnings

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import nn

import agents
import hesscale
from reference import exact_diag_by_double_backward
from tiny_env import TinyEnv

TOL = dict(rtol=1e-10, atol=1e-10)


class Ops(nn.Module):
    """Two one-hidden-layer branches joined by known operations into one scalar head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh())  # eval: an affine map
        self.b = nn.Sequential(nn.Linear(3, 2), nn.Sigmoid())
        self.head = nn.Linear(9, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        h = torch.cat([2.0 * a, torch.ones(x.shape[0], 2), b / 3.0], dim=1)  # a constant operand
        h = -(h - torch.linspace(0, 1, 8))  # broadcast constant, negation
        h = h.unsqueeze(1).permute(0, 2, 1).flatten(1)
        h = h.reshape(-1, 2, 4).transpose(1, 2).reshape(-1, 8)
        h = h[:, torch.tensor([7, 0, 1, 2, 3, 4, 5, 6])][..., :]  # indexing (a permutation), slicing
        h = torch.cat([h, torch.zeros(x.shape[0], 1)], 1)
        return self.head(h)


class JointBatch(nn.Module):
    """CrossQ-style joint batch: one trunk on two batches joined along dim 0, stack and cat."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        first, second = x[:, :3], x[:, 3:]
        joint = torch.cat([self.trunk(first), self.trunk(second)], dim=0)
        stacked = torch.stack([self.trunk(first), self.trunk(second)], dim=0).reshape(-1, 4)
        return torch.cat([self.head(joint), self.head(stacked)], dim=0)


@pytest.mark.parametrize("build, width", [(Ops, 3), (JointBatch, 6)])
def test_known_operations_are_exact_where_the_approximation_is(float64, build, width):
    torch.manual_seed(11)
    model = build().eval()
    x = torch.randn(5, width)
    y = torch.randn(model(x).shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no operation left to the exact route
        ours = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y)
    ref = exact_diag_by_double_backward(model, nn.MSELoss(), x, y)
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL, msg=k)


class Meet(nn.Module):
    """Two captured tanh branches and a broadcast ``[N, 1]`` branch meet in ``a + b − 0.5·c``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.c, self.head = nn.Linear(3, 1), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.a(x) + self.b(x) - 0.5 * self.c(x))


def test_branches_meeting_equal_a_recursion_without_cross_terms(float64):
    torch.manual_seed(12)
    model, x, y = Meet(), torch.randn(6, 3), torch.randn(6, 2)
    ours = hesscale.hessian_diagonal(model, nn.MSELoss(), x, y)
    # the recursion, written out: D at the head's output, then each operand gets D (c: 0.25·D,
    # summed over its broadcast dim), tanh by σ'² D + σ'' g with σ', σ'' and g from autograd
    pre = {k: getattr(model, k)[0](x) for k in "ab"}
    outs = {k: torch.tanh(pre[k]) for k in "ab"}
    c = model.c(x)
    out = model.head(outs["a"] + outs["b"] - 0.5 * c)
    grads = dict(zip("ab", torch.autograd.grad(nn.functional.mse_loss(out, y), [outs["a"], outs["b"]])))
    d_out = torch.full_like(out, 2 / out.numel())
    d_h = d_out @ model.head.weight.square()
    h = (outs["a"] + outs["b"] - 0.5 * c).detach()
    ref = {"head.weight": d_out.t() @ h.square(), "head.bias": d_out.sum(0)}
    d_c = (0.25 * d_h).sum(1, keepdim=True)
    ref.update({"c.weight": d_c.t() @ x.square(), "c.bias": d_c.sum(0)})
    for k in "ab":
        t = torch.tanh(pre[k]).detach()
        d_pre = (1 - t**2) ** 2 * d_h + (-2 * t * (1 - t**2)) * grads[k]
        ref.update({f"{k}.0.weight": d_pre.t() @ x.square(), f"{k}.0.bias": d_pre.sum(0)})
    assert ours.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL, msg=k)


def test_unknown_operation_keeps_the_exact_route_and_is_named(float64):
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    with pytest.warns(UserWarning, match=r"made by 'mul of two tensors that need gradients'"):
        with hesscale.capture(model) as cap:
            h = model[0](x)
            out = model[1](h * h)
    assert cap.outside_ops == {"1": "mul of two tensors that need gradients"}
    cap.backward(out.square().mean())
    assert model[0].weight.hess_diag is not None


IMG = spaces.Box(0, 255, (36, 36, 1), np.uint8)


@pytest.mark.parametrize("policy", ["CnnPolicy", "MultiInputPolicy"])
def test_sac_image_critic_concatenation_takes_the_sweep(policy):
    """SB3's critic does ``th.cat([features, actions])`` outside any module: no exact route."""
    obs = IMG if policy == "CnnPolicy" else spaces.Dict({"vec": spaces.Box(-1, 1, (3,), np.float32), "img": IMG})
    env = TinyEnv(obs, spaces.Box(-1, 1, (2,), np.float32))
    kwargs = {"features_dim": 8} if policy == "CnnPolicy" else {"cnn_output_dim": 8}
    model = agents.SAC(policy, env, optimizer={"name": "adahesscale"}, learning_starts=8, batch_size=4,
                       buffer_size=50, seed=0, device="cpu",
                       policy_kwargs=dict(net_arch=[8], features_extractor_kwargs=kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.learn(10)
    cap = model._updates["critic"]._capture
    assert not cap.outside_ops and set(cap.routes.values()) == {"fused"}  # NatureCNN's convolutions too
