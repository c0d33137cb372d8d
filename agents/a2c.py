"""A2C whose update can use HesScale curvature (AdaHesScale, step-size scaling, AdaHessian)."""

from __future__ import annotations

import torch as th
from gymnasium import spaces
from stable_baselines3 import A2C as SB3A2C
from stable_baselines3.common.utils import explained_variance
from torch.nn import functional as F

from .on_policy import OnPolicyCurvatureMixin
from .policy_hessians import value_mse_derivatives


class A2C(OnPolicyCurvatureMixin, SB3A2C):
    """SB3's A2C with an ``optimizer`` choice (see :mod:`agents.optimizers`).

    ``optimizer=None`` keeps SB3's RMSprop (``use_rms_prop=True``); ``{"name": "adam"}`` is Adam as
    SB3 builds it. Curvature optimizers run :meth:`_train_curvature`: upstream's loss code with the
    optimisation block replaced by the shared :class:`~agents.second_order.CurvatureUpdate`
    (``normalize_advantage``, ``ent_coef``, ``vf_coef``, schedules honoured; gSDE rejected).
    """

    _algo = "a2c"

    def _train_curvature(self) -> None:
        """Upstream ``A2C.train()`` (SB3 2.9.2) with the optimisation block replaced."""
        update = self._updates["policy"]
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)

        for rollout_data in self.rollout_buffer.get(batch_size=None):
            actions = rollout_data.actions
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.long().flatten()

            with update.capture() as cap:
                values, log_prob, entropy = self.policy.evaluate_actions(rollout_data.observations, actions)
            heads = self._head_outputs(cap)
            values = values.flatten()

            advantages = rollout_data.advantages
            if self.normalize_advantage:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

            policy_loss = -(advantages * log_prob).mean()
            value_loss = F.mse_loss(rollout_data.returns, values)
            if entropy is None:
                entropy_loss = -th.mean(-log_prob)
            else:
                entropy_loss = -th.mean(entropy)

            loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss

            # Optimization step: gradient + curvature + (scaled) step, one shared implementation.
            closed_forms = {}
            if heads is not None:
                dl = -advantages / advantages.numel()
                value_g, value_h = value_mse_derivatives(heads[1], values, rollout_data.returns, self.vf_coef)
                closed_forms = self._head_derivatives(heads, actions, dl, None, value_g, value_h)
            update.step(cap, loss, **closed_forms)

        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())

        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/entropy_loss", entropy_loss.item())
        self.logger.record("train/policy_loss", policy_loss.item())
        self.logger.record("train/value_loss", value_loss.item())
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
