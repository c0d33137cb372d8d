"""The agents against upstream Stable-Baselines3 (same seed, same hyperparameters, Pendulum-v1).

* Control arm: a first-order optimizer without scaling *is* SB3 — parameters bit-identical.
* The curvature path's rewritten ``train()`` driven by plain Adam (scaling off) reproduces SB3's
  parameters to float rounding, so its loss code cannot drift from upstream's.
* The upstream ``train()`` methods those copies follow are pinned by a fingerprint of their
  source, so an SB3 upgrade fails loudly instead of drifting.
"""

from __future__ import annotations

import hashlib
import inspect

import pytest
import stable_baselines3 as sb3
import torch as th

import agents

NET = dict(net_arch=[16, 16])
SETTINGS = {
    "ppo": dict(n_steps=64, batch_size=32, n_epochs=2, policy_kwargs=NET),
    "a2c": dict(n_steps=8, policy_kwargs=NET),
    "sac": dict(learning_starts=64, batch_size=32, buffer_size=1000, policy_kwargs=NET),
}
STEPS = {"ppo": 192, "a2c": 48, "sac": 96}  # 3 rollouts / 6 updates / 32 gradient steps
OURS = {"ppo": agents.PPO, "a2c": agents.A2C, "sac": agents.SAC}
UPSTREAM = {"ppo": sb3.PPO, "a2c": sb3.A2C, "sac": sb3.SAC}


# sha256 of ``inspect.getsource(<SB3 class>.train)`` for stable-baselines3 2.9.2
UPSTREAM_TRAIN_SHA256 = {"ppo": "7c8d09940123242f", "a2c": "298ebd063ccbd989", "sac": "0ac7abe1c18ba7fe"}


@pytest.mark.parametrize("algo", ["ppo", "a2c", "sac"])
def test_upstream_train_source_is_the_one_copied(algo):
    """``agents/<algo>.py``'s ``_train_curvature`` is upstream's ``train()`` with the optimisation
    block replaced (SB3 has no narrower override point). If SB3 changes that method, re-diff the
    copy against the new source, then update the fingerprint here."""
    source = inspect.getsource(UPSTREAM[algo].train)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    assert digest == UPSTREAM_TRAIN_SHA256[algo], (
        f"stable-baselines3 {sb3.__version__}: {UPSTREAM[algo].__name__}.train() changed "
        f"(sha256 {digest}); re-diff agents/{algo}.py _train_curvature against it"
    )
    assert OURS[algo]._train_curvature.__doc__.startswith(f"Upstream ``{UPSTREAM[algo].__name__}.train()`` (SB3 2.9.2)")


def _params(model) -> list[th.Tensor]:
    return [p.detach().clone() for p in model.policy.parameters()]


def _run(cls, algo, seed=0, optimizer="__none__", **extra):
    kwargs = {**SETTINGS[algo], **extra}
    kwargs["policy_kwargs"] = dict(kwargs["policy_kwargs"])  # SB3's A2C writes into policy_kwargs
    if optimizer != "__none__":
        kwargs["optimizer"] = optimizer
    model = cls("MlpPolicy", "Pendulum-v1", seed=seed, device="cpu", **kwargs)
    model.learn(STEPS[algo])
    return model


def _max_rel(a: list[th.Tensor], b: list[th.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b))


@pytest.mark.parametrize("algo", ["ppo", "a2c", "sac"])
def test_control_arm_is_bit_identical(algo):
    upstream = _params(_run(UPSTREAM[algo], algo))
    for optimizer in (None, {"name": agents.optimizers.SB3_DEFAULT_NAME[algo]}, {"name": "adam" if algo != "a2c" else "rmsprop", "kwargs": {}}):
        ours = _run(OURS[algo], algo, optimizer=optimizer)
        assert not ours.uses_curvature
        assert ours.divergence is None
        for x, y in zip(_params(ours), upstream):
            assert th.equal(x, y), f"{algo} {optimizer}: parameters differ from upstream SB3"
    # the learning really moved the parameters (so equality is not trivial)
    fresh = _params(UPSTREAM[algo]("MlpPolicy", "Pendulum-v1", seed=0, device="cpu", **{**SETTINGS[algo], "policy_kwargs": dict(NET)}))
    assert any(not th.equal(x, y) for x, y in zip(fresh, upstream))


def test_a2c_adam_is_sb3s_adam():
    upstream = _params(_run(sb3.A2C, "a2c", use_rms_prop=False))
    ours = _run(agents.A2C, "a2c", optimizer={"name": "adam"})
    assert isinstance(ours.policy.optimizer, th.optim.Adam)
    assert ours.policy.optimizer.defaults["eps"] == 1e-5
    for x, y in zip(_params(ours), upstream):
        assert th.equal(x, y)


