"""Policies × action spaces on the curvature path with the ``opt=hesscale`` settings.

``MlpPolicy`` / ``CnnPolicy`` / ``MultiInputPolicy`` × Box / Discrete / MultiDiscrete / MultiBinary
for PPO and A2C, ``MlpPolicy`` × Box for SAC: a few updates, save/load round trips, and the last
layers' ``hess_diag`` at the first step equal to the exact diagonal of the same loss at the same
parameters (a double-backward loop per entry, written here). A last layer's diagonal is exact for
HesScale whenever its per-sample output Hessians are (off-diagonal output terms do not enter it).
float32: SB3's observation preprocessing casts to float32, so a float64 policy cannot be fed.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from torch.nn import functional as F

import agents
from tiny_env import TinyEnv

HESSCALE = {"name": "adahesscale", "curvature": "hesscale", "kwargs": {"eps": 1e-5}, "scaling": {"enabled": True}}
N_STEPS = 16
VEC = spaces.Box(-1, 1, (4,), np.float32)
IMG = spaces.Box(0, 255, (36, 36, 1), np.uint8)  # NatureCNN's smallest input
OBS = {"MlpPolicy": VEC, "CnnPolicy": IMG, "MultiInputPolicy": spaces.Dict({"vec": VEC, "img": IMG})}
ACTIONS = {
    "Box": spaces.Box(-1, 1, (2,), np.float32),
    "Discrete": spaces.Discrete(3),
    "MultiDiscrete": spaces.MultiDiscrete([3, 2]),
    "MultiBinary": spaces.MultiBinary(3),
}
EXTRACTOR_KWARGS = {"CnnPolicy": {"features_dim": 16}, "MultiInputPolicy": {"cnn_output_dim": 16}}


def _exact_diag(loss_fn, param: th.Tensor) -> th.Tensor:
    """``∂²L/∂θ_i²`` for every entry of ``param``, one double backward per entry."""
    (g,) = th.autograd.grad(loss_fn(), param, create_graph=True)
    flat = g.reshape(-1)
    out = th.zeros(param.numel())
    for i in range(param.numel()):
        (h,) = th.autograd.grad(flat[i], param, retain_graph=True)
        out[i] = h.reshape(-1)[i]
    return out.reshape(param.shape)


def _on_policy_loss(model, policy, data):
    """Upstream's PPO / A2C loss for one minibatch, written out (no clipping of the value)."""
    actions = data.actions
    if isinstance(model.action_space, spaces.Discrete):
        actions = actions.long().flatten()
    values, log_prob, entropy = policy.evaluate_actions(data.observations, actions)
    advantages = data.advantages
    if isinstance(model, agents.PPO):
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        ratio = th.exp(log_prob - data.old_log_prob)
        clip = model.clip_range(1.0)
        policy_loss = -th.min(advantages * ratio, advantages * th.clamp(ratio, 1 - clip, 1 + clip)).mean()
    else:
        policy_loss = -(advantages * log_prob).mean()
    return policy_loss - model.ent_coef * entropy.mean() + model.vf_coef * F.mse_loss(data.returns, values.flatten())


def _record_first_step(optimizer, names: list[str], params: dict, record: dict) -> None:
    """Keep the parameters and the named parameters' ``hess_diag`` at the first ``step()``."""
    inner = optimizer.step

    def step(*args, **kwargs):
        if not record:
            record["theta"] = {n: p.detach().clone() for n, p in params.items()}
            record["hess"] = {n: params[n].hess_diag.detach().clone() for n in names}
        return inner(*args, **kwargs)

    optimizer.step = step


@contextlib.contextmanager
def _parameters_at(module, theta: dict):
    """``module``'s parameters set to ``theta`` inside the block (yields them by name), then restored."""
    params = dict(module.named_parameters())
    after = {n: p.detach().clone() for n, p in params.items()}
    with th.no_grad():
        for n, p in params.items():
            p.copy_(theta[n])
    try:
        yield params
    finally:
        with th.no_grad():
            for n, p in params.items():
                p.copy_(after[n])


def _assert_close_to(ours: th.Tensor, ref: th.Tensor, name: str) -> None:
    scale = float(ref.abs().max().clamp_min(1e-6))
    assert float((ours - ref).abs().max()) <= 1e-4 * scale, (name, ours, ref)


