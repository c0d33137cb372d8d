"""What SB3's ``save()`` leaves out of a model, saved and put back: the RNG states (Python,
NumPy, torch, the action space's) and the last observation of the rollout in progress.

SB3's ``load()`` reseeds every RNG and drops the last observation: a resumed run restores the
RNG states at its first boundary (after loading) and the last observation right after loading.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch


def rng_state(model) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "action_space": copy.deepcopy(model.action_space),  # with its np_random
    }


def restore_rng(model, s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    model.action_space = copy.deepcopy(s["action_space"])


def last_obs_state(model) -> tuple:
    """``(last_obs, last_original_obs, last_episode_starts)``, copied."""
    return copy.deepcopy((model._last_obs, getattr(model, "_last_original_obs", None),
                          model._last_episode_starts))


def restore_last_obs(model, s: tuple, env_exact: bool) -> None:
    """Put the last observation back; without an exact env state SB3 resets the env instead
    (the episode in progress is cut)."""
    model._last_obs, last_original, model._last_episode_starts = s
    if last_original is not None:
        model._last_original_obs = last_original
    if not env_exact:
        model._last_obs = None