@pytest.mark.parametrize("algo", ["ppo", "a2c", "sac"])
def test_curvature_train_with_plain_adam_reproduces_upstream(algo):
    # Both with clipping switched off (max_grad_norm=inf: SB3's clip_grad_norm_ multiplies by exactly 1).
    upstream_kwargs = {"max_grad_norm": float("inf")} if algo != "sac" else {}
    up_kwargs_a2c = {"use_rms_prop": False} if algo == "a2c" else {}
    upstream = _params(_run(UPSTREAM[algo], algo, **upstream_kwargs, **up_kwargs_a2c))
    ours = _run(OURS[algo], algo, optimizer={"name": "adam"}, force_curvature_path=True, **upstream_kwargs)
    assert ours.uses_curvature and ours._updates  # really our train()
    assert _max_rel(_params(ours), upstream) <= 1e-6
    # and it is not trivially equal to the initial parameters
    fresh = _params(OURS[algo]("MlpPolicy", "Pendulum-v1", seed=0, device="cpu", **{**SETTINGS[algo], "policy_kwargs": dict(NET)}))
    assert _max_rel(fresh, upstream) > 1e-4


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
@pytest.mark.parametrize("max_grad_norm", [1e-3, float("inf")])
def test_curvature_path_clips_as_sb3_clips_adam(algo, max_grad_norm):
    """Fair arms: the curvature path clips with the algorithm's own ``max_grad_norm``, exactly as
    SB3 clips Adam (Scaled Adam with a huge δ has α = 1, so its step is Adam's); 1e-3 clips every
    update, ``inf`` (the config's ``clip_grad_norm: false``) switches clipping off on both paths."""
    up_kwargs_a2c = {"use_rms_prop": False} if algo == "a2c" else {}
    upstream = _params(_run(UPSTREAM[algo], algo, max_grad_norm=max_grad_norm, **up_kwargs_a2c))
    opt = {"name": "adam", "scaling": {"enabled": True, "delta": 1e30}}
    ours = _run(OURS[algo], algo, optimizer=opt, max_grad_norm=max_grad_norm)
    assert ours.uses_curvature
    assert ours._updates["policy"].max_grad_norm == (None if max_grad_norm == float("inf") else max_grad_norm)
    assert set(ours.policy.optimizer.last_scales.values()) == {1.0}
    assert _max_rel(_params(ours), upstream) <= 1e-5
    if max_grad_norm < 1.0:  # the clipping really changed the result, so the match is not trivial
        unclipped = _params(_run(UPSTREAM[algo], algo, max_grad_norm=float("inf"), **up_kwargs_a2c))
        assert _max_rel(unclipped, upstream) > 1e-3


def test_scaled_adam_with_unit_scale_matches_upstream_sac():
    """SAC never clips (SB3's has no max_grad_norm), on neither path: α = 1 gives SB3's Adam steps."""
    upstream = _params(_run(UPSTREAM["sac"], "sac"))
    ours = _run(OURS["sac"], "sac", optimizer={"name": "adam", "scaling": {"enabled": True, "delta": 1e30}})
    assert all(u.max_grad_norm is None for u in ours._updates.values())
    for update in ours._updates.values():
        assert set(update.optimizer.last_scales.values()) == {1.0}
        assert update.optimizer.last_route == "fused"  # SB3's default policies: no parameter snapshot
    assert _max_rel(_params(ours), upstream) <= 1e-5


def test_sac_critic_on_sb3s_adam_is_sb3s_critic_update():
    """``critic_optimizer="adam"``: the critic is SB3's (torch Adam, ``loss.backward()``, no
    scaling) while the actor takes the curvature path; with α = 1 on the actor the whole run is
    upstream's SAC."""
    upstream = _params(_run(UPSTREAM["sac"], "sac"))
    opt = {"name": "adam", "scaling": {"enabled": True, "delta": 1e30}, "critic_optimizer": "adam"}
    ours = _run(OURS["sac"], "sac", optimizer=opt)
    assert type(ours.critic.optimizer) is th.optim.Adam and ours.critic.optimizer.defaults["eps"] == 1e-8
    assert ours._updates["critic"].first_order and ours._updates["critic"]._capture is None
    assert set(ours.actor.optimizer.last_scales.values()) == {1.0}
    assert _max_rel(_params(ours), upstream) <= 1e-5


OPTIONS = {
    "ppo": dict(target_kl=1e-8, clip_range_vf=0.05, normalize_advantage=False, ent_coef=0.01, vf_coef=0.3),
    "a2c": dict(normalize_advantage=True, ent_coef=0.01, gae_lambda=0.9),
    "sac": dict(target_update_interval=2, ent_coef=0.2, tau=0.01),
}


@pytest.mark.parametrize("algo", ["ppo", "a2c", "sac"])
def test_curvature_train_honours_upstream_options(algo):
    """target_kl / clip_range_vf / normalize_advantage / ent_coef / target_update_interval ... reach
    the curvature path exactly as upstream's train() uses them."""
    upstream_kwargs = {"max_grad_norm": 1e30} if algo != "sac" else {}
    a2c = {"use_rms_prop": False} if algo == "a2c" else {}
    upstream_model = _run(UPSTREAM[algo], algo, **upstream_kwargs, **a2c, **OPTIONS[algo])
    ours = _run(OURS[algo], algo, optimizer={"name": "adam"}, force_curvature_path=True, **upstream_kwargs,
                **OPTIONS[algo])
    assert _max_rel(_params(ours), _params(upstream_model)) <= 1e-6
    if algo == "ppo":  # early stopping really happened: fewer than n_epochs passes per rollout
        assert ours._n_updates == upstream_model._n_updates < 3 * 2
    default = _run(OURS[algo], algo, optimizer={"name": "adam"}, force_curvature_path=True, **upstream_kwargs)
    assert _max_rel(_params(default), _params(upstream_model)) > 1e-4  # the options mattered
