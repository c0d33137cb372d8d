"""Learning tests: the shipped `opt=hesscale` defaults learn as fast as SB3's default optimizer, and
PPO with Scaled AdaHesScale learns CartPole-v1.

Shipped defaults (issue 11): `agent=ppo|a2c|sac opt=hesscale` exactly as `scripts/train.py` builds it,
InvertedPendulum-v5 at SB3's hyperparameters, evaluations of 5 deterministic episodes; both arms
must reach a mean return of 950 (of 1,000) in most seeds: PPO and A2C in 20k steps (evaluations at
10k, 20k; seeds 0–2), SAC in 5k (seed 0). Calibrated on the committed runs: SB3's optimizer reaches
1,000 by 20k steps in all three seeds of the δ grid (`docs/results/defaults/delta`) for PPO and A2C,
and SAC's Adam at the first evaluation, 5k steps (`docs/results/defaults/screen`).

CartPole (15–30 s per seed on one core):

Protocol, calibrated on Adam: RL Zoo's PPO CartPole-v1 hyperparameters (8 envs, n_steps 32,
batch 256, 20 epochs, γ 0.98, λ 0.8, linearly decaying lr 1e-3 and clip range 0.2); a separate
evaluation env every 8,192 steps (5 deterministic episodes); training stops once the mean
evaluation return reaches 400 (of 500), within 65,536 steps. SB3's Adam reaches 500 within
50,000 steps with these settings. Scaled AdaHesScale uses δ = 1e-4 (the paper's 1e-8 is far too
conservative for so short a budget: it shrinks the critic's steps ~150×).
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor

import agents
from agents.experiment.compose import compose_config
from agents.experiment.run import train


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


#: agent → (SB3's default optimizer, env steps, evaluation period, seeds); an arm passes when most
#: of its seeds reach the threshold (one seed is at the mercy of float rounding: A2C's seed 0 reaches
#: 1,000 at 20k or at 40k steps depending on the last bit of an early update)
SHIPPED_CHECK = {"ppo": ("adam", 20_000, 10_000, (0, 1, 2)), "a2c": ("rmsprop", 20_000, 10_000, (0, 1, 2)),
                 "sac": ("adam", 5_000, 5_000, (0,))}
SHIPPED_THRESHOLD = 950.0


def best_evaluation(overrides: list[str], run_dir: Path, steps: int, freq: int) -> float:
    """The best mean evaluation return of a run built by the experiment code itself."""
    cfg = compose_config(["env=inverted_pendulum", f"total_timesteps={steps}", f"eval.freq={freq}",
                          "eval.n_episodes=5", "save_model=false", "checkpoint.freq=0", "progress_bar=false",
                          "threads=1", *overrides])
    assert train(cfg, run_dir)["status"] == "finished"
    return float(np.load(run_dir / "evaluations.npz")["results"].mean(axis=1).max())


@pytest.mark.slow
@pytest.mark.parametrize("agent", list(SHIPPED_CHECK))
def test_shipped_hesscale_default_learns_as_fast_as_sb3s_optimizer(agent, tmp_path: Path):
    sb3_optimizer, steps, freq, seeds = SHIPPED_CHECK[agent]
    best = {opt: [best_evaluation([f"agent={agent}", f"opt={opt}", f"seed={seed}"], tmp_path / f"{opt}{seed}", steps, freq)
                  for seed in seeds]
            for opt in (sb3_optimizer, "hesscale")}
    reached = {opt: sum(b >= SHIPPED_THRESHOLD for b in bests) for opt, bests in best.items()}
    assert 2 * reached[sb3_optimizer] > len(seeds), f"calibration: SB3's {sb3_optimizer} reached only {best}"
    assert 2 * reached["hesscale"] > len(seeds), f"opt=hesscale fell short in {steps} steps: {best}"
