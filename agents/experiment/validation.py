"""Friendly checks of a composed config, run before anything is built or trained.

Every problem is reported as one :class:`ConfigError` whose message names the offending key, the
value given and what is allowed; the entry points print it without a Python traceback.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Mapping

OPTIMIZERS = ("adam", "rmsprop", "sgd", "adahesscale", "adahessian")
CURVATURES = ("hesscale", "hesscale_gn", "bl89")
ACTOR_CURVATURES = ("exact", "gn")
AGENT_CLASSES = ("PPO", "A2C", "SAC")
ACTIVATIONS = {
    "relu": "ReLU",
    "tanh": "Tanh",
    "sigmoid": "Sigmoid",
    "elu": "ELU",
    "leaky_relu": "LeakyReLU",
    "softplus": "Softplus",
    "gelu": "GELU",
    "silu": "SiLU",
    "selu": "SELU",
}


# configs/config.yaml's `checkpoint` section (used when a composed config has none)
CHECKPOINT_DEFAULTS = {"freq": 25000, "keep": 1, "resume": True, "keep_when_done": False}


class ConfigError(ValueError):
    """A user error in the configuration (bad value, unknown key, incompatible choice)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, key: str, value: Any, allowed: str) -> None:
        self.errors.append(f"{key}={value!r} is not allowed: {allowed}")

    def int_range(self, cfg: Mapping, key: str, lo: int | None = None, hi: int | None = None,
                  optional: bool = False) -> None:
        v = _get(cfg, key)
        if v is None and optional:
            return
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = []
            if lo is not None:
                bounds.append(f">= {lo}")
            if hi is not None:
                bounds.append(f"<= {hi}")
            self.fail(key, v, "expected an integer " + " and ".join(bounds))

    def num_range(self, cfg: Mapping, key: str, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False, hi_open: bool = False, optional: bool = False) -> None:
        v = _get(cfg, key)
        if v is None and optional:
            return
        ok = _is_num(v) and math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            bounds = []
            if lo is not None:
                bounds.append(("> " if lo_open else ">= ") + f"{lo:g}")
            if hi is not None:
                bounds.append(("< " if hi_open else "<= ") + f"{hi:g}")
            self.fail(key, v, "expected a finite number " + " and ".join(bounds))

    def choice(self, cfg: Mapping, key: str, allowed: tuple, optional: bool = False) -> None:
        v = _get(cfg, key)
        if v is None and optional:
            return
        if v not in allowed:
            self.fail(key, v, "expected one of " + ", ".join(map(str, allowed))
                      + (" or null" if optional else ""))

    def boolean(self, cfg: Mapping, key: str) -> None:
        v = _get(cfg, key)
        if not isinstance(v, bool):
            self.fail(key, v, "expected true or false")


_MISSING = object()