def _round_trip(model, tmp_path, env):
    model.save(tmp_path / "model.zip")
    loaded = type(model).load(tmp_path / "model.zip", env=env)
    obs = env.reset()
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values()):
        th.testing.assert_close(a, b)
    loaded.learn(N_STEPS, reset_num_timesteps=False)  # training continues from the loaded state
    assert loaded.divergence is None


CASES = [(algo, policy, action) for algo in ("PPO", "A2C") for policy in OBS for action in ACTIONS]
DEFAULT_RUN = {("PPO", "MlpPolicy", "Box"), ("PPO", "CnnPolicy", "Discrete"),
               ("A2C", "MultiInputPolicy", "MultiDiscrete"), ("A2C", "MlpPolicy", "MultiBinary")}


@pytest.mark.parametrize(
    "algo,policy,action",
    [c if c in DEFAULT_RUN else pytest.param(*c, marks=pytest.mark.slow) for c in CASES],
    ids=["-".join(c) for c in CASES],
)
def test_on_policy_matrix(tmp_path, algo, policy, action):
    from stable_baselines3.common.vec_env import DummyVecEnv

    env = DummyVecEnv([lambda: TinyEnv(OBS[policy], ACTIONS[action])])
    policy_kwargs = dict(net_arch=[8])
    if policy in EXTRACTOR_KWARGS:
        policy_kwargs["features_extractor_kwargs"] = EXTRACTOR_KWARGS[policy]
    extra = dict(batch_size=N_STEPS, n_epochs=1) if algo == "PPO" else {}
    model = getattr(agents, algo)(policy, env, optimizer=HESSCALE, n_steps=N_STEPS, ent_coef=0.01, seed=0,
                                  policy_kwargs=policy_kwargs, max_grad_norm=float("inf"), **extra)  # the loss's own ĥ
    heads = ["action_net.weight", "action_net.bias", "value_net.weight", "value_net.bias"]
    record: dict = {}
    _record_first_step(model.policy.optimizer, heads, dict(model.policy.named_parameters()), record)
    model.learn(N_STEPS)  # one rollout, one update on the whole rollout

    data = next(model.rollout_buffer.get(None))
    with _parameters_at(model.policy, record["theta"]) as params:
        for name in heads:
            exact = _exact_diag(lambda: _on_policy_loss(model, model.policy, data), params[name])
            _assert_close_to(record["hess"][name], exact, name)

    model.learn(2 * N_STEPS, reset_num_timesteps=False)
    assert model.divergence is None and all(th.isfinite(p).all() for p in model.policy.parameters())
    _round_trip(model, tmp_path, env)


def test_sac_box_critic_last_layer_is_exact_and_round_trips(tmp_path):
    """SAC (``MlpPolicy`` × Box): the Q-networks' last layers against ``0.5·Σ MSE``'s exact diagonal
    on the sampled batch (independent of the target); a few updates; save/load."""
    from stable_baselines3.common.vec_env import DummyVecEnv

    env = DummyVecEnv([lambda: TinyEnv(VEC, ACTIONS["Box"])])
    model = agents.SAC("MlpPolicy", env, optimizer=HESSCALE, buffer_size=200, learning_starts=16, batch_size=16,
                       seed=0, policy_kwargs=dict(net_arch=[8]))
    heads = ["qf0.2.weight", "qf0.2.bias", "qf1.2.weight", "qf1.2.bias"]
    record: dict = {}
    _record_first_step(model.critic.optimizer, heads, dict(model.critic.named_parameters()), record)
    batches = []
    sample = model.replay_buffer.sample
    model.replay_buffer.sample = lambda *a, **k: batches.append(sample(*a, **k)) or batches[-1]
    model.learn(17)  # the first gradient step after learning_starts

    batch, target = batches[0], th.randn(16, 1)

    def critic_loss():
        return 0.5 * sum(F.mse_loss(q, target) for q in model.critic(batch.observations, batch.actions))

    with _parameters_at(model.critic, record["theta"]) as params:
        for name in heads:
            _assert_close_to(record["hess"][name], _exact_diag(critic_loss, params[name]), name)
    model.learn(16, reset_num_timesteps=False)
    assert model.divergence is None
    _round_trip(model, tmp_path, env)
