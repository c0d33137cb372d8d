"""What A2C, PPO and SAC share: the optimizer dict, the choice of update path, divergence handling.

:class:`CurvatureAgentMixin` sits in front of an SB3 algorithm class (``class PPO(CurvatureAgentMixin,
sb3.PPO)``) and touches SB3 at five narrow points only:

* ``__init__``: validates the ``optimizer`` dict and, for a first-order optimizer, hands it to SB3
  through ``policy_kwargs`` (so SB3 builds it exactly as it would); SB3 gets copies of the dicts
  and lists it is given (it writes into some), so one ``policy_kwargs`` dict builds many agents;
* ``_setup_model``: after SB3's own setup, replaces the optimizer(s) by the curvature optimizer(s)
  and builds one :class:`~agents.second_order.CurvatureUpdate` per optimizer (this also runs on
  ``load()``, before SB3 restores the optimizer state);
* ``_setup_learn`` (and the end of ``__init__``, but not ``load()``): every captured module has a
  HesScale rule, else an error naming it (``features_extractor.bn``) and the way out;
* ``train``: SB3's ``train()`` for first-order optimizers, the subclass's ``_train_curvature()``
  otherwise; both under divergence handling;
* ``collect_rollouts``: stops ``learn()`` cleanly once the run has diverged, and turns a NaN
  distribution error while acting into a divergence.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch as th

from hesscale.optim._common import all_finite

from .divergence import Diverged, is_divergence_error, log
from .optimizers import first_order_policy_kwargs, normalize_optimizer_config, uses_curvature


def own_containers(value: Any) -> Any:
    """``value`` with every dict and list in it copied (recursively); other objects (classes,
    callables, spaces, tensors) are shared as they are."""
    if isinstance(value, dict):
        return {k: own_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [own_containers(v) for v in value]
    return value


class CurvatureAgentMixin:
    """Mixin for SB3 algorithms: ``optimizer=`` dict, curvature-path ``train()``, divergence stop."""

    _algo: ClassVar[str]
    optimizer_config: dict
    divergence: dict | None

    def __init__(
        self,
        policy: Any,
        env: Any,
        *args: Any,
        optimizer: dict | None = None,
        force_curvature_path: bool = False,
        **kwargs: Any,
    ) -> None:
        """``optimizer``: the dict of :mod:`agents.optimizers`. ``force_curvature_path=True`` runs the
        curvature path's ``train()`` even for a first-order optimizer without scaling: a reference
        route (with plain Adam it reproduces SB3's own ``train()`` to float rounding)."""
        # SB3 writes into some of the dicts it is given (A2C: policy_kwargs["optimizer_class"]):
        # it gets copies, so the caller's dicts can build the next agent unchanged.
        kwargs = {key: own_containers(value) for key, value in kwargs.items()}
        if optimizer is None and self._algo == "a2c" and kwargs.get("use_rms_prop") is False:
            optimizer = {"name": "adam"}  # what SB3 builds then; keeps optimizer_config truthful
        config = normalize_optimizer_config(optimizer, self._algo)
        policy_kwargs = dict(kwargs.get("policy_kwargs") or {})
        if optimizer is not None and {"optimizer_class", "optimizer_kwargs"} & policy_kwargs.keys():
            raise ValueError(
                "pass the optimizer either as optimizer={...} or through policy_kwargs "
                "optimizer_class/optimizer_kwargs, not both"
            )
        self._rms_prop_eps = float(kwargs.get("rms_prop_eps", 1e-5))
        extra = first_order_policy_kwargs(config, self._algo, rms_prop_eps=self._rms_prop_eps)
        if extra:
            policy_kwargs.update(extra)
            kwargs["policy_kwargs"] = policy_kwargs
        self.optimizer_config = config
        self.divergence = None
        self._updates: dict = {}
        self.force_curvature_path = bool(force_curvature_path)
        super().__init__(policy, env, *args, **kwargs)
        self.check_curvature_modules()  # not on load(): a saved model always loads and acts

    # -- setup --------------------------------------------------------------------------------
    @property
    def uses_curvature(self) -> bool:
        """Whether ``train()`` is the curvature path (else SB3's own ``train()``)."""
        return uses_curvature(self.optimizer_config) or self.force_curvature_path

    def _setup_model(self) -> None:
        # Idempotent; after load() it also restores tuples that SB3's JSON save turned into lists.
        self.optimizer_config = normalize_optimizer_config(self.optimizer_config, self._algo)
        super()._setup_model()  # type: ignore[misc]
        self._updates = {}
        if self.uses_curvature:
            self._setup_curvature()

    def _setup_curvature(self) -> None:  # pragma: no cover - each algorithm implements it
        raise NotImplementedError

    def check_curvature_modules(self) -> None:
        """Raise :class:`hesscale.UnsupportedModuleError` (path in the policy, type, supported types,
        way out) if a captured module has no HesScale rule; runs at construction and ``learn()``."""
        from hesscale import UnsupportedModuleError

        try:
            for update in self._updates.values():
                update.check_modules()
        except UnsupportedModuleError as exc:
            raise exc.with_way_out(
                f"{type(self).__name__} with the curvature optimizer {self.optimizer_config['name']!r} "
                "needs a rule for every module it trains: register one with hesscale.register_rule(type, "
                "rule), or use a first-order optimizer without scaling (optimizer={'name': 'adam'})."
            ) from None

    def _setup_learn(self, *args: Any, **kwargs: Any) -> Any:
        self.check_curvature_modules()
        return super()._setup_learn(*args, **kwargs)  # type: ignore[misc]

    def _excluded_save_params(self) -> list[str]:
        return super()._excluded_save_params() + ["_updates"]  # type: ignore[misc]

    # -- training ---------------------------------------------------------------------------
    def train(self, *args: Any, **kwargs: Any) -> None:
        if self.divergence is not None:
            return
        try:
            if self.uses_curvature:
                self._train_curvature(*args, **kwargs)
            else:
                super().train(*args, **kwargs)  # type: ignore[misc]
            if not all_finite(self._divergence_watch()):
                raise Diverged("non-finite parameters after the update")
        except (Diverged, ValueError) as exc:
            if not is_divergence_error(exc, self._divergence_watch()):
                raise
            self._mark_diverged(str(exc))
        if self.uses_curvature:
            for update in self._updates.values():
                update.record(self.logger)
            self.logger.record("train/skipped_steps", sum(u.skipped_steps for u in self._updates.values()))

    def _train_curvature(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover
        raise NotImplementedError

    def _divergence_watch(self) -> list[th.Tensor]:
        """Tensors that must stay finite (the parameters of every trained network)."""
        return list(self.policy.parameters())  # type: ignore[attr-defined]

    # -- divergence --------------------------------------------------------------------------
    def _stopped_rollout(self) -> Any:  # pragma: no cover - per algorithm family
        raise NotImplementedError

    def collect_rollouts(self, *args: Any, **kwargs: Any) -> Any:
        if self.divergence is not None:
            return self._stopped_rollout()
        try:
            return super().collect_rollouts(*args, **kwargs)  # type: ignore[misc]
        except ValueError as exc:
            if not is_divergence_error(exc, self._divergence_watch()):
                raise
            self._mark_diverged(f"while acting: {exc}")
            return self._stopped_rollout()

    def _mark_diverged(self, reason: str) -> None:
        step = int(self.num_timesteps)  # type: ignore[attr-defined]
        reason = reason.splitlines()[0][:300] if reason else "non-finite values"
        self.divergence = {"step": step, "reason": reason}
        log.warning("%s diverged at step %d: %s", type(self).__name__, step, reason)
        logger = getattr(self, "_logger", None)
        if logger is not None:
            logger.record("train/diverged", 1)
            logger.record("train/diverged_step", step)
            logger.dump(step=step)
        if getattr(self, "verbose", 0) >= 1:
            print(f"{type(self).__name__} diverged at step {step}: {reason}")
