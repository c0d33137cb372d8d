"""What PPO and A2C share on the curvature path: param groups ``pi``/``log_std``/``vf`` of an
``ActorCriticPolicy``, one optimizer over them, one :class:`CurvatureUpdate`."""

from __future__ import annotations

from typing import Any

import torch as th
from stable_baselines3.common.distributions import DiagGaussianDistribution
from torch import nn

from .base import CurvatureAgentMixin
from .optimizers import build_optimizer
from .policy_hessians import gaussian_log_prob_hessians
from .second_order import CurvatureUpdate


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


class OnPolicyCurvatureMixin(CurvatureAgentMixin):
    """PPO/A2C: replace ``policy.optimizer`` by the curvature optimizer over named groups.

    For SB3's Gaussian policy the loss Hessians w.r.t. the heads (action mean, value, ``log_std``)
    are passed in closed form (:mod:`agents.policy_hessians`); other action distributions get
    them exactly from the core by autograd.
    """

    #: closed-form head Hessians for Gaussian policies (tests switch it off for the autograd route)
    _closed_form_heads: bool = True

    def _setup_curvature(self) -> None:
        cfg = self.optimizer_config
        policy = self.policy
        groups = actor_critic_groups(policy)
        optimizer = build_optimizer(cfg, groups, lr=self.lr_schedule(1), algo=self._algo, rms_prop_eps=self._rms_prop_eps)
        policy.optimizer = optimizer  # SB3 saves/loads and schedules `policy.optimizer`
        self._gaussian_heads = self._closed_form_heads and type(policy.action_dist) is DiagGaussianDistribution
        log_std = [g["params"][0] for g in groups if g["name"] == "log_std"]
        self._updates = {
            "policy": CurvatureUpdate(
                optimizer,
                actor_critic_modules(policy),
                leaf_params=[] if self._gaussian_heads else log_std,
                method=cfg["curvature"],
                max_grad_norm=cfg["max_grad_norm"],
                create_graph=cfg["name"] == "adahessian",
                clip_params=list(policy.parameters()),
            )
        }

    def _evaluate_actions(self, obs: th.Tensor, actions: th.Tensor):
        """``policy.evaluate_actions(obs, actions)`` plus the head outputs ``(mean_actions, values)``
        as the captured modules returned them (``None`` unless the closed forms apply).

        Same operations in the same order as SB3 2.9.2's ``ActorCriticPolicy.evaluate_actions``.
        """
        policy = self.policy
        if not self._gaussian_heads:
            return (*policy.evaluate_actions(obs, actions), None)
        features = policy.extract_features(obs)
        if policy.share_features_extractor:
            latent_pi, latent_vf = policy.mlp_extractor(features)
        else:
            pi_features, vf_features = features
            latent_pi = policy.mlp_extractor.forward_actor(pi_features)
            latent_vf = policy.mlp_extractor.forward_critic(vf_features)
        mean_actions = policy.action_net(latent_pi)
        distribution = policy.action_dist.proba_distribution(mean_actions, policy.log_std)
        log_prob = distribution.log_prob(actions)
        values = policy.value_net(latent_vf)
        entropy = distribution.entropy()
        return values, log_prob, entropy, (mean_actions, values)

    def _head_hessians(self, heads, actions, dl, d2l, value_h) -> dict:
        """``step()`` keyword arguments with the closed-form head Hessians (empty without heads)."""
        if heads is None:
            return {}
        mean_actions, values = heads
        h_mean, h_log_std = gaussian_log_prob_hessians(mean_actions, self.policy.log_std, actions, dl, d2l)
        return {
            "output_hessians": {mean_actions: h_mean, values: value_h},
            "leaf_hessians": {self.policy.log_std: h_log_std},
        }

    def _stopped_rollout(self) -> bool:
        return False
