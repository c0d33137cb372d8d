"""The agents' optimizer choice: a plain, serialisable dict, validated and turned into optimizers.

The dict (every key optional, ``None`` = SB3's own default for the algorithm)::

    {"name": "adam" | "rmsprop" | "sgd" | "adahesscale" | "adahessian",
     "curvature": "hesscale" | "hesscale_gn" | "bl89",
     "kwargs": {...},                      # hyperparameters except lr (eps, betas, momentum, ...)
     "scaling": {"enabled": False, "delta": 1e-8, "max_scale": 1.0, "beta": 0.999},
     "actor_curvature": "gn" | "exact",    # SAC only (ignored by PPO/A2C)
     "critic_optimizer": "adam" | "rmsprop" | "sgd"}  # SAC only: the critic on that first-order
                                                      # optimizer (SB3's settings, no scaling)

Two paths follow from it:

* **first-order** (``adam``/``rmsprop``/``sgd`` without scaling): SB3 builds the optimizer itself through
  ``policy_kwargs["optimizer_class"/"optimizer_kwargs"]`` and SB3's own ``train()`` runs untouched.
  ``kwargs`` are merged over SB3's defaults for that algorithm (Adam ``eps=1e-5`` for PPO/A2C,
  A2C's RMSprop ``alpha=0.99, eps=rms_prop_eps, weight_decay=0``, torch's defaults otherwise).
  Gradient clipping is SB3's algorithm argument ``max_grad_norm`` (PPO/A2C; SAC never clips).
* **curvature** (``adahesscale``, ``adahessian``, or any optimizer with ``scaling.enabled``): the
  agents' own ``train()`` computes the Hessian diagonal (``hesscale.capture``; ``create_graph``
  for AdaHessian) and steps these optimizers, with param groups named ``pi``/``log_std``/``vf``
  (PPO/A2C) or one optimizer per network ``actor``/``critic`` (SAC). Clipping is the same as on
  the first-order path: the algorithm's ``max_grad_norm`` (``float("inf")``: none) on the global
  gradient norm of the policy's parameters, ĥ scaled with the gradient (see
  :meth:`agents.second_order.CurvatureUpdate._clip`); SAC clips on neither path.
"""

from __future__ import annotations

from typing import Any, Iterable

from hesscale.names import SWEEP_METHODS

from .ranges import NON_NEGATIVE, POSITIVE, UNIT, UNIT_HALF_OPEN, Range

FIRST_ORDER = ("adam", "rmsprop", "sgd")
CURVATURE_OPTIMIZERS = ("adahesscale", "adahessian")
OPTIMIZER_NAMES = FIRST_ORDER + CURVATURE_OPTIMIZERS
CURVATURE_METHODS = SWEEP_METHODS
ACTOR_CURVATURE = ("gn", "exact")
ALGOS = ("ppo", "a2c", "sac")

TOP_KEYS = ("name", "curvature", "kwargs", "scaling", "actor_curvature", "critic_optimizer")
#: a key of earlier versions: ``None`` (its default) is dropped, a value is refused with the way out
REMOVED_KEYS = {"max_grad_norm": "the curvature path clips with the algorithm's own max_grad_norm, as the "
                                 "first-order path does (PPO/A2C argument; float('inf') switches clipping off)"}
SCALING_DEFAULTS = {"enabled": False, "delta": 1e-8, "max_scale": 1.0, "beta": 0.999}
SCALING_RANGES: dict[str, Range] = {"delta": POSITIVE, "max_scale": POSITIVE, "beta": UNIT_HALF_OPEN}
#: ranges of the usual optimizer hyperparameters in ``kwargs`` (``betas``: each entry)
KWARG_RANGES: dict[str, Range] = {"eps": POSITIVE, "weight_decay": NON_NEGATIVE, "momentum": NON_NEGATIVE,
                                  "alpha": UNIT, "betas": UNIT_HALF_OPEN}

# SB3's own default optimizer per algorithm (A2C: RMSprop, ``use_rms_prop=True``).
SB3_DEFAULT_NAME = {"ppo": "adam", "a2c": "rmsprop", "sac": "adam"}

_TORCH_CLASSES = {"adam": "Adam", "rmsprop": "RMSprop", "sgd": "SGD"}  # in torch.optim


