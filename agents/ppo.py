"""PPO whose update can use HesScale curvature (AdaHesScale, step-size scaling, AdaHessian)."""

from __future__ import annotations

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO as SB3PPO
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

from .on_policy import OnPolicyCurvatureMixin
from .policy_hessians import ppo_surrogate_dl, value_mse_derivatives


class PPO(OnPolicyCurvatureMixin, SB3PPO):
    """SB3's PPO with an ``optimizer`` choice (see :mod:`agents.optimizers`).

    ``PPO("MlpPolicy", env, optimizer={"name": "adahesscale", "scaling": {"enabled": True}}, ...)``.
    With ``optimizer=None`` or a first-order optimizer without scaling this *is* SB3's PPO (its own
    ``train()``). Otherwise :meth:`_train_curvature` runs: upstream's loss code, with its
    optimisation block replaced by the shared :class:`~agents.second_order.CurvatureUpdate`
    (``normalize_advantage``, ``clip_range_vf``, ``target_kl``, ``ent_coef``, ``vf_coef`` and
    learning-rate schedules are honoured; gSDE is rejected).
    """

    _algo = "ppo"

    def _train_curvature(self) -> None:
        """Upstream ``PPO.train()`` (SB3 2.9.2) with the optimisation block replaced."""
        update = self._updates["policy"]
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]

        entropy_losses = []
        pg_losses, value_losses = [], []
        clip_fractions = []

        continue_training = True
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = rollout_data.actions.long().flatten()

                with update.capture() as cap:
                    values, log_prob, entropy = self.policy.evaluate_actions(rollout_data.observations, actions)
                heads = self._head_outputs(cap)
                values = values.flatten()
                advantages = rollout_data.advantages
                if self.normalize_advantage and len(advantages) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

                ratio = th.exp(log_prob - rollout_data.old_log_prob)
                policy_loss_1 = advantages * ratio
                policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
                policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()

                pg_losses.append(policy_loss.item())
                clip_fraction = th.mean((th.abs(ratio - 1) > clip_range).float()).item()
                clip_fractions.append(clip_fraction)

                if self.clip_range_vf is None:
                    values_pred = values
                else:
                    values_pred = rollout_data.old_values + th.clamp(
                        values - rollout_data.old_values, -clip_range_vf, clip_range_vf
                    )
                value_loss = F.mse_loss(rollout_data.returns, values_pred)
                value_losses.append(value_loss.item())

                if entropy is None:
                    entropy_loss = -th.mean(-log_prob)
                else:
                    entropy_loss = -th.mean(entropy)
                entropy_losses.append(entropy_loss.item())

                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss

                with th.no_grad():
                    log_ratio = log_prob - rollout_data.old_log_prob
                    approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                    approx_kl_divs.append(approx_kl_div)

                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                    break

                # Optimization step: gradient + curvature + (scaled) step, one shared implementation.
                closed_forms = {}
                if heads is not None:
                    dl = ppo_surrogate_dl(policy_loss_1, policy_loss_2, ratio, clip_range)
                    value_g, value_h = value_mse_derivatives(
                        heads[1], values_pred, rollout_data.returns, self.vf_coef, rollout_data.old_values,
                        None if self.clip_range_vf is None else clip_range_vf,
                    )
                    closed_forms = self._head_derivatives(heads, actions, dl, dl, value_g, value_h)
                update.step(cap, loss, **closed_forms)

            self._n_updates += 1
            if not continue_training:
                break

        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())

        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())

        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if self.clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
