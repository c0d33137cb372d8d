"""SAC whose actor and critic updates can use HesScale curvature.

Critic: curvature of SB3's critic loss ``0.5·Σ_i MSE(Q_i(s, a), y)`` (per-sample output Hessian
``1/N`` per Q-value, in closed form). Actor: curvature of ``mean(α·log π(ã|s) − min_i Q_i(s, ã))`` through the critics, the
``tanh`` squashing and the entropy term, w.r.t. the actor's two heads (mean ``mu`` and the
pre-clamp ``log_std`` output), then the HesScale sweep through the actor's trunk. Two routes for
the heads' per-sample output Hessians (``optimizer["actor_curvature"]``):

* ``"exact"``: the core differentiates the loss twice by autograd, through both critics: one
  batched Hessian-vector product per head output (``2·act_dim`` products through the critics,
  each about the cost of a critic forward + double backward).
* ``"gn"`` (default): the critic linearised in the action (its action-Hessian dropped) and a closed
  form for the Gaussian/tanh part (:func:`agents.policy_hessians.sac_actor_head_derivatives`; one extra
  backward through the critics, to the action only). With ReLU critics (SB3's default) ``Q`` is
  piecewise linear in the action, so ``"gn"`` equals ``"exact"`` up to rounding.

``optimizer["critic_optimizer"]`` (``"adam"``, ...) keeps the critic on that first-order optimizer,
updated as SB3 updates it (``loss.backward()``, the optimizer's step), while the actor takes the
curvature path. SB3's entropy-coefficient optimizer (Adam on ``log_ent_coef``) is left as it is.
"""

from __future__ import annotations

import numpy as np
import torch as th
from stable_baselines3 import SAC as SB3SAC
from stable_baselines3.common.type_aliases import RolloutReturn
from stable_baselines3.common.utils import polyak_update
from stable_baselines3.sac.policies import LOG_STD_MAX, LOG_STD_MIN
from torch.nn import functional as F

from .base import CurvatureAgentMixin
from .optimizers import build_optimizer, first_order_config
from .policy_hessians import sac_actor_head_derivatives, sac_gsde_hessians, value_mse_derivatives
from .second_order import CurvatureUpdate, named_in


def _has_params(module: th.nn.Module) -> bool:
    return any(True for _ in module.parameters())


