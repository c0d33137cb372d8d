"""``scripts/evaluate.py <run dir>`` with its defaults reproduces the recorded final evaluation.

Tiny PPO runs on CartPole-v1 (no VecNormalize; the final evaluation falls on the last step, i.e.
before the last update) and Pendulum-v1 (VecNormalize; the final evaluation at the end of
training). Unfinished runs are replayed from their checkpoint in ``test_reliability_resume.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3.common.callbacks import EvalCallback

from agents.experiment import eval_history
from agents.experiment.compose import compose_config
from agents.experiment.evaluate import main
from agents.experiment.run import train

RUNS = {
    # evaluations at 128, 256, 384, 512 (= the last step, during the last rollout)
    "cartpole": ["env=cartpole", "total_timesteps=512", "eval.freq=128", "eval.n_episodes=3"],
    # evaluations at 200, 400 and one at the end (500), after the last update
    "pendulum": ["env=pendulum", "opt=hesscale", "total_timesteps=500", "eval.freq=200", "eval.n_episodes=2"],
}
COMMON = ["agent=ppo", "agent.kwargs.n_steps=64", "agent.kwargs.batch_size=32", "agent.kwargs.n_epochs=2",
          "progress_bar=false", "++agent.policy_kwargs.net_arch=[16]"]


def _train(run_dir: Path, env: str) -> dict:
    cfg = compose_config([*COMMON, *RUNS[env]])
    r = train(cfg, run_dir)
    assert r["status"] == "finished", r
    return r


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for env in RUNS:
        out[env] = tmp_path_factory.mktemp(env)
        _train(out[env], env)
    return out


def _evaluate(capsys, *args: str) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("env", list(RUNS))
def test_default_replays_the_final_evaluation_exactly(runs, env: str, capsys):
    run = runs[env]
    recorded = json.loads((run / "result.json").read_text())
    with np.load(run / "evaluations.npz") as ev:
        final = ev["results"][-1].tolist()
        assert len(ev["timesteps"]) >= 3  # the eval env went through earlier evaluations first
    r = _evaluate(capsys, str(run))
    assert r["mode"] == "replay" and r["source"] == "the final model" and r["exact"]
    assert r["returns"] == final
    assert r["mean"] == recorded["final_return"] and r["std"] == recorded["final_return_std"]
    assert main([str(run)]) == 0
    assert "identical to the recorded returns" in capsys.readouterr().out


def test_final_evaluation_before_the_last_update_uses_the_policy_it_evaluated(runs):
    """CartPole's final evaluation falls on the last step: the replay's parameters are not
    model.zip's (which has one more update), so the replay cannot pass by evaluating model.zip."""
    from stable_baselines3.common.save_util import load_from_zip_file

    inputs = eval_history.load_eval_inputs(runs["cartpole"] / "final_eval.pkl")
    _, saved, _ = load_from_zip_file(str(runs["cartpole"] / "model.zip"))
    assert inputs["step"] == 512
    assert any(not torch.equal(v, saved["policy"][k]) for k, v in inputs["policy"].items())


def test_recording_the_inputs_leaves_the_evaluations_unchanged(runs, tmp_path: Path, monkeypatch):
    """The same run with SB3's own EvalCallback step (nothing recorded) evaluates the same."""
    monkeypatch.setattr(eval_history.FinalEvalCallback, "_on_step", EvalCallback._on_step)
    _train(tmp_path, "pendulum")
    assert not (tmp_path / "final_eval.pkl").exists()
    with np.load(tmp_path / "evaluations.npz") as a, np.load(runs["pendulum"] / "evaluations.npz") as b:
        assert a["timesteps"].tolist() == b["timesteps"].tolist()
        assert np.array_equal(a["results"], b["results"])


def test_fresh_evaluates_model_zip_on_the_stated_seed(runs, capsys):
    """``--fresh --seed S``: SB3's evaluate_policy of model.zip on an env seeded S, built here."""
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    run = runs["cartpole"]
    r = _evaluate(capsys, str(run), "--fresh", "--seed", "123", "-n", "2")
    assert r["mode"] == "fresh" and r["seed"] == 123 and r["n_episodes"] == 2
    env = DummyVecEnv([lambda: Monitor(gym.make("CartPole-v1"))])
    env.seed(123)
    want, _ = evaluate_policy(PPO.load(str(run / "model.zip"), device="cpu"), env, n_eval_episodes=2,
                              deterministic=True, return_episode_rewards=True)
    assert r["returns"] == [float(x) for x in want]
    default = _evaluate(capsys, str(run), "--fresh", "-n", "2")
    assert default["seed"] == 0 + 10000 + 1  # seed + eval.seed_offset + 1
