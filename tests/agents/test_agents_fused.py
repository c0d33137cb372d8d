"""The agents on the fused engine: the same update as the unfused route, and SB3's default
policies on the fused route end to end.

On the fused route PPO and A2C take the closed-form outside gradients (no autograd call), the
unfused route differentiates the loss by autograd: their agreement checks those closed forms too.
Float64 runs feed the policy float64 observations (SB3's preprocessing casts to float32, so it is
patched here); one rollout and one ``train()`` per agent, not a long run, where clipping
decisions amplify rounding.
"""
from __future__ import annotations

import pytest
import stable_baselines3.common.policies as sb3_policies
import torch as th

import agents

SCALED = {"name": "adahesscale", "kwargs": {"eps": 1e-5}, "scaling": {"enabled": True}}
SETTINGS = {
    # an entropy bonus and value clipping, so that every term of the closed-form head gradients is used
    "ppo": (agents.PPO, dict(n_steps=64, batch_size=32, n_epochs=2, ent_coef=0.01, clip_range_vf=0.1), 64),
    "a2c": (agents.A2C, dict(n_steps=8, ent_coef=0.01), 8),
    "sac": (agents.SAC, dict(learning_starts=32, batch_size=16, buffer_size=200), 34),
}


def _build(algo: str, fused: bool, **extra):
    cls, kwargs, steps = SETTINGS[algo]
    model = cls("MlpPolicy", "Pendulum-v1", optimizer=SCALED, seed=2, device="cpu",
                policy_kwargs=dict(net_arch=[16, 16]), **kwargs, **extra)
    for update in model._updates.values():
        update._capture.fused = fused
    return model, steps


@pytest.mark.parametrize("algo", list(SETTINGS))
def test_fused_and_unfused_routes_give_the_same_update_in_float64(algo, float64, monkeypatch):
    preprocess = sb3_policies.preprocess_obs
    monkeypatch.setattr(sb3_policies, "preprocess_obs", lambda *a, **k: preprocess(*a, **k).double())
    params = {}
    for fused in (True, False):
        model, steps = _build(algo, fused)
        model.learn(steps)
        assert model.divergence is None
        routes = {r for u in model._updates.values() for r in u._capture.routes.values()}
        assert routes == {"fused" if fused else "unfused"}
        params[fused] = [p.detach().clone() for p in model.policy.parameters()]
    for a, b in zip(params[True], params[False]):
        assert a.dtype == th.float64
        th.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("algo", list(SETTINGS))
def test_sb3_default_policies_take_the_fused_route_end_to_end(algo):
    model, steps = _build(algo, True)
    model.learn(steps)
    for name, update in model._updates.items():
        cap = update._capture
        leaves = {path for path, module, _ in cap._leaves if any(True for _ in module.parameters())}
        assert leaves <= cap.routes.keys(), name
        assert set(cap.routes.values()) == {"fused"} and not cap.outside_ops, (name, cap.routes, cap.outside_ops)
