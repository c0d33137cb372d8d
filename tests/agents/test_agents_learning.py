"""PPO with Scaled AdaHesScale learns CartPole-v1 (15–30 s per seed on one core).

Protocol, calibrated on Adam: RL Zoo's PPO CartPole-v1 hyperparameters (8 envs, n_steps 32,
batch 256, 20 epochs, γ 0.98, λ 0.8, linearly decaying lr 1e-3 and clip range 0.2); a separate
evaluation env every 8,192 steps (5 deterministic episodes); training stops once the mean
evaluation return reaches 400 (of 500), within 65,536 steps. SB3's Adam reaches 500 within
50,000 steps with these settings. Scaled AdaHesScale uses δ = 1e-4 (the paper's 1e-8 is far too
conservative for so short a budget: it shrinks the critic's steps ~150×).
"""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch as th
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor

import agents

THRESHOLD = 400.0
BUDGET = 65_536
SCALED_ADAHESSCALE = {"name": "adahesscale", "kwargs": {"eps": 1e-5}, "scaling": {"enabled": True, "delta": 1e-4}}


def learn_cartpole(optimizer, seed: int) -> float:
    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = agents.PPO("MlpPolicy", env, optimizer=optimizer, n_steps=32, batch_size=256, gae_lambda=0.8,
                       gamma=0.98, n_epochs=20, learning_rate=lambda p: 1e-3 * p, clip_range=lambda p: 0.2 * p,
                       seed=seed, device="cpu")
    eval_env = Monitor(gym.make("CartPole-v1"))
    eval_env.reset(seed=1000 + seed)
    stop = StopTrainingOnRewardThreshold(reward_threshold=THRESHOLD)
    callback = EvalCallback(eval_env, callback_on_new_best=stop, eval_freq=8192 // 8, n_eval_episodes=5,
                            deterministic=True, verbose=0)
    model.learn(BUDGET, callback=callback)
    assert model.divergence is None
    return float(callback.best_mean_reward)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_scaled_adahesscale_learns_cartpole(seed):
    th.set_num_threads(1)
    assert learn_cartpole(SCALED_ADAHESSCALE, seed) >= THRESHOLD