class SAC(CurvatureAgentMixin, SB3SAC):
    """SB3's SAC with an ``optimizer`` choice (see :mod:`agents.optimizers` and the module doc).

    Curvature optimizers replace ``actor.optimizer`` (group ``actor``) and ``critic.optimizer``
    (group ``critic``: both Q-networks, one step-size scale) and run :meth:`_train_curvature`:
    upstream's ``train()`` with the two optimisation blocks replaced by the shared
    :class:`~agents.second_order.CurvatureUpdate` (``target_update_interval``, n-step discounts,
    fixed or learned ``ent_coef`` honoured, gSDE included).
    """

    _algo = "sac"

    def _setup_curvature(self) -> None:
        cfg = self.optimizer_config
        lr = self.lr_schedule(1)
        create_graph = cfg["name"] == "adahessian"
        actor, critic = self.actor, self.critic

        actor_params = list(actor.parameters())
        self.actor.optimizer = build_optimizer(cfg, [{"name": "actor", "params": actor_params}], lr, "sac")
        # gSDE: ``log_std`` is the [K, A] exploration matrix parameter, not a head.
        actor_modules = [actor.latent_pi, actor.mu] + ([] if self.use_sde else [actor.log_std])
        if _has_params(actor.features_extractor):
            actor_modules.insert(0, actor.features_extractor)
        dist = actor.action_dist
        # The closed forms (``"gn"``): gSDE with SB3's default ``full_std`` and ``exp`` only; else autograd.
        self._actor_gn = cfg["actor_curvature"] == "gn" and not create_graph and (
            not self.use_sde or (dist.full_std and not dist.use_expln)
        )
        actor_leaf = [actor.log_std] if self.use_sde and not self._actor_gn else []

        if critic.share_features_extractor:
            critic_params = [p for n, p in critic.named_parameters() if "features_extractor" not in n]
        else:
            critic_params = list(critic.parameters())
        critic_first_order = cfg["critic_optimizer"] is not None  # the critic as SB3 updates it
        critic_cfg = first_order_config(cfg["critic_optimizer"]) if critic_first_order else cfg
        self.critic.optimizer = build_optimizer(critic_cfg, [{"name": "critic", "params": critic_params}], lr, "sac")
        critic_modules = list(critic.q_networks)
        if not critic.share_features_extractor and _has_params(critic.features_extractor):
            critic_modules.insert(0, critic.features_extractor)

        # No clipping: SB3's SAC never clips (the first-order arm), so neither does this path.
        self._updates = {
            "actor": CurvatureUpdate(
                self.actor.optimizer, named_in(self.policy, actor_modules), leaf_params=actor_leaf,
                clip_params=actor_params, method=cfg["curvature"], create_graph=create_graph,
            ),
            "critic": CurvatureUpdate(
                self.critic.optimizer, named_in(self.policy, critic_modules), clip_params=critic_params,
                method=cfg["curvature"], create_graph=create_graph and not critic_first_order,
                first_order=critic_first_order,
            ),
        }

    def _stopped_rollout(self) -> RolloutReturn:
        return RolloutReturn(0, 0, False)

    def _divergence_watch(self) -> list[th.Tensor]:
        tensors = list(self.actor.parameters()) + list(self.critic.parameters())
        if self.log_ent_coef is not None:
            tensors.append(self.log_ent_coef)
        return tensors

    def _actor_heads(self, cap) -> tuple[th.Tensor, ...]:
        """What the closed forms need from the ``actor.action_log_prob`` call just recorded by ``cap``
        (read at once: the next call of the actor overwrites the distribution's state).

        Without gSDE: the two head outputs (``log_std`` before SB3's clamp) and the Gaussian sample
        ``u``. With gSDE: the mean head's output (the last module of ``mu``, SB3's ``Hardtanh``
        clip), the latent ``z`` as the trunk returned it, the exploration matrix and the variance.
        """
        actor = self.actor
        if not self.use_sde:
            return cap.outputs(actor.mu)[-1], cap.outputs(actor.log_std)[-1], actor.action_dist.gaussian_actions
        last_mu = [m for m in actor.mu.modules() if next(m.children(), None) is None][-1]
        dist = actor.action_dist
        return cap.outputs(last_mu)[-1], dist._latent_sde, dist.exploration_mat, dist.distribution.variance.detach()

    def _actor_gn_derivatives(self, heads, actions_pi, min_qf_pi, ent_coef, cap) -> dict[str, dict]:
        """``step()`` keyword arguments with the closed-form Hessians of the actor loss (``"gn"``, see
        :func:`~agents.policy_hessians.sac_actor_head_derivatives` and ``sac_gsde_hessians``) and,
        without gSDE, its gradient at the heads too; one backward through the critics, to the action."""
        (dq_da,) = th.autograd.grad(min_qf_pi.sum(), actions_pi, retain_graph=True)
        epsilon = self.actor.action_dist.epsilon
        if not self.use_sde:
            mean_actions, log_std_raw, gaussian_actions = heads
            g_mu, g_log_std, h_mu, h_log_std = sac_actor_head_derivatives(
                mean_actions, log_std_raw, gaussian_actions, actions_pi, dq_da, ent_coef, epsilon,
                (LOG_STD_MIN, LOG_STD_MAX),
            )
            return {"output_hessians": {mean_actions: h_mu, log_std_raw: h_log_std},
                    "output_grads": {mean_actions: g_mu, log_std_raw: g_log_std}}
        mean_actions, latent, exploration_mat, variance = heads
        h_mu, h_latent, h_log_std = sac_gsde_hessians(
            latent, self.actor.log_std, exploration_mat, variance, actions_pi, dq_da, ent_coef, epsilon
        )
        outputs = {mean_actions: h_mu}
        if cap.is_captured_output(latent):  # else the latent is the features: no trunk to pass it to
            outputs[latent] = h_latent
        return {"output_hessians": outputs, "leaf_hessians": {self.actor.log_std: h_log_std}}

    def _train_curvature(self, gradient_steps: int, batch_size: int = 64) -> None:
        """Upstream ``SAC.train()`` (SB3 2.9.2) with the two optimisation blocks replaced."""
        actor_update, critic_update = self._updates["actor"], self._updates["critic"]
        gn = self._actor_gn
        self.policy.set_training_mode(True)
        optimizers = [self.actor.optimizer, self.critic.optimizer]
        if self.ent_coef_optimizer is not None:
            optimizers += [self.ent_coef_optimizer]
        self._update_learning_rate(optimizers)

        ent_coef_losses, ent_coefs = [], []
        actor_losses, critic_losses = [], []

        for gradient_step in range(gradient_steps):
            replay_data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            discounts = replay_data.discounts if replay_data.discounts is not None else self.gamma

            # We need to sample because `log_std` may have changed between two gradient steps
            if self.use_sde:
                self.actor.reset_noise()

            with actor_update.capture() as actor_cap:
                actions_pi, log_prob = self.actor.action_log_prob(replay_data.observations)
            heads = self._actor_heads(actor_cap) if gn else None
            log_prob = log_prob.reshape(-1, 1)

            ent_coef_loss = None
            if self.ent_coef_optimizer is not None and self.log_ent_coef is not None:
                ent_coef = th.exp(self.log_ent_coef.detach())
                assert isinstance(self.target_entropy, float)
                ent_coef_loss = -(self.log_ent_coef * (log_prob + self.target_entropy).detach()).mean()
                ent_coef_losses.append(ent_coef_loss.item())
            else:
                ent_coef = self.ent_coef_tensor

            ent_coefs.append(ent_coef.item())

            if ent_coef_loss is not None and self.ent_coef_optimizer is not None:
                self.ent_coef_optimizer.zero_grad()
                ent_coef_loss.backward()
                self.ent_coef_optimizer.step()

            with th.no_grad():
                next_actions, next_log_prob = self.actor.action_log_prob(replay_data.next_observations)
                next_q_values = th.cat(self.critic_target(replay_data.next_observations, next_actions), dim=1)
                next_q_values, _ = th.min(next_q_values, dim=1, keepdim=True)
                next_q_values = next_q_values - ent_coef * next_log_prob.reshape(-1, 1)
                target_q_values = replay_data.rewards + (1 - replay_data.dones) * discounts * next_q_values

            with critic_update.capture() as critic_cap:
                current_q_values = self.critic(replay_data.observations, replay_data.actions)

            critic_loss = 0.5 * sum(F.mse_loss(current_q, target_q_values) for current_q in current_q_values)
            assert isinstance(critic_loss, th.Tensor)
            critic_losses.append(critic_loss.item())

            # Optimize the critic: gradient + curvature + (scaled) step; each Q-network's 0.5·MSE has
            # the closed forms ∂/∂q = (q − y)/N, ∂²/∂q² = 1/N (value_mse_derivatives, vf_coef 0.5),
            # so no autograd call (else the core's autograd route: one HVP per Q-network).
            captured = [q for q in current_q_values if critic_cap is not None and critic_cap.is_captured_output(q)]
            derivatives = {q: value_mse_derivatives(q, q.reshape(-1), target_q_values.reshape(-1), 0.5) for q in captured}
            critic_forms = {"output_hessians": {q: h for q, (_, h) in derivatives.items()}} if captured else {}
            if captured and len(captured) == len(current_q_values):
                critic_forms["output_grads"] = {q: g for q, (g, _) in derivatives.items()}
            critic_update.step(critic_cap, critic_loss, **critic_forms)

            q_values_pi = th.cat(self.critic(replay_data.observations, actions_pi), dim=1)
            min_qf_pi, _ = th.min(q_values_pi, dim=1, keepdim=True)
            actor_loss = (ent_coef * log_prob - min_qf_pi).mean()
            actor_losses.append(actor_loss.item())

            # Optimize the actor: gradient + curvature (through the critics) + (scaled) step.
            closed_forms = self._actor_gn_derivatives(heads, actions_pi, min_qf_pi, ent_coef, actor_cap) if gn else {}
            actor_update.step(actor_cap, actor_loss, **closed_forms)

            if gradient_step % self.target_update_interval == 0:
                polyak_update(self.critic.parameters(), self.critic_target.parameters(), self.tau)
                polyak_update(self.batch_norm_stats, self.batch_norm_stats_target, 1.0)

        self._n_updates += gradient_steps

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/ent_coef", np.mean(ent_coefs))
        self.logger.record("train/actor_loss", np.mean(actor_losses))
        self.logger.record("train/critic_loss", np.mean(critic_losses))
        if len(ent_coef_losses) > 0:
            self.logger.record("train/ent_coef_loss", np.mean(ent_coef_losses))
