"""Friendly checks of a composed config, run before anything is built or trained.

Every problem is reported as one :class:`ConfigError` whose message names the offending key, the
value given and what is allowed; the entry points print it without a Python traceback.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Mapping

from agents.experiment.build import ACTIVATIONS, optimizer_spec
from agents.experiment.compose import CONFIGS
from agents.experiment.errors import ConfigError
from agents.experiment.keys import unknown_keys, unknown_open_keys
from agents.optimizers import (ACTOR_CURVATURE, ALGOS, CURVATURE_METHODS, FIRST_ORDER, KWARG_RANGES, OPTIMIZER_NAMES,
                               SCALING_RANGES, normalize_optimizer_config)
from agents.ranges import NON_NEGATIVE, POSITIVE, UNIT, Range

AGENT_CLASSES = tuple(a.upper() for a in ALGOS)

# configs/config.yaml's `checkpoint` section (used when a composed config has none)
CHECKPOINT_DEFAULTS = {"freq": 25000, "keep": 1, "resume": True, "keep_when_done": False}

_COUNT = Range(1, integer=True)
_INDEX = Range(0, integer=True)
#: the range of every numeric key that must be present
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**32 - 1, integer=True),
    "total_timesteps": _COUNT,
    "eval.freq": _INDEX,
    "eval.n_episodes": _COUNT,
    "eval.seed_offset": _INDEX,
    "threads": _COUNT,
    "opt.lr": POSITIVE,
    **{f"opt.scaling.{k}": r for k, r in SCALING_RANGES.items()},
    "env.n_envs": _COUNT,
    "env.clip_obs": POSITIVE,
}
CHECKPOINT_RANGES: dict[str, Range] = {"checkpoint.freq": _INDEX, "checkpoint.keep": _COUNT}
#: keys that may be absent (SB3's or the optimizer's default then applies)
OPTIONAL_RANGES: dict[str, Range] = {
    **{f"agent.kwargs.{k}": _COUNT for k in ("n_steps", "batch_size", "n_epochs", "buffer_size", "gradient_steps")},
    "agent.kwargs.learning_starts": _INDEX,
    "agent.kwargs.gamma": UNIT,
    "agent.kwargs.gae_lambda": UNIT,
    "agent.kwargs.ent_coef": NON_NEGATIVE,
    "agent.kwargs.vf_coef": NON_NEGATIVE,
    "agent.kwargs.max_grad_norm": POSITIVE,
    "agent.kwargs.clip_range": POSITIVE,
    **{f"opt.kwargs.{k}": r for k, r in KWARG_RANGES.items() if k != "betas"},
}
AUTO_KEYS = ("agent.kwargs.ent_coef", "agent.kwargs.vf_coef")  # SAC's "auto" / "auto_0.1"
#: key -> (allowed values, whether null is allowed)
CHOICES: dict[str, tuple[tuple, bool]] = {
    "opt.optimizer": (OPTIMIZER_NAMES, False),
    "opt.curvature": (CURVATURE_METHODS, True),
    "opt.actor_curvature": (ACTOR_CURVATURE, True),
    "opt.critic_optimizer": (FIRST_ORDER, True),
    "agent.cls": (AGENT_CLASSES, False),
}
#: the schema every ``configs/opt/*.yaml`` starts from: its keys, their types and defaults
OPT_SCHEMA = CONFIGS / "opt" / "schema" / "base.yaml"


def schema_leaves(path: Path = OPT_SCHEMA, prefix: str = "opt") -> dict[str, Any]:
    """``{"opt.scaling.delta": 1e-08, ...}``: the schema's leaf keys and their (unresolved) defaults."""
    from omegaconf import OmegaConf

    def walk(node: Any, key: str) -> dict[str, Any]:
        if isinstance(node, dict) and node:
            return {k: v for name, child in node.items() for k, v in walk(child, f"{key}.{name}").items()}
        return {key: node}

    return walk(OmegaConf.to_container(OmegaConf.load(path), resolve=False), prefix)


#: booleans: the opt schema's (its default is true or false) and these
BOOLEANS = ("eval.deterministic", "progress_bar", "env.normalize", "clip_grad_norm",
            *(k for k, v in schema_leaves().items() if isinstance(v, bool)))
CHECKPOINT_BOOLEANS = ("checkpoint.resume", "checkpoint.keep_when_done")
#: keys the runner sets itself; ``agent.kwargs.<key>`` is refused
RUNNER_KEYS = ("seed", "tensorboard_log", "policy_kwargs", "device", "verbose", "env", "policy")


