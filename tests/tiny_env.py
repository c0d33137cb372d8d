"""A tiny gymnasium env over any observation/action space, for agent tests (shared by the folders)."""

from __future__ import annotations

import gymnasium as gym


class TinyEnv(gym.Env):
    """Random observations of the given space, Gaussian rewards, episodes of 8 steps."""

    def __init__(self, observation_space, action_space):
        self.observation_space, self.action_space = observation_space, action_space
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.observation_space.seed(seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        self.t += 1
        return self.observation_space.sample(), float(self.np_random.normal()), self.t >= 8, False, {}
