"""Unknown config keys are refused wherever they come from, named with the nearest valid key; the
open maps are checked against the signatures they are passed to."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from agents.experiment.compose import CONFIGS, compose_config
from agents.experiment.errors import ConfigError
from agents.experiment.keys import AGENT_KEYS, ENV_KEYS, known_tree, unknown_keys
from agents.experiment.validation import validate



def _error(overrides) -> str:
    with pytest.raises(ConfigError) as e:
        validate(compose_config(["env=pendulum", *overrides]))
    return str(e.value)


@pytest.mark.parametrize("override,message", [
    ("+opt.scalng.delta=1e-4", "opt.scalng.delta: unknown key (did you mean opt.scaling.delta?)"),
    ("++opt.scaling.detla=1e-4", "opt.scaling.detla: unknown key (did you mean opt.scaling.delta?)"),
    ("+eval.n_episode=3", "eval.n_episode: unknown key (did you mean eval.n_episodes?)"),
    ("+sead=3", "sead: unknown key (did you mean seed?)"),
    ("+env.normalise=false", "env.normalise: unknown key (did you mean env.normalize?)"),
    ("++agent.kwargs.n_step=5", "agent.kwargs.n_step: not an argument of SB3's PPO (did you mean n_steps?)"),
    ("+agent.policy_kwargs.net_arc=[4]", "agent.policy_kwargs.net_arc: not an argument of SB3's "
                                         "ActorCriticPolicy (MlpPolicy) (did you mean net_arch?)"),
    ("+opt.kwargs.betaz=[0.9,0.9]", "opt.kwargs.betaz: not an argument of Adam (did you mean betas?)"),
    ("+env.kwargs.g=9.8", None),  # valid: Pendulum's own argument
    ("+env.kwargs.gg=9.8", "env.kwargs.gg: not an argument of Pendulum-v1 (PendulumEnv) or gymnasium.make"),
])
def test_unknown_keys_are_refused_with_the_nearest_valid_one(override, message):
    if message is None:
        validate(compose_config(["env=pendulum", override]))
    else:
        assert message in _error([override])


def test_a_typo_in_a_yaml_file_is_refused():
    cfg = compose_config(["env=pendulum"])
    OmegaConf.set_struct(cfg, False)
    typo = OmegaConf.merge(cfg, OmegaConf.create("env:\n  clip_ob: 5.0\n"))  # as a YAML file would add it
    with pytest.raises(ConfigError, match=r"env\.clip_ob: unknown key \(did you mean env\.clip_obs\?\)"):
        validate(typo)


def test_env_kwargs_of_a_mujoco_env_reach_its_base_class_arguments():
    validate(compose_config(["env=hopper", "+env.kwargs.ctrl_cost_weight=1e-3", "+env.kwargs.max_episode_steps=500"]))
    assert "did you mean ctrl_cost_weight?" in _error(["env=hopper", "+env.kwargs.ctrl_cost_weigth=1e-3"])


@pytest.mark.parametrize("group,keys", [("agent", AGENT_KEYS), ("env", ENV_KEYS)])
def test_every_group_file_uses_the_declared_keys(group, keys):
    for f in (CONFIGS / group).glob("*.yaml"):
        used = set(OmegaConf.to_container(OmegaConf.load(f))) - {"defaults"}
        assert used <= set(keys), (f.name, used - set(keys))


def test_every_shipped_choice_composes_without_unknown_keys():
    for group in ("agent", "env", "opt"):
        for f in (CONFIGS / group).glob("*.yaml"):
            c = OmegaConf.to_container(compose_config([f"{group}={f.stem}"]), resolve=False)
            assert unknown_keys(c, known_tree()) == [], f
