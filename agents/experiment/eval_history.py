"""The evaluation callback of a run, its history, and the inputs of its latest evaluation.

SB3's ``EvalCallback`` keeps its history in memory (and rewrites ``evaluations.npz`` from it), so
a resumed run puts the saved history back and rewrites the file to match it.

Just before each evaluation the callback records what the evaluation reads
(:func:`eval_inputs`): the evaluation env's state (each sub-env with its ``np_random``, MuJoCo's
simulator state, VecNormalize's statistics once synced from the training env), the policy's
parameters (an evaluation that falls on the last step precedes the last update, so they may differ
from the final ``model.zip``) and torch's RNG state (stochastic evaluations). Taking the record
changes nothing the evaluation reads, so the evaluations are SB3's. The latest record goes into
every checkpoint and, at the end, into ``<run dir>/final_eval.pkl``; ``scripts/evaluate.py``
restores it to replay that evaluation exactly (:mod:`agents.experiment.evaluate`).
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.vec_env import sync_envs_normalization

from agents.experiment.env_state import snapshot_vec_env

EVAL_INPUTS_FORMAT = 1


class FinalEvalCallback(EvalCallback):
    """SB3's EvalCallback plus one evaluation at the end of training (unless just done); the
    inputs of the latest evaluation and its returns are kept in ``last_eval``."""

    last_eval: dict | None = None

    def _on_step(self) -> bool:
        due = self.eval_freq > 0 and self.n_calls % self.eval_freq == 0  # SB3's own condition
        if due:
            inputs = eval_inputs(self.model, self.training_env, self.eval_env, self.n_eval_episodes,
                                 self.deterministic)
        out = super()._on_step()
        if due:
            inputs["returns"] = [float(r) for r in self.evaluations_results[-1]] if self.log_path else None
            self.last_eval = inputs
        return out

    def _on_training_end(self) -> None:
        done = self.evaluations_timesteps and self.evaluations_timesteps[-1] == self.num_timesteps
        if done or getattr(self.model, "divergence", None):
            return
        freq, self.eval_freq = self.eval_freq, 1
        try:
            self._on_step()
        finally:
            self.eval_freq = freq


def eval_inputs(model, training_env, eval_env, n_episodes: int, deterministic: bool) -> dict:
    """What an evaluation of ``model`` on ``eval_env`` is about to read (nothing is changed).

    VecNormalize's statistics are synced from the training env first, as ``EvalCallback`` does
    (copying them twice gives the same statistics).
    """
    if model.get_vec_normalize_env() is not None:
        sync_envs_normalization(training_env, eval_env)
    return {"format": EVAL_INPUTS_FORMAT, "step": int(model.num_timesteps), "n_episodes": int(n_episodes),
            "deterministic": bool(deterministic), "env": snapshot_vec_env(eval_env),
            "policy": {k: v.detach().cpu().clone() for k, v in model.policy.state_dict().items()},
            "torch_rng": torch.get_rng_state()}


def save_eval_inputs(path: Path, inputs: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(inputs, f, protocol=pickle.HIGHEST_PROTOCOL)


def load_eval_inputs(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def eval_callback(c: Mapping[str, Any], eval_env, run_dir: Path) -> FinalEvalCallback:
    """The run's evaluation every ``eval.freq`` env steps (and at the end) into ``run_dir``."""
    n_envs = c["env"]["n_envs"]
    freq = c["eval"]["freq"]
    return FinalEvalCallback(eval_env, n_eval_episodes=c["eval"]["n_episodes"],
                             eval_freq=max(freq // n_envs, 1) if freq > 0 else 0,
                             log_path=str(run_dir), best_model_save_path=None,
                             deterministic=c["eval"]["deterministic"], render=False, warn=False,
                             verbose=0)


_EVAL_KEYS = ("n_calls", "evaluations_results", "evaluations_timesteps", "evaluations_length",
              "evaluations_successes", "best_mean_reward", "last_mean_reward", "last_eval")


def eval_state(cb) -> dict | None:
    if cb is None:
        return None
    return {k: copy.deepcopy(getattr(cb, k)) for k in _EVAL_KEYS if hasattr(cb, k)}


def restore_eval(cb, s: dict | None, run_dir: Path) -> None:
    """Put the evaluation history back and rewrite ``evaluations.npz`` to match it."""
    if cb is None or not s:
        return
    for k, v in s.items():
        setattr(cb, k, copy.deepcopy(v))
    path = Path(run_dir) / "evaluations.npz"
    if cb.evaluations_timesteps:
        extra = {"successes": cb.evaluations_successes} if cb.evaluations_successes else {}
        np.savez(path, timesteps=cb.evaluations_timesteps, results=cb.evaluations_results,
                 ep_lengths=cb.evaluations_length, **extra)
    else:
        path.unlink(missing_ok=True)
