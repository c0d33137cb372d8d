"""Short real runs of every agent × optimizer: they train, log the curvature diagnostics to
TensorBoard, save/load round-trips; divergence stops a run cleanly; the optimizer dict is validated.
"""

from __future__ import annotations

import glob
import logging

import gymnasium as gym
import hesscale
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import agents

NET = [16, 16]
OPTIMIZERS = {
    "adam": {"name": "adam"},
    "adahesscale": {"name": "adahesscale", "kwargs": {"eps": 1e-5, "betas": (0.9, 0.99)}},
    "scaled_adahesscale": {"name": "adahesscale", "kwargs": {"eps": 1e-5}, "scaling": {"enabled": True}},
    "scaled_adam": {"name": "adam", "scaling": {"enabled": True}},
}
GROUPS = {"ppo": ("pi", "log_std", "vf"), "a2c": ("pi", "log_std", "vf"), "sac": ("actor", "critic")}


def _make(algo: str, env_id: str, optimizer, tmp_path, **extra):
    common = dict(seed=0, device="cpu", tensorboard_log=str(tmp_path), optimizer=optimizer)
    if algo == "ppo":
        return agents.PPO("MlpPolicy", env_id, n_steps=64, batch_size=32, n_epochs=2,
                          policy_kwargs=dict(net_arch=NET), **common, **extra), 64 * 3
    if algo == "a2c":
        return agents.A2C("MlpPolicy", env_id, n_steps=8, policy_kwargs=dict(net_arch=NET), **common, **extra), 8 * 4
    # SAC logs at the end of an episode: episodes are 200 steps on Pendulum-v1.
    return agents.SAC("MlpPolicy", env_id, learning_starts=150, batch_size=32, buffer_size=2000, train_freq=4,
                      policy_kwargs=dict(net_arch=NET), **common, **extra), 240


