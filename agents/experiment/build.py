"""Config → agent: a resolved config turned into the agent's constructor arguments, and the agent.

* :func:`optimizer_spec`: the agents' ``optimizer`` dict (:mod:`agents.optimizers`), ``None`` for
  SB3's own optimizer, so the control arm is upstream SB3;
* :func:`policy_kwargs`: SB3's ``policy_kwargs`` (activation names → ``torch.nn`` classes);
* :func:`build_model` / :func:`load_model`: a fresh agent, or one loaded from a checkpoint.

Torch-free at import (the configuration checks use :func:`optimizer_spec`); building imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from agents.experiment.errors import ConfigError
from agents.optimizers import is_sb3_default

#: ``agent.policy_kwargs.activation_fn`` names → ``torch.nn`` class names
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
#: the SB3 algorithms with a ``max_grad_norm`` argument (SAC has none and never clips)
CLIPPING_AGENTS = ("PPO", "A2C")
MODEL_FILE = "model.zip"
BUFFER_FILE = "replay_buffer.pkl"


def optimizer_spec(c: Mapping[str, Any]) -> dict | None:
    """The agents' ``optimizer`` dict for a resolved config, or None for SB3's own optimizer.

    ``opt=adam`` (PPO, SAC) and ``opt=rmsprop`` (A2C) with no overrides give None, so those runs
    are exactly upstream SB3. ``opt=adam`` with A2C gives Adam the way SB3 builds it for A2C with
    ``optimizer_class=Adam`` (eps=1e-5 from ActorCriticPolicy); the agents merge ``kwargs`` over
    SB3's defaults for the algorithm.
    """
    opt, cls = c["opt"], c["agent"]["cls"]
    name = opt["optimizer"]
    kwargs = dict(opt.get("kwargs") or {})
    scaling = dict(opt["scaling"])
    rms_prop_eps = float((c["agent"].get("kwargs") or {}).get("rms_prop_eps", 1e-5))
    if not scaling["enabled"] and is_sb3_default(name, kwargs, cls.lower(), rms_prop_eps) \
            and opt.get("critic_optimizer") is None:
        return None
    spec: dict[str, Any] = {"name": name, "kwargs": kwargs, "scaling": scaling}
    if opt.get("curvature") is not None:
        spec["curvature"] = opt["curvature"]
    if cls == "SAC" and opt.get("actor_curvature") is not None:
        spec["actor_curvature"] = opt["actor_curvature"]
    if opt.get("critic_optimizer") is not None:  # SAC's; the agents refuse it for PPO/A2C
        spec["critic_optimizer"] = opt["critic_optimizer"]
    return spec


def agent_kwargs(c: Mapping[str, Any]) -> dict:
    """SB3's constructor arguments from ``agent.kwargs``; with ``clip_grad_norm: false`` PPO/A2C get
    ``max_grad_norm=inf``, which both update paths read: SB3's ``clip_grad_norm_`` then multiplies
    by exactly 1 and the curvature path skips clipping (SAC clips on neither path anyway)."""
    kwargs = dict(c["agent"].get("kwargs") or {})
    if isinstance(kwargs.get("train_freq"), list):
        kwargs["train_freq"] = tuple(kwargs["train_freq"])
    if not c.get("clip_grad_norm", True) and c["agent"]["cls"] in CLIPPING_AGENTS:
        kwargs["max_grad_norm"] = float("inf")
    return kwargs


def policy_kwargs(c: Mapping[str, Any]) -> dict:
    """SB3 ``policy_kwargs`` from the config (activation names mapped to torch.nn classes)."""
    import torch.nn as nn

    pk = dict(c["agent"].get("policy_kwargs") or {})
    act = pk.get("activation_fn")
    if isinstance(act, str):
        pk["activation_fn"] = getattr(nn, ACTIVATIONS[act.lower()])
    return pk


def agent_class(name: str) -> type:
    """``agents.PPO`` / ``agents.A2C`` / ``agents.SAC`` by ``agent.cls``."""
    import agents

    return getattr(agents, name)


def build_model(c: Mapping[str, Any], env):
    """Instantiate the agent for a resolved config; a policy the core has no rule for is a
    :class:`ConfigError`."""
    import hesscale

    a = c["agent"]
    kwargs = agent_kwargs(c)
    try:
        return agent_class(a["cls"])(
            a["policy"], env, optimizer=optimizer_spec(c), learning_rate=float(c["opt"]["lr"]),
            seed=c["seed"], device=c["device"], verbose=c.get("verbose", 0),
            policy_kwargs=policy_kwargs(c), **kwargs)
    except hesscale.UnsupportedModuleError as e:  # raised while building, before any training
        raise unsupported_module_error(c, e) from None


def unsupported_module_error(c: Mapping[str, Any], e) -> ConfigError:
    """The one-line message for a policy module without a HesScale rule (``e``: the core's error)."""
    return ConfigError(
        f"opt={c['opt']['name']} (curvature={c['opt'].get('curvature')}) cannot train this policy: "
        + str(e.with_way_out("Use supported modules (agent.policy_kwargs) or a first-order optimizer "
                             "without scaling (opt=adam)."))
    )


def load_model(c: Mapping[str, Any], folder: Path, env):
    """SB3's ``load()`` of a saved agent (and its replay buffer, if saved) in ``folder``.

    ``load()`` reseeds every RNG; a resumed run puts the saved states back at its first boundary.
    """
    folder = Path(folder)
    model = agent_class(c["agent"]["cls"]).load(str(folder / MODEL_FILE), env=env, device=c["device"],
                                                 force_reset=False)
    if (folder / BUFFER_FILE).is_file() and hasattr(model, "load_replay_buffer"):
        model.load_replay_buffer(str(folder / BUFFER_FILE))
    import hesscale

    try:  # load() itself never checks (a saved model always acts); resuming trains it
        model.check_curvature_modules()
    except hesscale.UnsupportedModuleError as e:
        raise unsupported_module_error(c, e) from None
    return model
