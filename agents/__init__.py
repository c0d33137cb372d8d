"""A2C, PPO and SAC on Stable-Baselines3 policies, updated through the HesScale core.

``agents.PPO("MlpPolicy", env, optimizer={...}, **sb3_kwargs)`` (same for ``A2C``, ``SAC``): the
``optimizer`` dict is described in :mod:`agents.optimizers`; ``None`` (or a first-order optimizer
without scaling) is SB3's own algorithm, bit for bit. Curvature optimizers go through one shared
update (:class:`agents.second_order.CurvatureUpdate`). A run that produces NaN/Inf stops ``learn()``
cleanly and sets ``model.divergence = {"step": ..., "reason": ...}`` (``None`` while healthy).
"""

from .a2c import A2C
from .optimizers import CURVATURE_METHODS, OPTIMIZER_NAMES, normalize_optimizer_config
from .ppo import PPO
from .sac import SAC
from .second_order import CurvatureUpdate

__all__ = ["A2C", "CURVATURE_METHODS", "OPTIMIZER_NAMES", "PPO", "SAC", "CurvatureUpdate", "normalize_optimizer_config"]