def _get(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def resolve(cfg: Any) -> dict:
    """Resolve a DictConfig into a plain dict, turning interpolation errors into ConfigError."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, DictConfig):
        if "hydra" in cfg:  # composed with return_hydra_config=True: the job config only
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        try:
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", "") or "config"
            raise ConfigError(f"{key}: {e.msg if hasattr(e, 'msg') else e}") from None
    return dict(cfg)


def validate(cfg: Any) -> dict:
    """Check the values of a composed config; return it resolved as a plain dict.

    Raises ConfigError listing every problem found (key, value, what is allowed).
    """
    c = resolve(cfg)
    ck = _Checker()
    for top in ("agent", "opt", "env", "eval"):
        if not isinstance(c.get(top), Mapping):
            raise ConfigError(f"{top}: missing config section (is the config directory complete?)")

    ck.int_range(c, "seed", lo=0, hi=2**32 - 1)
    ck.int_range(c, "total_timesteps", lo=1)
    ck.int_range(c, "eval.freq", lo=0)
    ck.int_range(c, "eval.n_episodes", lo=1)
    ck.int_range(c, "eval.seed_offset", lo=0)
    ck.boolean(c, "eval.deterministic")
    ck.int_range(c, "threads", lo=1)
    ck.boolean(c, "progress_bar")
    if "checkpoint" not in c:  # a config composed before checkpoints existed: their defaults
        c["checkpoint"] = dict(CHECKPOINT_DEFAULTS)
    if not isinstance(c.get("checkpoint"), Mapping):
        ck.fail("checkpoint", c.get("checkpoint"), "expected a mapping {freq, keep, resume, keep_when_done}")
    else:
        ck.int_range(c, "checkpoint.freq", lo=0)
        ck.int_range(c, "checkpoint.keep", lo=1)
        ck.boolean(c, "checkpoint.resume")
        ck.boolean(c, "checkpoint.keep_when_done")
    dev = _get(c, "device")
    if not (isinstance(dev, str) and re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", dev)):
        ck.fail("device", dev, "expected cpu, auto, cuda, cuda:N or mps")

    # optimizer
    ck.num_range(c, "opt.lr", lo=0.0, lo_open=True)
    ck.choice(c, "opt.optimizer", OPTIMIZERS)
    ck.choice(c, "opt.curvature", CURVATURES, optional=True)
    ck.choice(c, "opt.actor_curvature", ACTOR_CURVATURES, optional=True)
    ck.boolean(c, "opt.scaling.enabled")
    ck.num_range(c, "opt.scaling.delta", lo=0.0, lo_open=True)
    ck.num_range(c, "opt.scaling.max_scale", lo=0.0, lo_open=True)
    ck.num_range(c, "opt.scaling.beta", lo=0.0, hi=1.0, hi_open=True)
    ck.num_range(c, "opt.max_grad_norm", lo=0.0, lo_open=True, optional=True)
    kw = _get(c, "opt.kwargs")
    if not isinstance(kw, Mapping):
        ck.fail("opt.kwargs", kw, "expected a mapping of optimizer hyperparameters")
    else:
        if "lr" in kw:
            ck.fail("opt.kwargs.lr", kw["lr"], "the learning rate is set with opt.lr only")
        if "eps" in kw:
            ck.num_range(c, "opt.kwargs.eps", lo=0.0, lo_open=True)
        for k in ("weight_decay", "momentum"):
            if k in kw:
                ck.num_range(c, f"opt.kwargs.{k}", lo=0.0)
        if "alpha" in kw:
            ck.num_range(c, "opt.kwargs.alpha", lo=0.0, hi=1.0)
        if "betas" in kw:
            b = kw["betas"]
            if not (isinstance(b, (list, tuple)) and len(b) == 2
                    and all(_is_num(x) and 0 <= x < 1 for x in b)):
                ck.fail("opt.kwargs.betas", b, "expected two numbers in [0, 1)")
    if (_get(c, "opt.scaling.enabled") is True and _get(c, "opt.curvature") is None):
        ck.fail("opt.curvature", None, "step-size scaling needs a curvature method: "
                + ", ".join(CURVATURES))
    if _get(c, "opt.optimizer") == "adahesscale" and _get(c, "opt.curvature") is None:
        ck.fail("opt.curvature", None, "adahesscale needs a curvature method: " + ", ".join(CURVATURES))

    # agent
    ck.choice(c, "agent.cls", AGENT_CLASSES)
    akw = _get(c, "agent.kwargs")
    if isinstance(akw, Mapping):
        if "learning_rate" in akw:
            ck.fail("agent.kwargs.learning_rate", akw["learning_rate"],
                    "the learning rate is set with opt.lr only")
        for k in ("seed", "tensorboard_log", "policy_kwargs", "device", "verbose", "env", "policy"):
            if k in akw:
                ck.fail(f"agent.kwargs.{k}", akw[k], f"set by the runner (use the top-level key or agent.{k})")
        for k in ("n_steps", "batch_size", "n_epochs", "buffer_size", "gradient_steps"):
            if k in akw:
                ck.int_range(c, f"agent.kwargs.{k}", lo=1)
        if "learning_starts" in akw:
            ck.int_range(c, "agent.kwargs.learning_starts", lo=0)
        if "gamma" in akw:
            ck.num_range(c, "agent.kwargs.gamma", lo=0.0, hi=1.0)
        if "gae_lambda" in akw:
            ck.num_range(c, "agent.kwargs.gae_lambda", lo=0.0, hi=1.0)
        for k in ("ent_coef", "vf_coef"):
            if k in akw and akw[k] != "auto" and not str(akw[k]).startswith("auto"):
                ck.num_range(c, f"agent.kwargs.{k}", lo=0.0)
        if "max_grad_norm" in akw:
            ck.num_range(c, "agent.kwargs.max_grad_norm", lo=0.0, lo_open=True)
        if "clip_range" in akw:
            ck.num_range(c, "agent.kwargs.clip_range", lo=0.0, lo_open=True)
    else:
        ck.fail("agent.kwargs", akw, "expected a mapping of SB3 constructor arguments")
    pk = _get(c, "agent.policy_kwargs")
    if isinstance(pk, Mapping):
        act = pk.get("activation_fn")
        if act is not None and str(act).lower() not in ACTIVATIONS:
            ck.fail("agent.policy_kwargs.activation_fn", act,
                    "expected one of " + ", ".join(ACTIVATIONS))
    elif pk is not None:
        ck.fail("agent.policy_kwargs", pk, "expected a mapping")

    # env
    if not isinstance(_get(c, "env.id"), str):
        ck.fail("env.id", _get(c, "env.id"), "expected a Gymnasium environment id")
    ck.int_range(c, "env.n_envs", lo=1)
    ck.boolean(c, "env.normalize")
    ck.num_range(c, "env.clip_obs", lo=0.0, lo_open=True)

    if not ck.errors:  # the slower checks (import SB3 / torch) only once the values are sane
        _check_sb3_keys(ck, _get(c, "agent.cls"), akw)
    if not ck.errors:
        _check_with_agents(ck, c)
    if ck.errors:
        raise ConfigError("\n".join(ck.errors))
    return c


def _check_with_agents(ck: _Checker, c: dict) -> None:
    """Let the agents' own optimizer-config validation speak, attributed to ``opt``."""
    from agents.experiment.run import optimizer_spec
    from agents.optimizers import normalize_optimizer_config

    spec = optimizer_spec(c)
    try:
        normalize_optimizer_config(spec, c["agent"]["cls"].lower())
    except ValueError as e:
        ck.errors.append(f"opt (optimizer={c['opt']['optimizer']}, curvature={c['opt']['curvature']}): {e}")


def _check_sb3_keys(ck: _Checker, cls_name: Any, kwargs: Mapping) -> None:
    if cls_name not in AGENT_CLASSES:
        return
    import inspect

    import stable_baselines3 as sb3

    params = set(inspect.signature(getattr(sb3, cls_name).__init__).parameters)
    for k in kwargs:
        if k not in params:
            close = difflib.get_close_matches(k, sorted(params), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            ck.fail(f"agent.kwargs.{k}", kwargs[k], f"not an argument of SB3's {cls_name}{hint}")


def check_env_id(env_id: str) -> None:
    """Raise ConfigError if Gymnasium does not know ``env_id``."""
    import gymnasium as gym

    try:
        gym.spec(env_id)
    except gym.error.Error as e:
        close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ConfigError(f"env.id={env_id!r} is not a known Gymnasium environment ({e}){hint}") from None


def check_action_space(agent_cls: str, env_id: str, action_space: Any) -> None:
    """Raise ConfigError if the agent cannot act in ``action_space``."""
    from gymnasium import spaces

    if agent_cls == "SAC" and not isinstance(action_space, spaces.Box):
        raise ConfigError(
            f"agent=sac needs a continuous (Box) action space, but env.id={env_id!r} has "
            f"{action_space}; use agent=ppo or agent=a2c for this env")
    ok = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)
    if not isinstance(action_space, ok):
        raise ConfigError(f"env.id={env_id!r}: action space {action_space} is not supported by {agent_cls}")
