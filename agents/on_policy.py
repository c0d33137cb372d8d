"""What PPO and A2C share on the curvature path: param groups ``pi``/``log_std``/``vf`` of an
``ActorCriticPolicy``, one optimizer over them, one :class:`CurvatureUpdate`."""

from __future__ import annotations

from typing import Any

import torch as th
from stable_baselines3.common.distributions import DiagGaussianDistribution, StateDependentNoiseDistribution
from torch import nn

from .base import CurvatureAgentMixin
from .optimizers import build_optimizer
from .policy_hessians import gaussian_head_derivatives, gsde_log_prob_hessians
from .second_order import CurvatureUpdate, named_in


def _params(module: nn.Module | None) -> list[nn.Parameter]:
    return [] if module is None else list(module.parameters())


def actor_critic_groups(policy: nn.Module) -> list[dict[str, Any]]:
    """Named param groups of an SB3 ``ActorCriticPolicy``: one step-size scale per network.

    * ``pi``: the actor's features extractor (also a shared one), ``mlp_extractor.policy_net`` and
      ``action_net`` (trunk + mean head / logits);
    * ``log_std``: the state-independent log standard deviation (Gaussian policies only);
    * ``vf``: the critic's own features extractor, ``mlp_extractor.value_net`` and ``value_net``.
    """
    try:
        mlp = policy.mlp_extractor
        pi = []
        vf = []
        if policy.share_features_extractor:
            pi += _params(policy.features_extractor)
        else:
            pi += _params(policy.pi_features_extractor)
            vf += _params(policy.vf_features_extractor)
        pi += _params(mlp.policy_net) + _params(policy.action_net)
        vf += _params(mlp.value_net) + _params(policy.value_net)
    except AttributeError as exc:
        raise ValueError(
            f"curvature optimizers need an SB3 ActorCriticPolicy with mlp_extractor.policy_net/value_net; {exc}"
        ) from exc
    log_std = policy.log_std if isinstance(getattr(policy, "log_std", None), nn.Parameter) else None
    groups = [{"name": "pi", "params": pi}]
    if log_std is not None:
        groups.append({"name": "log_std", "params": [log_std]})
    groups.append({"name": "vf", "params": vf})
    grouped = [id(p) for g in groups for p in g["params"]]
    expected = {id(p) for p in policy.parameters()}
    if len(grouped) != len(set(grouped)) or set(grouped) != expected:
        raise ValueError(
            "curvature optimizers: the policy's parameters do not split into pi / log_std / vf "
            "(a custom policy with extra or shared parameters?)"
        )
    return groups


def actor_critic_modules(policy: nn.Module) -> list[nn.Module]:
    """The modules whose forward is captured: features extractors with parameters, the MLP
    extractor, the action and value heads."""
    modules: list[nn.Module] = []
    extractors = (
        [policy.features_extractor]
        if policy.share_features_extractor
        else [policy.pi_features_extractor, policy.vf_features_extractor]
    )
    modules += [m for m in extractors if any(True for _ in m.parameters())]
    modules += [policy.mlp_extractor, policy.action_net, policy.value_net]
    return modules


def has_closed_form_heads(dist) -> bool:
    """Whether :mod:`agents.policy_hessians` has the head Hessians of ``dist`` in closed form: SB3's
    diagonal Gaussian, and gSDE as PPO/A2C build it (``full_std``, no ``expln``, no squashing,
    detached latent); other distributions take the core's autograd route."""
    if type(dist) is DiagGaussianDistribution:
        return True
    return (
        type(dist) is StateDependentNoiseDistribution
        and dist.full_std and not dist.use_expln and dist.bijector is None and not dist.learn_features
    )


class OnPolicyCurvatureMixin(CurvatureAgentMixin):
    """PPO/A2C: replace ``policy.optimizer`` by the curvature optimizer over named groups.

    For SB3's Gaussian policy the loss Hessians w.r.t. the heads (action mean, value, ``log_std``)
    are passed in closed form (:mod:`agents.policy_hessians`); other action distributions, or
    ``closed_form_heads=False`` (the reference route the closed forms are tested against), get
    them exactly from the core by autograd.
    """

    def __init__(self, *args: Any, closed_form_heads: bool = True, **kwargs: Any) -> None:
        self.closed_form_heads = bool(closed_form_heads)
        super().__init__(*args, **kwargs)

    def _setup_curvature(self) -> None:
        cfg = self.optimizer_config
        policy = self.policy
        groups = actor_critic_groups(policy)
        optimizer = build_optimizer(cfg, groups, lr=self.lr_schedule(1), algo=self._algo, rms_prop_eps=self._rms_prop_eps)
        policy.optimizer = optimizer  # SB3 saves/loads and schedules `policy.optimizer`
        self._gaussian_heads = self.closed_form_heads and has_closed_form_heads(policy.action_dist)
        log_std = [g["params"][0] for g in groups if g["name"] == "log_std"]
        self._updates = {
            "policy": CurvatureUpdate(
                optimizer,
                named_in(policy, actor_critic_modules(policy)),
                leaf_params=[] if self._gaussian_heads else log_std,
                method=cfg["curvature"],
                max_grad_norm=self.max_grad_norm,  # SB3's argument: both paths clip alike
                create_graph=cfg["name"] == "adahessian",
                clip_params=list(policy.parameters()),
            )
        }

    def _head_outputs(self, cap) -> tuple[th.Tensor, th.Tensor, tuple | None] | None:
        """``(mean_actions, values, gsde)``: the head outputs of the ``policy.evaluate_actions`` call
        just recorded by ``cap`` and, with gSDE, the distribution's ``(variance, latent)`` read before
        the next forward replaces them (``None`` unless the closed forms apply)."""
        if cap is None or not self._gaussian_heads:
            return None
        dist = self.policy.action_dist
        gsde = None
        if isinstance(dist, StateDependentNoiseDistribution):
            gsde = dist.distribution.variance.detach(), dist._latent_sde
        return cap.outputs(self.policy.action_net)[-1], cap.outputs(self.policy.value_net)[-1], gsde

    def _head_derivatives(self, heads, actions, dl, d2l, value_g, value_h) -> dict:
        """``step()`` keyword arguments with the closed-form head derivatives (empty without heads):
        the per-sample output Hessians, and without gSDE the whole outside gradient too (mean head,
        value head, ``log_std``), so the update needs no autograd call."""
        if heads is None:
            return {}
        mean_actions, values, gsde = heads
        if gsde is not None:
            variance, latent = gsde
            h_mean, h_log_std = gsde_log_prob_hessians(
                mean_actions, variance, latent, self.policy.log_std, actions, dl, d2l,
                entropy_weight=-self.ent_coef / actions.shape[0],
            )
            return {
                "output_hessians": {mean_actions: h_mean, values: value_h},
                "leaf_hessians": {self.policy.log_std: h_log_std},
            }
        log_std = self.policy.log_std
        g_mean, g_log_std, h_mean, h_log_std = gaussian_head_derivatives(
            mean_actions, log_std, actions, dl, d2l, self.ent_coef
        )
        return {
            "output_hessians": {mean_actions: h_mean, values: value_h},
            "leaf_hessians": {log_std: h_log_std},
            "output_grads": {mean_actions: g_mean, values: value_g, log_std: g_log_std},
        }

    def _stopped_rollout(self) -> bool:
        return False