class _Missing:
    def __repr__(self) -> str:
        return "(missing)"


_MISSING = _Missing()


class _Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def fail(self, key: str, value: Any, allowed: str) -> None:
        if value is _MISSING:
            self.errors.append(f"{key} is missing: {allowed}")
        else:
            self.errors.append(f"{key}={value!r} is not allowed: {allowed}")

    def in_range(self, cfg: Mapping, key: str, allowed: Range, optional: bool = False) -> None:
        v = _get(cfg, key)
        if v is _MISSING and optional:
            return
        if v not in allowed:
            self.fail(key, v, "expected " + allowed.expected())

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
    unknown = unknown_keys(c)  # a typo'd key would otherwise be ignored silently
    if unknown:
        raise ConfigError("\n".join(unknown))
    # agent.lr (SB3's default) only provides opt.lr's default: the resolved config keeps one
    # learning rate, opt.lr, the one the optimizer gets (config.yaml, result.json, resume identity).
    c["agent"].pop("lr", None)
    c.setdefault("clip_grad_norm", True)  # a config composed before the switch existed

    for key, allowed in RANGES.items():
        ck.in_range(c, key, allowed)
    for key, allowed in OPTIONAL_RANGES.items():
        if not (key in AUTO_KEYS and str(_get(c, key)).startswith("auto")):
            ck.in_range(c, key, allowed, optional=True)
    for key in BOOLEANS:
        ck.boolean(c, key)
    if "checkpoint" not in c:  # a config composed before checkpoints existed: their defaults
        c["checkpoint"] = dict(CHECKPOINT_DEFAULTS)
    if not isinstance(c.get("checkpoint"), Mapping):
        ck.fail("checkpoint", c.get("checkpoint"), "expected a mapping {freq, keep, resume, keep_when_done}")
    else:
        for key, allowed in CHECKPOINT_RANGES.items():
            ck.in_range(c, key, allowed)
        for key in CHECKPOINT_BOOLEANS:
            ck.boolean(c, key)
    dev = _get(c, "device")
    if not (isinstance(dev, str) and re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", dev)):
        ck.fail("device", dev, "expected cpu, auto, cuda, cuda:N or mps")

    # optimizer
    for key, (allowed, nullable) in CHOICES.items():
        ck.choice(c, key, allowed, optional=nullable)
    kw = _get(c, "opt.kwargs")
    if not isinstance(kw, Mapping):
        ck.fail("opt.kwargs", kw, "expected a mapping of optimizer hyperparameters")
    else:
        if "lr" in kw:
            ck.fail("opt.kwargs.lr", kw["lr"], "the learning rate is set with opt.lr only")
        if "betas" in kw:
            b, allowed = kw["betas"], KWARG_RANGES["betas"]
            if not (isinstance(b, (list, tuple)) and len(b) == 2 and all(x in allowed for x in b)):
                ck.fail("opt.kwargs.betas", b, f"expected two numbers, each {allowed.expected()}")
    if (_get(c, "opt.scaling.enabled") is True and _get(c, "opt.curvature") is None):
        ck.fail("opt.curvature", None, "step-size scaling needs a curvature method: "
                + ", ".join(CURVATURE_METHODS))
    if _get(c, "opt.optimizer") == "adahesscale" and _get(c, "opt.curvature") is None:
        ck.fail("opt.curvature", None, "adahesscale needs a curvature method: " + ", ".join(CURVATURE_METHODS))

    # agent
    akw = _get(c, "agent.kwargs")
    if isinstance(akw, Mapping):
        if "learning_rate" in akw:
            ck.fail("agent.kwargs.learning_rate", akw["learning_rate"],
                    "the learning rate is set with opt.lr only")
        for k in RUNNER_KEYS:
            if k in akw:
                ck.fail(f"agent.kwargs.{k}", akw[k], f"set by the runner (use the top-level key or agent.{k})")
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

    if not ck.errors:
        _check_with_agents(ck, c)
    if not ck.errors:  # the one check that imports SB3 (and torch), once the values are sane
        ck.errors += unknown_open_keys(c)
    if ck.errors:
        raise ConfigError("\n".join(ck.errors))
    return c


def _check_with_agents(ck: _Checker, c: dict) -> None:
    """Let the agents' own optimizer-config validation speak, attributed to ``opt``."""
    spec = optimizer_spec(c)
    try:
        normalize_optimizer_config(spec, c["agent"]["cls"].lower())
    except ValueError as e:
        ck.errors.append(f"opt (optimizer={c['opt']['optimizer']}, curvature={c['opt']['curvature']}): {e}")


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