def _tb_tags(tmp_path) -> set[str]:
    tags: set[str] = set()
    for path in glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def _check_run(algo, env_id, opt_name, tmp_path):
    model, steps = _make(algo, env_id, OPTIMIZERS[opt_name], tmp_path)
    model.learn(steps, log_interval=1)
    assert model.divergence is None
    tags = _tb_tags(tmp_path)
    assert "train/learning_rate" in tags
    curvature = opt_name != "adam"
    for group in GROUPS[algo]:
        assert (f"train/hess_diag_mean/{group}" in tags) == curvature, (group, sorted(tags))
        assert (f"train/hess_diag_max/{group}" in tags) == curvature
        assert (f"train/step_scale/{group}" in tags) == opt_name.startswith("scaled")
    assert ("train/skipped_steps" in tags) == curvature

    # save / load without extra arguments: same optimizer, same deterministic actions, resumes.
    path = tmp_path / "model.zip"
    model.save(path)
    loaded = type(model).load(path, device="cpu")
    assert loaded.optimizer_config == model.optimizer_config
    opt = loaded.policy.optimizer if algo != "sac" else loaded.actor.optimizer
    ref = model.policy.optimizer if algo != "sac" else model.actor.optimizer
    assert type(opt) is type(ref)
    assert str(opt.state_dict()) == str(ref.state_dict())
    obs = np.stack([model.observation_space.sample() for _ in range(8)])
    a1, _ = model.predict(obs, deterministic=True)
    a2, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(a1, a2)
    loaded.set_env(gym.make(env_id))
    loaded.learn(steps // 2, reset_num_timesteps=False)
    assert loaded.divergence is None


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("algo", ["ppo", "a2c", "sac"])
def test_short_runs_log_and_round_trip_pendulum(algo, opt_name, tmp_path):
    _check_run(algo, "Pendulum-v1", opt_name, tmp_path)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("algo", ["ppo", "a2c", "sac"])
def test_short_runs_log_and_round_trip_mujoco(algo, opt_name, tmp_path):
    _check_run(algo, "InvertedPendulum-v5", opt_name, tmp_path)


@pytest.mark.parametrize("algo", ["ppo", "a2c", "sac"])
@pytest.mark.parametrize("name", ["adahessian", "rmsprop", "sgd"])
def test_other_optimizers_scaled_run(algo, name, tmp_path):
    model, steps = _make(algo, "Pendulum-v1", {"name": name, "scaling": {"enabled": True}}, tmp_path)
    model.learn(steps // 2 if algo != "sac" else 170)
    assert model.divergence is None


# -- divergence -----------------------------------------------------------------------------
class _Poison(BaseCallback):
    """Sets one policy parameter to NaN after ``at`` environment steps."""

    def __init__(self, at: int, module: str):
        super().__init__()
        self.at, self.module = at, module

    def _on_step(self) -> bool:
        if self.num_timesteps == self.at:
            with th.no_grad():
                dict(self.model.policy.named_parameters())[self.module].fill_(float("nan"))
        return True


@pytest.mark.parametrize("opt_name", ["adam", "scaled_adahesscale"])
@pytest.mark.parametrize("algo", ["ppo", "a2c", "sac"])
def test_divergence_stops_cleanly(algo, opt_name, tmp_path, caplog):
    model, steps = _make(algo, "Pendulum-v1", OPTIMIZERS[opt_name], tmp_path)
    # the critic's head: actions stay finite, so the NaN shows in the loss/update
    module = {"ppo": "value_net.bias", "a2c": "value_net.bias", "sac": "critic.qf0.4.bias"}[algo]
    at = {"ppo": 70, "a2c": 12, "sac": 170}[algo]
    with caplog.at_level(logging.WARNING, logger="agents"):
        model.learn(steps * 3, callback=_Poison(at, module))
    assert model.divergence is not None, "the run should be marked diverged"
    assert at <= model.divergence["step"] < steps * 3
    assert model.num_timesteps < steps * 3  # learn() stopped early
    assert "diverged" in caplog.text
    assert "train/diverged" in _tb_tags(tmp_path)
    n = model.num_timesteps
    model.learn(steps, reset_num_timesteps=False)  # a diverged model does not train again
    assert model.num_timesteps == n
    path = tmp_path / "diverged.zip"
    model.save(path)
    assert type(model).load(path).divergence == model.divergence


@pytest.mark.parametrize("algo", ["ppo", "sac"])
def test_nan_actions_are_a_divergence_not_a_crash(algo, tmp_path):
    model, steps = _make(algo, "Pendulum-v1", OPTIMIZERS["scaled_adahesscale"], tmp_path)
    module = {"ppo": "action_net.bias", "sac": "actor.mu.bias"}[algo]
    model.learn(steps * 2, callback=_Poison(170 if algo == "sac" else 10, module))
    assert model.divergence is not None
    assert model.num_timesteps < steps * 2


# -- the optimizer dict -------------------------------------------------------------------
def test_config_defaults_and_validation():
    cfg = agents.normalize_optimizer_config(None, "a2c")
    assert cfg == {"name": "rmsprop", "curvature": "hesscale", "kwargs": {},
                   "scaling": {"enabled": False, "delta": 1e-8, "max_scale": 1.0, "beta": 0.999},
                   "actor_curvature": "gn", "critic_optimizer": None}
    assert agents.normalize_optimizer_config({"scaling": {"enabled": True}}, "ppo")["name"] == "adam"
    with pytest.raises(ValueError, match="'adamw'.*'adam', 'rmsprop', 'sgd', 'adahesscale', 'adahessian'"):
        agents.normalize_optimizer_config({"name": "adamw"}, "ppo")
    with pytest.raises(ValueError, match="'lrate'.*'name'"):
        agents.normalize_optimizer_config({"lrate": 1.0}, "ppo")
    with pytest.raises(ValueError, match="'kfac'.*'hesscale', 'hesscale_gn', 'bl89'"):
        agents.normalize_optimizer_config({"name": "adahesscale", "curvature": "kfac"}, "ppo")
    with pytest.raises(ValueError, match="'gamma'.*'enabled'"):
        agents.normalize_optimizer_config({"scaling": {"gamma": 1}}, "ppo")
    with pytest.raises(ValueError, match="'approx'.*'gn', 'exact'"):
        agents.normalize_optimizer_config({"actor_curvature": "approx"}, "sac")
    with pytest.raises(ValueError, match="'adahesscale'.*'adam', 'rmsprop', 'sgd'"):
        agents.normalize_optimizer_config({"name": "adahesscale", "critic_optimizer": "adahesscale"}, "sac")
    with pytest.raises(ValueError, match="critic_optimizer='adam' is SAC's; PPO has one optimizer"):
        agents.normalize_optimizer_config({"name": "adahesscale", "critic_optimizer": "adam"}, "ppo")
    with pytest.raises(ValueError, match="critic_optimizer='adam' needs a curvature optimizer or scaling"):
        agents.normalize_optimizer_config({"name": "adam", "critic_optimizer": "adam"}, "sac")
    assert agents.normalize_optimizer_config({"name": "adahesscale", "critic_optimizer": "Adam"}, "sac")[
        "critic_optimizer"] == "adam"
    with pytest.raises(ValueError, match="delta"):
        agents.normalize_optimizer_config({"scaling": {"enabled": True, "delta": 0}}, "ppo")
    with pytest.raises(ValueError, match="'max_grad_norm' .*removed.*algorithm's own max_grad_norm"):
        agents.normalize_optimizer_config({"name": "adahesscale", "max_grad_norm": 0.5}, "ppo")
    # the removed key's old default (a dict stored with a model saved earlier) is dropped
    assert "max_grad_norm" not in agents.normalize_optimizer_config({"max_grad_norm": None}, "ppo")
    with pytest.raises(ValueError, match="lr"):
        agents.normalize_optimizer_config({"kwargs": {"lr": 1.0}}, "ppo")
    with pytest.raises(ValueError, match="ddpg"):
        agents.normalize_optimizer_config(None, "ddpg")
    # a Hydra node is stored as plain containers (so save/load needs no omegaconf objects)
    from omegaconf import OmegaConf

    node = OmegaConf.create({"name": "adam", "kwargs": {"betas": [0.9, 0.99]}, "scaling": {"enabled": True}})
    cfg = agents.normalize_optimizer_config(node, "sac")
    assert type(cfg["kwargs"]) is dict and cfg["kwargs"]["betas"] == (0.9, 0.99) and cfg["scaling"]["enabled"]


def test_constructor_rejects_bad_choices():
    with pytest.raises(ValueError, match="'hessscale'"):
        agents.PPO("MlpPolicy", "Pendulum-v1", optimizer={"name": "hessscale"})
    with pytest.raises(hesscale.UnsupportedModuleError, match="Hardswish"):
        agents.PPO("MlpPolicy", "Pendulum-v1", optimizer={"name": "adahesscale"},
                   policy_kwargs=dict(activation_fn=th.nn.Hardswish))
    with pytest.raises(ValueError, match="not both"):
        agents.PPO("MlpPolicy", "Pendulum-v1", optimizer={"name": "adam"},
                   policy_kwargs=dict(optimizer_class=th.optim.SGD))


def test_first_order_kwargs_reach_sb3s_optimizer():
    model = agents.PPO("MlpPolicy", "Pendulum-v1", optimizer={"name": "adam", "kwargs": {"betas": [0.8, 0.9]}})
    assert model.policy.optimizer.defaults["betas"] == (0.8, 0.9)
    assert model.policy.optimizer.defaults["eps"] == 1e-5  # SB3's default kept underneath
    model = agents.SAC("MlpPolicy", "Pendulum-v1", optimizer={"name": "sgd", "kwargs": {"momentum": 0.9}})
    assert isinstance(model.critic.optimizer, th.optim.SGD) and model.critic.optimizer.defaults["momentum"] == 0.9


def test_learning_rate_schedule_reaches_curvature_optimizer():
    model = agents.PPO("MlpPolicy", "Pendulum-v1", optimizer=OPTIMIZERS["scaled_adahesscale"], n_steps=32,
                       batch_size=32, n_epochs=1, learning_rate=lambda progress: 1e-3 * (0.5 + progress),
                       policy_kwargs=dict(net_arch=NET))
    model.learn(64)
    lrs = [g["lr"] for g in model.policy.optimizer.optimizer.param_groups]
    assert lrs == pytest.approx([1e-3 * 0.5] * 3)