def optimizer_class(name: str) -> type:
    """The base optimizer class of ``name``: torch's Adam / RMSprop / SGD, hesscale's AdaHesScale /
    AdaHessian (``opt.kwargs`` are checked against its signature)."""
    if name in _TORCH_CLASSES:
        import torch

        return getattr(torch.optim, _TORCH_CLASSES[name])
    import hesscale.optim as hoptim

    return {"adahesscale": hoptim.AdaHesScale, "adahessian": hoptim.AdaHessian}[name]


def _valid(kind: str, value: Any, valid: Iterable[Any]) -> ValueError:
    return ValueError(f"invalid optimizer {kind} {value!r}; valid: {', '.join(map(repr, valid))}")


def normalize_optimizer_config(config: dict | None, algo: str) -> dict:
    """Validate ``config`` and return a new plain dict with every key filled in.

    ``None`` gives SB3's own default optimizer for ``algo`` (``"ppo"``, ``"a2c"``, ``"sac"``).
    Unknown names or keys raise ``ValueError`` naming the bad value and listing the valid ones.
    """
    if algo not in ALGOS:
        raise _valid("algorithm", algo, ALGOS)
    if config is None:
        config = {}
    try:  # a Hydra/OmegaConf node becomes plain containers, so the stored dict stays plain
        from omegaconf import OmegaConf

        if OmegaConf.is_config(config):
            config = OmegaConf.to_container(config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
        pass
    if not isinstance(config, dict):
        # Accept mappings such as OmegaConf's DictConfig converted by the caller; anything else is a bug.
        try:
            config = dict(config)
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"optimizer must be a dict or None, got {type(config).__name__}") from exc
    for key, why in REMOVED_KEYS.items():
        if config.get(key) is not None:
            raise ValueError(f"optimizer key {key!r} ({config[key]!r}) was removed: {why}")
    for key in config:
        if key not in TOP_KEYS and key not in REMOVED_KEYS:
            raise _valid("key", key, TOP_KEYS)

    name = config.get("name")
    name = SB3_DEFAULT_NAME[algo] if name is None else str(name).lower()
    if name not in OPTIMIZER_NAMES:
        raise _valid("name", config.get("name"), OPTIMIZER_NAMES)

    curvature = config.get("curvature")
    curvature = "hesscale" if curvature is None else str(curvature).lower()
    if curvature not in CURVATURE_METHODS:
        raise _valid("curvature", config.get("curvature"), CURVATURE_METHODS)

    kwargs = config.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        kwargs = dict(kwargs)
    kwargs = {str(k): (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
    if "lr" in kwargs:
        raise ValueError("optimizer kwargs must not contain 'lr': the learning rate is SB3's `learning_rate`")

    scaling_in = config.get("scaling") or {}
    if isinstance(scaling_in, bool):
        scaling_in = {"enabled": scaling_in}
    scaling_in = dict(scaling_in)
    for key in scaling_in:
        if key not in SCALING_DEFAULTS:
            raise _valid("scaling key", key, tuple(SCALING_DEFAULTS))
    scaling = {**SCALING_DEFAULTS, **{k: v for k, v in scaling_in.items() if v is not None}}
    scaling["enabled"] = bool(scaling["enabled"])
    for key, allowed in SCALING_RANGES.items():
        scaling[key] = float(scaling[key])
        if scaling["enabled"] and scaling[key] not in allowed:
            raise ValueError(f"invalid scaling {key} {scaling[key]!r}; expected {allowed.expected()}")

    actor_curvature = config.get("actor_curvature")
    actor_curvature = "gn" if actor_curvature is None else str(actor_curvature).lower()
    if actor_curvature not in ACTOR_CURVATURE:
        raise _valid("actor_curvature", config.get("actor_curvature"), ACTOR_CURVATURE)

    critic_optimizer = config.get("critic_optimizer")
    if critic_optimizer is not None:
        critic_optimizer = str(critic_optimizer).lower()
        if critic_optimizer not in FIRST_ORDER:
            raise _valid("critic_optimizer", config.get("critic_optimizer"), FIRST_ORDER)
        if algo != "sac":
            raise ValueError(f"critic_optimizer={critic_optimizer!r} is SAC's; {algo.upper()} has one optimizer "
                             "for its policy (leave critic_optimizer null)")
        if not (name in CURVATURE_OPTIMIZERS or scaling["enabled"]):
            raise ValueError(f"critic_optimizer={critic_optimizer!r} needs a curvature optimizer or scaling for "
                             f"the actor; with {name!r} alone SB3's own SAC runs (use name={critic_optimizer!r})")

    return {"name": name, "curvature": curvature, "kwargs": kwargs, "scaling": scaling,
            "actor_curvature": actor_curvature, "critic_optimizer": critic_optimizer}


def first_order_config(name: str) -> dict:
    """The normalised config of first-order optimizer ``name`` with SB3's settings and no scaling."""
    return {"name": name, "curvature": "hesscale", "kwargs": {}, "scaling": dict(SCALING_DEFAULTS),
            "actor_curvature": "gn", "critic_optimizer": None}


def uses_curvature(config: dict) -> bool:
    """True when the update needs a Hessian diagonal (our ``train()``), False for SB3's own ``train()``."""
    return config["name"] in CURVATURE_OPTIMIZERS or bool(config["scaling"]["enabled"])


def is_sb3_default(name: str, kwargs: dict, algo: str, rms_prop_eps: float = 1e-5) -> bool:
    """Whether optimizer ``name`` with ``kwargs`` is what SB3 builds for ``algo`` by itself
    (``kwargs`` spell out at most SB3's own values)."""
    defaults = _sb3_first_order_kwargs(name, algo, rms_prop_eps)
    return name == SB3_DEFAULT_NAME[algo] and all(k in defaults and defaults[k] == v for k, v in kwargs.items())


def _sb3_first_order_kwargs(name: str, algo: str, rms_prop_eps: float = 1e-5) -> dict:
    """SB3's own optimizer kwargs for ``name`` on ``algo`` (what SB3 would build)."""
    if algo in ("ppo", "a2c") and name == "adam":
        return {"eps": 1e-5}  # ActorCriticPolicy's default for Adam
    if algo == "a2c" and name == "rmsprop":
        return {"alpha": 0.99, "eps": rms_prop_eps, "weight_decay": 0}
    return {}


def first_order_policy_kwargs(config: dict, algo: str, rms_prop_eps: float = 1e-5) -> dict:
    """``policy_kwargs`` entries that make SB3 build the configured first-order optimizer.

    Empty when SB3's default already is that optimizer (so the control arm passes nothing at all).
    """
    name, kwargs = config["name"], config["kwargs"]
    if uses_curvature(config):
        return {}
    if name == SB3_DEFAULT_NAME[algo] and not kwargs:
        return {}
    if not kwargs:
        if algo == "a2c" and name == "adam":
            # As SB3 builds Adam for A2C (use_rms_prop=False): ActorCriticPolicy adds eps=1e-5.
            return {"optimizer_class": optimizer_class("adam")}
        if algo == "a2c" and name == "rmsprop":
            return {}
    merged = {**_sb3_first_order_kwargs(name, algo, rms_prop_eps), **kwargs}
    return {"optimizer_class": optimizer_class(name), "optimizer_kwargs": merged}


def build_optimizer(config: dict, groups: list[dict], lr: float, algo: str, rms_prop_eps: float = 1e-5):
    """Build the curvature-path optimizer over named ``groups`` (``[{"name": ..., "params": [...]}]``).

    The base optimizer is torch's Adam/RMSprop/SGD (with SB3's defaults for the algorithm, overridden
    by ``kwargs``), ``hesscale.optim.AdaHesScale`` or ``hesscale.optim.AdaHessian``; with
    ``scaling.enabled`` it is wrapped in ``hesscale.optim.StepSizeScaling``.
    """
    import hesscale.optim as hoptim

    name, kwargs = config["name"], dict(config["kwargs"])
    groups = [dict(g) for g in groups if len(g["params"]) > 0]
    if name in _TORCH_CLASSES:
        kwargs = {**_sb3_first_order_kwargs(name, algo, rms_prop_eps), **kwargs}
    base = optimizer_class(name)(groups, lr=lr, **kwargs)
    if not config["scaling"]["enabled"]:
        return base
    s = config["scaling"]
    return hoptim.StepSizeScaling(base, delta=s["delta"], max_scale=s["max_scale"], beta=s["beta"])

