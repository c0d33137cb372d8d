"""Training and evaluation environments (Gymnasium vector envs, optional VecNormalize), and the
MuJoCo instability report (a wrapper that detects it, a callback that ends the run as diverged)."""

from __future__ import annotations

from typing import Any, Mapping

import gymnasium as gym
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from agents.experiment.errors import ConfigError
from agents.experiment.validation import check_action_space, check_env_id


# MuJoCo compiler notices that are known to be harmless here: Gymnasium 1.4's own model files set
# the deprecated `settotalmass` (HalfCheetah, Ant, ...), printed at every model load.
KNOWN_HARMLESS_MUJOCO_WARNINGS = ("compiler attribute 'settotalmass' is deprecated",)


def _mujoco_warning(msg: str) -> None:
    """MuJoCo's warning handler without the known-harmless notices; the rest as MuJoCo prints them."""
    if any(known in msg for known in KNOWN_HARMLESS_MUJOCO_WARNINGS):
        return
    import sys

    import mujoco

    print(f"WARNING: {msg}\n", file=sys.stderr, flush=True)
    mujoco.mju_writeLog("WARNING", msg)


def filter_mujoco_warnings() -> None:
    """Install :func:`_mujoco_warning` as MuJoCo's warning handler (once; MuJoCo not installed: no-op).

    Only the printing changes: the runtime warning counters that :class:`MujocoInstabilityInfo`
    reads are kept by MuJoCo independently of the handler.
    """
    try:
        import mujoco
    except ImportError:
        return
    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_mujoco_warning)


def make_train_env(cfg: Mapping[str, Any]):
    """The training env: ``env.n_envs`` copies, seeded with ``seed``, VecNormalize if asked."""
    env_cfg = cfg["env"]
    check_env_id(env_cfg["id"])
    filter_mujoco_warnings()
    venv = make_vec_env(env_cfg["id"], n_envs=env_cfg["n_envs"], seed=cfg["seed"],
                        env_kwargs=dict(env_cfg.get("kwargs") or {}),
                        wrapper_class=MujocoInstabilityInfo)
    if env_cfg["normalize"]:
        venv = VecNormalize(venv, norm_obs=env_cfg["norm_obs"], norm_reward=env_cfg["norm_reward"],
                            clip_obs=env_cfg["clip_obs"], gamma=_gamma(cfg))
    return venv


def make_train_env_checked(c: Mapping[str, Any]):
    """The training env, after checking the env id and that the agent can act in it."""
    env = make_train_env(c)
    try:
        check_action_space(c["agent"]["cls"], c["env"]["id"], env.action_space)
    except ConfigError:
        env.close()
        raise
    return env


def make_eval_env(cfg: Mapping[str, Any], seed: int | None = None, render_mode: str | None = None):
    """A separate single evaluation env, seeded apart from training (``seed + eval.seed_offset``).

    With normalisation on it is wrapped in VecNormalize(training=False, norm_reward=False); its
    statistics are copied from the training env at each evaluation (SB3's EvalCallback does it)
    or restored when replaying a saved run (:mod:`agents.experiment.evaluate`).
    """
    env_cfg = cfg["env"]
    filter_mujoco_warnings()
    if seed is None:
        seed = cfg["seed"] + cfg["eval"]["seed_offset"]
    kwargs = dict(env_cfg.get("kwargs") or {})
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    venv = make_vec_env(env_cfg["id"], n_envs=1, seed=seed, env_kwargs=kwargs)
    if env_cfg["normalize"]:
        venv = VecNormalize(venv, training=False, norm_obs=env_cfg["norm_obs"], norm_reward=False,
                            clip_obs=env_cfg["clip_obs"], gamma=_gamma(cfg))
    return venv


def _gamma(cfg: Mapping[str, Any]) -> float:
    return float((cfg["agent"].get("kwargs") or {}).get("gamma", 0.99))


_UNSTABLE = ("mjWARN_BADQPOS", "mjWARN_BADQVEL", "mjWARN_BADQACC", "mjWARN_BADCTRL")


class MujocoInstabilityInfo(gym.Wrapper):
    """Gymnasium wrapper: after each step, report MuJoCo's runtime instability warnings.

    Reads the ``data.warning`` counters (bad qpos/qvel/qacc/ctrl: "the simulation is unstable",
    after which MuJoCo resets the state) before any auto-reset can clear them, and puts
    ``info["mujoco_instability"] = "<warning names>"`` when one fired. The model-compiler notice
    some envs print at load is not a runtime warning and is not reported. Non-MuJoCo envs pass
    through untouched.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._ids: list[tuple[str, int]] = []
        data = getattr(env.unwrapped, "data", None)
        if data is not None and hasattr(data, "warning"):
            import mujoco

            self._ids = [(n[7:], int(getattr(mujoco.mjtWarning, n))) for n in _UNSTABLE
                         if hasattr(mujoco.mjtWarning, n)]
        self._seen: dict[str, int] = {}

    def _counts(self) -> dict[str, int]:
        if not self._ids:
            return {}
        w = self.env.unwrapped.data.warning
        return {name: int(w[i].number) for name, i in self._ids}

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self._seen = self._counts()
        return out

    def step(self, action):
        obs, rew, term, trunc, info = self.env.step(action)
        if self._ids:
            now = self._counts()
            fired = [n for n, v in now.items() if v > self._seen.get(n, 0)]
            self._seen = now
            if fired:
                info = {**info, "mujoco_instability": ",".join(fired)}
        return obs, rew, term, trunc, info


class MujocoInstabilityCallback(BaseCallback):
    """Ends training as ``diverged`` when :class:`MujocoInstabilityInfo` reports the simulation
    unstable in a training env."""

    def _on_step(self) -> bool:
        for i, info in enumerate(self.locals.get("infos") or ()):
            what = info.get("mujoco_instability")
            if what:
                reason = f"MuJoCo instability warning ({what}) in training env {i}"
                mark = getattr(self.model, "_mark_diverged", None)
                if mark is not None:
                    mark(reason)
                else:
                    self.model.divergence = {"step": int(self.num_timesteps), "reason": reason}
                return False
        return True
