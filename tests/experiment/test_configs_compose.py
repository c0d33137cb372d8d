"""Every option of every config group composes, and instantiates its optimizer and agent."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from agents.experiment.build import build_model, optimizer_spec
from agents.experiment.compose import CONFIGS, compose_config
from agents.experiment.validation import ConfigError, validate

AGENTS = sorted(p.stem for p in (CONFIGS / "agent").glob("*.yaml"))
OPTS = sorted(p.stem for p in (CONFIGS / "opt").glob("*.yaml"))
ENVS = sorted(p.stem for p in (CONFIGS / "env").glob("*.yaml"))
TUNED = sorted(p.stem for p in (CONFIGS / "tuned").glob("*.yaml") if p.stem != "none")
SWEEPS = sorted(p.stem for p in (CONFIGS / "sweep").glob("*.yaml"))

# Small buffers so that building a model is instant (SAC's default buffer is 1e6 transitions).
SMALL = {"ppo": ["agent.kwargs.n_steps=64", "agent.kwargs.batch_size=32"],
         "a2c": [], "sac": ["agent.kwargs.buffer_size=1000"]}


def test_groups_have_the_documented_options():
    assert AGENTS == ["a2c", "ppo", "sac"]
    assert set(OPTS) == {"adam", "rmsprop", "sgd", "adahessian", "adahesscale", "adahesscale_gn",
                         "adam_scaled", "adahesscale_scaled", "adahesscale_gn_scaled",
                         "adahessian_scaled", "hesscale", "hesscale_paper"}
    assert set(ENVS) == {"halfcheetah", "hopper", "walker2d", "ant", "humanoid", "inverted_pendulum",
                         "inverted_double_pendulum", "swimmer", "reacher", "pendulum", "cartpole"}
    assert set(TUNED) == {"ppo_halfcheetah", "ppo_hopper", "ppo_walker2d", "ppo_humanoid"}
    assert {"lr_sensitivity", "lr_sensitivity_small"} <= set(SWEEPS)


def test_defaults():
    cfg = compose_config(return_hydra_config=True)
    assert cfg.agent.name == "ppo" and cfg.opt.name == "adam" and cfg.env.id == "HalfCheetah-v5"
    assert cfg.total_timesteps == 1_000_000
    assert cfg.hydra.runtime.choices.tuned == "ppo_halfcheetah"
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "parallel"
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert "${now:" not in OmegaConf.to_yaml(cfg.hydra.run) + OmegaConf.to_yaml(cfg.hydra.sweep)


@pytest.mark.parametrize("agent", AGENTS)
@pytest.mark.parametrize("opt", OPTS)
def test_agent_opt_compose_and_instantiate(agent, opt):
    from agents.experiment.envs import make_train_env
    from agents.optimizers import normalize_optimizer_config, uses_curvature

    cfg = compose_config([f"agent={agent}", f"opt={opt}", "env=pendulum", *SMALL[agent]])
    c = validate(cfg)
    assert c["opt"]["lr"] == cfg.agent.lr > 0 and "lr" not in c["agent"]  # one learning rate, opt.lr
    spec = optimizer_spec(c)
    norm = normalize_optimizer_config(spec, agent)
    second_order = opt.startswith(("adahess", "hesscale")) or opt.endswith("_scaled")
    assert uses_curvature(norm) == second_order
    if opt.startswith(("adahesscale", "hesscale")):  # SAC's opt=hesscale: Scaled Adam (opt_agent/hesscale_sac.yaml)
        assert norm["name"] == ("adam" if (opt, agent) == ("hesscale", "sac") else "adahesscale")
    if norm["name"] == "adahesscale":
        assert norm["kwargs"]["eps"] == 1e-5  # the paper's RL setting for AdaHesScale
    env = make_train_env(c)
    try:
        model = build_model(c, env)
        assert type(model).__name__ == agent.upper()
        assert model.learning_rate == pytest.approx(c["opt"]["lr"])
        assert model.divergence is None
    finally:
        env.close()


@pytest.mark.parametrize("agent,default_opt", [("ppo", "adam"), ("sac", "adam"), ("a2c", "rmsprop")])
def test_sb3_default_optimizer_is_none(agent, default_opt):
    c = validate(compose_config([f"agent={agent}", f"opt={default_opt}", "env=pendulum"]))
    assert optimizer_spec(c) is None
    other = "rmsprop" if default_opt == "adam" else "adam"
    spec = optimizer_spec(validate(compose_config([f"agent={agent}", f"opt={other}", "env=pendulum"])))
    assert spec["name"] == other and not spec["scaling"]["enabled"]


def test_a2c_adam_is_sb3_adam_and_rmsprop_is_sb3_default():
    import torch

    from agents.experiment.envs import make_train_env

    for opt, cls, eps in (("adam", torch.optim.Adam, 1e-5), ("rmsprop", torch.optim.RMSprop, 1e-5)):
        c = validate(compose_config(["agent=a2c", f"opt={opt}", "env=pendulum"]))
        env = make_train_env(c)
        model = build_model(c, env)
        env.close()
        assert type(model.policy.optimizer) is cls
        assert model.policy.optimizer.defaults["eps"] == eps
        if opt == "rmsprop":
            assert model.policy.optimizer.defaults["alpha"] == 0.99


def test_hesscale_is_an_alias_of_adahesscale_scaled():
    """The files are one optimizer; only ``opt=hesscale`` takes per-agent defaults (opt_agent/)."""
    a = OmegaConf.to_container(compose_config(["opt=hesscale", "opt_agent=none"]).opt, resolve=True)
    b = OmegaConf.to_container(compose_config(["opt=adahesscale_scaled"]).opt, resolve=True)
    assert a.pop("name") == "hesscale" and b.pop("name") == "adahesscale_scaled"
    assert a == b
    assert a["scaling"]["enabled"] is True and a["curvature"] == "hesscale"
    assert a["optimizer"] == "adahesscale"


def test_scaling_and_curvature_are_orthogonal_keys():
    c = validate(compose_config(["opt=adahesscale", "opt.scaling.enabled=true", "opt.curvature=bl89",
                           "opt.scaling.beta=0.99"]))
    spec = optimizer_spec(c)
    assert spec["curvature"] == "bl89" and spec["scaling"]["enabled"] and spec["scaling"]["beta"] == 0.99


@pytest.mark.parametrize("env", ENVS)
def test_env_composes_and_makes(env):
    from agents.experiment.envs import make_eval_env, make_train_env

    agent = "ppo"
    c = validate(compose_config([f"env={env}", f"agent={agent}", *SMALL[agent]]))
    assert c["total_timesteps"] == c["env"]["total_timesteps"] > 0
    assert c["env"]["slurm_timeout_min"] > 0
    train, ev = make_train_env(c), make_eval_env(c)
    try:
        assert train.num_envs == c["env"]["n_envs"] and ev.num_envs == 1
        assert train.observation_space.shape == ev.observation_space.shape
        if c["env"]["normalize"]:
            assert ev.training is False and ev.norm_reward is False
    finally:
        train.close()
        ev.close()


ZOO = {  # RL Zoo hyperparams/ppo.yml (v4 entries): lr, n_steps, batch_size, gamma
    "halfcheetah": (2.0633e-5, 512, 64, 0.98),
    "hopper": (9.80828e-5, 512, 32, 0.999),
    "walker2d": (5.05041e-5, 512, 32, 0.99),
    "humanoid": (3.56987e-5, 512, 256, 0.95),
}


@pytest.mark.parametrize("env", sorted(ZOO))
def test_tuned_is_picked_switchable_and_instantiates(env):
    from agents.experiment.envs import make_train_env

    cfg = compose_config([f"env={env}", "opt=hesscale"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.tuned == f"ppo_{env}"
    c = validate(cfg)
    lr, n_steps, bs, gamma = ZOO[env]
    assert c["opt"]["lr"] == pytest.approx(lr)
    assert (c["agent"]["kwargs"]["n_steps"], c["agent"]["kwargs"]["batch_size"]) == (n_steps, bs)
    assert c["agent"]["kwargs"]["gamma"] == gamma and c["env"]["normalize"] is True
    if env == "humanoid":
        assert c["total_timesteps"] == 10_000_000
    e = make_train_env(c)
    try:
        model = build_model(c, e)
        if env != "walker2d":
            import torch.nn as nn

            assert model.policy.activation_fn is nn.ReLU
    finally:
        e.close()
    for off in ("tuned=none", "~tuned"):
        c0 = validate(compose_config([f"env={env}", off]))
        assert c0["opt"]["lr"] == 3e-4 and c0["agent"]["kwargs"]["n_steps"] == 2048
    # no tuned values are invented for other pairs
    for agent in ("a2c", "sac"):
        assert not (CONFIGS / "tuned" / f"{agent}_{env}.yaml").exists()
        assert validate(compose_config([f"env={env}", f"agent={agent}"])) == \
            validate(compose_config([f"env={env}", f"agent={agent}", "tuned=none"]))
    # an explicit opt.lr wins over the tuned one
    assert validate(compose_config([f"env={env}", "opt.lr=0.001"]))["opt"]["lr"] == 0.001


def test_sweeps_compose():
    cfg = compose_config(["sweep=lr_sensitivity"], return_hydra_config=True)
    p = cfg.hydra.sweeper.params
    assert p.opt == "adam,adam_scaled,hesscale_paper"
    assert [float(x) for x in p["opt.lr"].split(",")] == [3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 1.0]
    assert p.seed == "range(0,10)" and cfg.sweep_name == "lr_sensitivity"
    small = compose_config(["sweep=lr_sensitivity_small"], return_hydra_config=True)
    assert small.total_timesteps < cfg.total_timesteps
    assert len(small.hydra.sweeper.params["opt.lr"].split(",")) < 9


@pytest.mark.parametrize("launcher,target", [("parallel", "JoblibLauncher"),
                                             ("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launchers_compose(launcher, target):
    if launcher != "parallel":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # the optional `cluster` extra
    cfg = compose_config([f"hydra/launcher={launcher}", "env=hopper"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert cfg.hydra.launcher.timeout_min == cfg.env.slurm_timeout_min
        assert cfg.hydra.launcher.cpus_per_task == 1
        assert compose_config(["hydra/launcher=slurm", "env=humanoid"], return_hydra_config=True).hydra.launcher.timeout_min > \
            cfg.hydra.launcher.timeout_min


@pytest.mark.parametrize("override,key", [
    ("total_timesteps=-5", "total_timesteps"),
    ("total_timesteps=0", "total_timesteps"),
    ("opt.lr=0", "opt.lr"),
    ("opt.lr=-0.001", "opt.lr"),
    ("seed=-1", "seed"),
    ("eval.n_episodes=0", "eval.n_episodes"),
    ("threads=0", "threads"),
    ("env.n_envs=0", "env.n_envs"),
    ("opt.scaling.beta=1.0", "opt.scaling.beta"),
    ("opt.kwargs.eps=0", "opt.kwargs.eps"),
    ("opt.curvature=hessian", "opt.curvature"),
    ("opt.optimizer=lamb", "opt.optimizer"),
    ("+agent.kwargs.n_step=5", "agent.kwargs.n_step"),
    ("agent.kwargs.gamma=1.5", "agent.kwargs.gamma"),
    ("device=tpu", "device"),
    ("++agent.policy_kwargs.activation_fn=swishy", "agent.policy_kwargs.activation_fn"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        validate(compose_config(["opt=hesscale", override]))
    assert key in str(e.value)


def test_unknown_env_and_discrete_sac_fail_before_training():
    from agents.experiment.envs import make_train_env_checked

    with pytest.raises(ConfigError, match="env.id='Nope-v0'"):
        make_train_env_checked(validate(compose_config(["env.id=Nope-v0"])))
    with pytest.raises(ConfigError, match="agent=sac needs a continuous"):
        make_train_env_checked(validate(compose_config(["agent=sac", "env=cartpole"])))


def test_every_opt_schema_key_is_checked_once_and_its_default_passes():
    """configs/opt/schema/base.yaml is the one list of opt keys: each leaf has one check in
    agents/experiment/validation.py (its range, its choices or its boolean type), and each
    opt file differs from the schema only where it says so."""
    from agents.experiment import validation as v

    leaves = v.schema_leaves()
    assert {"opt.optimizer", "opt.scaling.delta", "opt.scaling.enabled"} <= set(leaves)
    checks = [set(v.RANGES), set(v.BOOLEANS), set(v.CHOICES)]
    for key, default in leaves.items():
        if key in ("opt.name", "opt.kwargs"):  # the option's own name; a free mapping checked per entry
            continue
        assert sum(key in check for check in checks) == 1, key
        if isinstance(default, float):
            assert default in v.RANGES[key], key
    for opt in OPTS:
        text = (CONFIGS / "opt" / f"{opt}.yaml").read_text()
        assert "schema/base@_here_" in text or opt in ("hesscale", "hesscale_paper"), opt
        assert len([line for line in text.splitlines() if line and not line.startswith("#")]) <= 12, opt


def test_a_missing_key_is_named_without_a_python_repr():
    cfg = compose_config(["opt=adam", "~opt.scaling.delta"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert "opt.scaling.delta is missing: expected a finite number > 0" in str(e.value)
    assert "object at 0x" not in str(e.value)
