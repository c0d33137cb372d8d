"""Snapshot and restore of a run's vector envs: each Gymnasium env, MuJoCo's simulator state,
VecNormalize's statistics and the reset seeds SB3 has not consumed yet."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env import VecNormalize


def _unwrap_vec(venv):
    """(VecNormalize or None, innermost VecEnv)."""
    norm, v = None, venv
    while hasattr(v, "venv"):
        if norm is None and isinstance(v, VecNormalize):
            norm = v
        v = v.venv
    return norm, v


_NORM_KEYS = ("obs_rms", "ret_rms", "returns", "old_obs", "old_reward")


def snapshot_vec_env(venv) -> dict:
    """Everything needed to continue ``venv`` (a VecEnv, possibly VecNormalize-wrapped) exactly.

    Each Gymnasium env of a ``DummyVecEnv`` is pickled with its wrappers (time-limit counters,
    Monitor's episode sums, its ``np_random`` when the env pickles by value). Envs that pickle by
    constructor arguments (``EzPickle``, e.g. MuJoCo) come back fresh from the pickle, so their
    ``np_random`` state and, for MuJoCo, the full integration state (``mj_getState``) are saved
    too. ``exact`` is False when an env could not be captured (its episode then restarts).
    """
    import cloudpickle

    norm, inner = _unwrap_vec(venv)
    out: dict[str, Any] = {"exact": True, "norm": None, "envs": None}
    if norm is not None:
        out["norm"] = {k: copy.deepcopy(getattr(norm, k, None)) for k in _NORM_KEYS}
    if hasattr(inner, "envs"):
        out["seeds"] = list(getattr(inner, "_seeds", []))
        out["options"] = copy.deepcopy(list(getattr(inner, "_options", [])))
        envs = []
        for e in inner.envs:
            item: dict[str, Any] = {"pickle": None, "np_random": None, "mujoco": None}
            try:
                item["pickle"] = cloudpickle.dumps(e)
            except Exception as exc:  # noqa: BLE001 - an env that cannot be pickled restarts its episode
                item["error"] = f"{type(exc).__name__}: {exc}"
                out["exact"] = False
            u = e.unwrapped
            rng = getattr(u, "_np_random", None)
            if rng is not None:
                item["np_random"] = pickle.dumps(rng)
            item["mujoco"] = _mujoco_state(u)
            envs.append(item)
        out["envs"] = envs
    else:  # e.g. SubprocVecEnv: the envs live in other processes
        out["exact"] = False
    return out


def _mujoco_state(u) -> np.ndarray | None:
    model, data = getattr(u, "model", None), getattr(u, "data", None)
    if model is None or data is None or not type(data).__module__.startswith("mujoco"):
        return None
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    st = np.empty(mujoco.mj_stateSize(model, spec))
    mujoco.mj_getState(model, data, st, spec)
    return st


def restore_vec_env(venv, snap: dict) -> bool:
    """Put a snapshot back into a freshly built ``venv`` of the same config; True if exact."""
    restore_normalization(venv, snap.get("norm"))
    _, inner = _unwrap_vec(venv)
    envs = snap.get("envs")
    if envs is None or not hasattr(inner, "envs") or len(envs) != len(inner.envs):
        return False
    exact = bool(snap.get("exact"))
    for i, item in enumerate(envs):
        if item.get("pickle") is None:
            continue
        env = pickle.loads(item["pickle"])
        try:
            inner.envs[i].close()
        except Exception:  # noqa: BLE001
            pass
        inner.envs[i] = env
        u = env.unwrapped
        if item.get("np_random") is not None:
            u._np_random = pickle.loads(item["np_random"])
        if item.get("mujoco") is not None and getattr(u, "data", None) is not None:
            import mujoco

            mujoco.mj_setState(u.model, u.data, item["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
            mujoco.mj_forward(u.model, u.data)
        w = env
        while w is not None:  # counters that compare against MuJoCo's (now fresh) warning counts
            if hasattr(w, "_seen") and hasattr(w, "_counts"):
                w._seen = w._counts()
            w = getattr(w, "env", None)
    restore_pending_seeds(venv, snap)
    return exact


def restore_normalization(venv, norm: dict | None) -> None:
    """Put a snapshot's VecNormalize statistics (``snapshot_vec_env(...)["norm"]``) into ``venv``."""
    target, _ = _unwrap_vec(venv)
    if target is None or norm is None:
        return
    for k, v in norm.items():
        if v is not None:
            setattr(target, k, copy.deepcopy(v))


def restore_pending_seeds(venv, snap: dict) -> None:
    """Reset seeds/options not yet consumed (SB3's ``load()`` and ``seed()`` set new ones)."""
    _, inner = _unwrap_vec(venv)
    if "seeds" in snap and hasattr(inner, "_seeds"):
        inner._seeds = list(snap["seeds"])
        inner._options = copy.deepcopy(list(snap["options"]))
