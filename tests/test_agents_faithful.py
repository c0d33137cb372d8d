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
    # Upstream with effectively no clipping (the curvature path's default is no clipping);
    # clip_grad_norm_ then multiplies by exactly 1.
    upstream_kwargs = {"max_grad_norm": 1e30} if algo != "sac" else {}
    up_kwargs_a2c = {"use_rms_prop": False} if algo == "a2c" else {}
    upstream = _params(_run(UPSTREAM[algo], algo, **upstream_kwargs, **up_kwargs_a2c))
    ours = _run(OURS[algo], algo, optimizer={"name": "adam"}, force_curvature_path=True, **upstream_kwargs)
    assert ours.uses_curvature and ours._updates  # really our train()
    assert _max_rel(_params(ours), upstream) <= 1e-6
    # and it is not trivially equal to the initial parameters
    fresh = _params(OURS[algo]("MlpPolicy", "Pendulum-v1", seed=0, device="cpu", **{**SETTINGS[algo], "policy_kwargs": dict(NET)}))
    assert _max_rel(fresh, upstream) > 1e-4


@pytest.mark.parametrize("algo", ["ppo", "a2c", "sac"])
def test_scaled_adam_with_unit_scale_and_clipping_matches_upstream(algo):
    """Public API: StepSizeScaling(Adam) with a huge delta gives α = 1, so the step is Adam's; the
    dict's max_grad_norm clips exactly as SB3 does."""
    clip = {} if algo == "sac" else {"max_grad_norm": 0.5}
    up_kwargs_a2c = {"use_rms_prop": False} if algo == "a2c" else {}
    upstream = _params(_run(UPSTREAM[algo], algo, **clip, **up_kwargs_a2c))
    opt = {"name": "adam", "scaling": {"enabled": True, "delta": 1e30}, "max_grad_norm": clip.get("max_grad_norm")}
    ours = _run(OURS[algo], algo, optimizer=opt)
    assert ours.uses_curvature
    for update in ours._updates.values():
        assert set(update.optimizer.last_scales.values()) == {1.0}
        assert update.optimizer.last_route == "fused"  # SB3's default policies: no parameter snapshot
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
