"""Unknown config keys: refused wherever they come from (``+key=``, ``++key=``, a YAML file).

1. :func:`known_tree`: the closed part of the config — the top level and ``eval`` / ``checkpoint``
   of ``config.yaml``, ``opt`` from ``opt/schema/base.yaml``, ``agent`` and ``env`` from
   :data:`AGENT_KEYS` / :data:`ENV_KEYS` (a typo in an ``agent/*.yaml`` or ``env/*.yaml`` file is
   an unknown key too);
2. :func:`unknown_keys`: every key of a composed config outside that tree, named with the nearest
   valid one (``opt.scalng.delta`` → ``opt.scaling.delta``);
3. :func:`unknown_open_keys`: the maps that stay open (:data:`OPEN_MAPS`) are checked against the
   signatures they are passed to — ``agent.kwargs`` the SB3 algorithm's, ``agent.policy_kwargs``
   its policy's, ``opt.kwargs`` the optimizer's, ``env.kwargs`` the environment's (and
   ``gymnasium.make``'s). This step imports SB3 / torch / the env's module.
"""

from __future__ import annotations

import difflib
import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from agents.experiment.compose import CONFIGS

#: maps whose keys are arguments of something else, not part of the schema
OPEN_MAPS = ("agent.kwargs", "agent.policy_kwargs", "opt.kwargs", "env.kwargs")
#: the keys of an ``agent/*.yaml`` and of an ``env/*.yaml`` file
AGENT_KEYS = ("name", "cls", "policy", "lr", "kwargs", "policy_kwargs")
ENV_KEYS = ("name", "id", "n_envs", "normalize", "norm_obs", "norm_reward", "clip_obs", "total_timesteps",
            "slurm_timeout_min", "kwargs")
_OPEN = object()  # marks an open map in the known tree
#: arguments that the runner passes itself (never through the open maps)
_RUNNER_ARGS = {"self", "policy", "env", "params", "lr", "observation_space", "action_space", "lr_schedule"}
#: ``gymnasium.make``'s own keyword arguments (besides the env constructor's)
_MAKE_ARGS = ("max_episode_steps", "autoreset", "apply_api_compatibility", "disable_env_checker", "render_mode")


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the nearest of ``options``, or ``""``."""
    close = difflib.get_close_matches(word, sorted(set(map(str, options))), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def nearest_key(dotted: str, tree: Mapping) -> str:
    """`` (did you mean a.b.c?)`` for an unknown dotted key of the nested mapping ``tree``: the known
    prefix is kept and the first unknown part matched among its siblings (``opt.scalng.delta`` →
    ``opt.scaling.delta``); failing that, the whole key among all the leaf keys."""
    node: Any = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping):
            break
        if part in node:
            node = node[part]
            continue
        close = difflib.get_close_matches(part, [str(k) for k in node], n=1, cutoff=0.6)
        if close:
            return f" (did you mean {'.'.join([*parts[:i], close[0], *parts[i + 1:]])}?)"
        break
    return did_you_mean(dotted, _leaves(tree))


def _leaves(tree: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.extend(_leaves(v, key + ".") if isinstance(v, Mapping) and v else [key])
    return out


def _yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]


@lru_cache(maxsize=4)
def known_tree(configs: Path = CONFIGS) -> dict:
    """The keys ``configs/`` declares, nested; open maps are marked (their keys are not listed)."""
    top = {k: v for k, v in _yaml(configs / "config.yaml").items() if k not in ("defaults", "hydra")}
    tree: dict = {**top, "opt": _yaml(configs / "opt" / "schema" / "base.yaml"),
                  "agent": dict.fromkeys(AGENT_KEYS), "env": dict.fromkeys(ENV_KEYS)}
    for dotted in OPEN_MAPS:
        group, key = dotted.split(".")
        tree[group][key] = _OPEN
    return tree


def unknown_keys(c: Mapping, tree: Mapping | None = None) -> list[str]:
    """``"<key>: unknown key (did you mean <nearest>?)"`` for each key of ``c`` outside the tree."""
    tree = known_tree() if tree is None else tree
    errors: list[str] = []

    def walk(node: Mapping, known: Mapping, prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if k not in known:  # named down to its leaves: +opt.scalng.delta -> opt.scalng.delta
                for leaf in (_leaves(v, key + ".") if isinstance(v, Mapping) and v else [key]):
                    errors.append(f"{leaf}: unknown key{nearest_key(leaf, tree)}")
            elif isinstance(v, Mapping) and isinstance(known[k], Mapping):  # open maps: not walked
                walk(v, known[k], key + ".")

    walk(c, tree, "")
    return errors


def _parameters(fn: Any, seen: set | None = None) -> set[str] | None:
    """Keyword parameter names of a callable (a class: its ``__init__`` and, through ``**kwargs``,
    its bases'); None when it accepts anything."""
    names: set[str] = set()
    targets = [c.__init__ for c in inspect.getmro(fn) if "__init__" in vars(c)] if inspect.isclass(fn) else [fn]
    for target in targets:
        try:
            params = inspect.signature(target).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names - _RUNNER_ARGS
    return None  # **kwargs all the way up (object.__init__ never reached with a fixed signature)


def _check_map(dotted: str, given: Any, target: Any, what: str) -> list[str]:
    if not isinstance(given, Mapping) or not given:
        return []
    valid = _parameters(target)
    if valid is None:
        return []
    return [f"{dotted}.{k}: not an argument of {what}{did_you_mean(str(k), valid)}"
            for k in given if k not in valid]


def unknown_open_keys(c: Mapping) -> list[str]:
    """The keys of :data:`OPEN_MAPS` that the callable they are passed to does not take."""
    import stable_baselines3 as sb3

    from agents.optimizers import OPTIMIZER_NAMES, optimizer_class

    errors: list[str] = []
    agent, opt, env = c["agent"], c["opt"], c["env"]
    cls = getattr(sb3, str(agent.get("cls")), None)
    if cls is not None:
        errors += _check_map("agent.kwargs", agent.get("kwargs"), cls, f"SB3's {cls.__name__}")
        policy = cls.policy_aliases.get(agent.get("policy")) if isinstance(agent.get("policy"), str) else None
        if policy is not None:
            errors += _check_map("agent.policy_kwargs", agent.get("policy_kwargs"), policy,
                                 f"SB3's {policy.__name__} ({agent['policy']})")
    if opt.get("optimizer") in OPTIMIZER_NAMES:
        ocls = optimizer_class(opt["optimizer"])
        errors += _check_map("opt.kwargs", opt.get("kwargs"), ocls, ocls.__name__)
    errors += _check_env_kwargs(env)
    return errors


def _check_env_kwargs(env: Mapping) -> list[str]:
    kwargs = env.get("kwargs")
    if not isinstance(kwargs, Mapping) or not kwargs:
        return []
    import gymnasium as gym

    try:
        spec = gym.spec(env["id"])
        entry = gym.envs.registration.load_env_creator(spec.entry_point) \
            if isinstance(spec.entry_point, str) else spec.entry_point
    except Exception:  # noqa: BLE001 - an unknown id is reported by check_env_id
        return []
    valid = _parameters(entry)
    if valid is None:
        return []
    valid |= set(_MAKE_ARGS)
    return [f"env.kwargs.{k}: not an argument of {env['id']} ({getattr(entry, '__name__', entry)}) or "
            f"gymnasium.make{did_you_mean(str(k), valid)}" for k in kwargs if k not in valid]
