"""The evaluation callback of a run and its history, saved beside its restore.

SB3's ``EvalCallback`` keeps its history in memory (and rewrites ``evaluations.npz`` from it), so
a resumed run puts the saved history back and rewrites the file to match it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from stable_baselines3.common.callbacks import EvalCallback


class FinalEvalCallback(EvalCallback):
    """SB3's EvalCallback plus one evaluation at the end of training (unless just done)."""

    def _on_training_end(self) -> None:
        done = self.evaluations_timesteps and self.evaluations_timesteps[-1] == self.num_timesteps
        if done or getattr(self.model, "divergence", None):
            return
        freq, self.eval_freq = self.eval_freq, 1
        try:
            self._on_step()
        finally:
            self.eval_freq = freq


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
              "evaluations_successes", "best_mean_reward", "last_mean_reward")


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
