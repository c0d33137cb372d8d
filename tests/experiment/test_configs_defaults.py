"""Defaults that make the arms of a comparison fair (issue 11): one gradient clipping for every
optimizer, switched off for all of them by one key, and one learning rate in a run's config."""

from __future__ import annotations

import pytest

from agents.experiment.build import build_model
from agents.experiment.compose import CONFIGS, compose_config
from agents.experiment.validation import validate

SMALL = {"ppo": ["agent.kwargs.n_steps=64", "agent.kwargs.batch_size=32"], "a2c": [],
         "sac": ["agent.kwargs.buffer_size=1000"]}  # building a model is then instant
PAPER_SWEEPS = ("lr_sensitivity", "lr_sensitivity_small", "paper_rl_small", "paper_rl_small_sac")


def _model(overrides: list[str]):
    from agents.experiment.envs import make_train_env

    agent = next((o.split("=")[1] for o in overrides if o.startswith("agent=")), "ppo")
    c = validate(compose_config(["env=pendulum", *SMALL[agent], *overrides]))
    env = make_train_env(c)
    try:
        return c, build_model(c, env)
    finally:
        env.close()


@pytest.mark.parametrize("agent", ["ppo", "a2c"])
def test_every_optimizer_clips_at_the_agents_max_grad_norm_unless_switched_off(agent):
    for opt in ("adam", "hesscale"):
        _, model = _model([f"agent={agent}", f"opt={opt}", "agent.kwargs.max_grad_norm=0.8"])
        assert model.max_grad_norm == 0.8
        if opt == "hesscale":  # the curvature path reads the same threshold
            assert model._updates["policy"].max_grad_norm == 0.8
        _, off = _model([f"agent={agent}", f"opt={opt}", "clip_grad_norm=false"])
        assert off.max_grad_norm == float("inf")  # SB3's clip_grad_norm_ multiplies by exactly 1
        if opt == "hesscale":
            assert off._updates["policy"].max_grad_norm is None


def test_tuned_clipping_reaches_the_curvature_arm():
    c = validate(compose_config(["opt=hesscale", "env=halfcheetah"]))  # tuned/ppo_halfcheetah: max_grad_norm 0.8
    assert c["agent"]["kwargs"]["max_grad_norm"] == 0.8 and c["clip_grad_norm"] is True


def test_sac_clips_on_neither_path():
    c, model = _model(["agent=sac", "opt=hesscale"])
    assert "max_grad_norm" not in c["agent"]["kwargs"]
    assert all(u.max_grad_norm is None for u in model._updates.values())


@pytest.mark.parametrize("sweep", PAPER_SWEEPS)
def test_paper_sweeps_switch_clipping_off_for_every_arm(sweep):
    c = validate(compose_config([f"sweep={sweep}"]))
    assert c["clip_grad_norm"] is False
    assert "max_grad_norm" not in (CONFIGS / "sweep" / f"{sweep}.yaml").read_text().split("#")[0]


def test_the_resolved_config_has_one_learning_rate():
    c = validate(compose_config(["opt=hesscale", "env=halfcheetah"]))  # the tuned lr differs from SB3's
    assert "lr" not in c["agent"] and c["opt"]["lr"] == pytest.approx(2.0633e-5)
    assert validate(compose_config(["agent.lr=0.001", "tuned=none"]))["opt"]["lr"] == 0.001  # still opt.lr's default


# -- the paper's setting by name, and per-agent optimizer defaults ------------------------------
def test_hesscale_paper_is_the_papers_exact_setting_and_untouched_by_agent_defaults():
    for agent in ("ppo", "a2c", "sac"):
        o = validate(compose_config([f"agent={agent}", "opt=hesscale_paper", "tuned=none"]))["opt"]
        assert (o["optimizer"], o["curvature"], o["kwargs"]) == ("adahesscale", "hesscale", {"eps": 1e-5})
        assert o["scaling"] == {"enabled": True, "delta": 1e-8, "max_scale": 1.0, "beta": 0.999}
    assert not list((CONFIGS / "opt_agent").glob("hesscale_paper_*.yaml"))
    for sweep in PAPER_SWEEPS:
        params = compose_config([f"sweep={sweep}"], return_hydra_config=True).hydra.sweeper.params
        assert "hesscale_paper" in params.opt.split(",") and "hesscale" not in params.opt.split(","), sweep


def test_per_agent_defaults_precedence(tmp_path):
    """``opt_agent/<opt>_<agent>.yaml`` is picked for that pair only and overrides ``opt/<opt>.yaml``;
    ``tuned/<agent>_<env>.yaml`` (which sets opt.lr) wins over it, the command line over both;
    ``opt_agent=none`` switches it off. A copy of configs/ with one per-agent file stands in for
    whichever files the project ships."""
    import shutil

    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    for shipped in (configs / "opt_agent").glob("hesscale_*.yaml"):
        shipped.unlink()
    (configs / "opt_agent" / "hesscale_ppo.yaml").write_text(
        "# @package opt\nscaling:\n  delta: 1.0e-04\nlr: 1.0e-03\n")
    pick = lambda *o: validate(compose_config(config_dir=configs, overrides=["opt=hesscale", *o]))["opt"]  # noqa: E731
    own = pick("tuned=none")  # agent=ppo
    assert own["scaling"]["delta"] == 1e-4 and own["lr"] == 1e-3 and own["name"] == "hesscale"
    tuned = pick("env=hopper")  # tuned/ppo_hopper sets opt.lr
    assert tuned["scaling"]["delta"] == 1e-4 and tuned["lr"] == pytest.approx(
        validate(compose_config(["env=hopper"]))["opt"]["lr"]) != 1e-3
    assert pick("env=hopper", "opt.lr=0.01", "opt.scaling.delta=1e-6")["lr"] == 0.01
    assert pick("env=hopper", "opt.scaling.delta=1e-6")["scaling"]["delta"] == 1e-6
    assert pick("tuned=none", "opt_agent=none")["scaling"]["delta"] == 1e-8
    for other in (["agent=a2c"], ["opt=adahesscale_scaled"]):  # other pairs: the opt file as it is
        o = validate(compose_config(config_dir=configs, overrides=["opt=hesscale", "tuned=none", *other]))["opt"]
        assert o["scaling"]["delta"] == 1e-8


#: what ``opt=hesscale`` runs per agent (issue 11's evidence, docs/results/defaults/README.md):
#: (the scaled optimizer, its eps, δ, lr, SAC's critic optimizer) — a change of these defaults must
#: come with that evidence
HESSCALE_DEFAULTS = {"ppo": ("adahesscale", 1e-5, 1e-7, 3e-4, None), "a2c": ("adahesscale", 1e-5, 1e-7, 7e-4, None),
                     "sac": ("adam", 1e-8, 1e-7, 3e-4, "adam")}


@pytest.mark.parametrize("agent", sorted(HESSCALE_DEFAULTS))
def test_hesscale_defaults_per_agent_are_pinned(agent):
    o = validate(compose_config([f"agent={agent}", "opt=hesscale", "tuned=none"]))["opt"]
    assert (o["optimizer"], o["kwargs"]["eps"], o["scaling"]["delta"], o["lr"], o["critic_optimizer"]) == \
        HESSCALE_DEFAULTS[agent]
    assert (o["curvature"], o["scaling"]["enabled"]) == ("hesscale", True)
    shipped = {p.stem for p in (CONFIGS / "opt_agent").glob("*.yaml")} - {"none"}
    assert shipped <= {f"hesscale_{a}" for a in HESSCALE_DEFAULTS}  # per-agent files: only these, pinned here


def test_sacs_hesscale_default_is_the_confirmed_configuration():
    """``agent=sac opt=hesscale`` builds what the confirmation runs ran (``opt=adam_scaled
    opt.scaling.delta=1e-7 opt.critic_optimizer=adam``): the actor on SB3's own Adam (torch's
    defaults, as SB3's SAC builds it) inside the trust region, the critic on that Adam unscaled."""
    import torch

    shipped, confirmed, sb3 = (_model(["agent=sac", *o])[1] for o in (
        ["opt=hesscale"], ["opt=adam_scaled", "opt.scaling.delta=1e-7", "opt.critic_optimizer=adam"], ["opt=adam"]))
    for model in (shipped, confirmed):
        scaler = model.actor.optimizer
        assert type(scaler).__name__ == "StepSizeScaling" and type(scaler.optimizer) is torch.optim.Adam
        assert (scaler.delta, scaler.max_scale, scaler.beta) == (1e-7, 1.0, 0.999)
        assert scaler.optimizer.defaults == sb3.actor.optimizer.defaults
        assert type(model.critic.optimizer) is torch.optim.Adam
        assert model.critic.optimizer.defaults == sb3.critic.optimizer.defaults


def test_sac_critic_optimizer_is_a_config_key():
    """``opt.critic_optimizer=adam``: SAC's actor on the configured curvature optimizer, its critic on
    SB3's Adam; the key is refused, naming it, for PPO/A2C and without a curvature arm."""
    import torch

    from agents.experiment.errors import ConfigError

    _, model = _model(["agent=sac", "opt=hesscale", "opt.critic_optimizer=adam"])
    assert type(model.critic.optimizer) is torch.optim.Adam
    assert type(model.actor.optimizer).__name__ == "StepSizeScaling"
    for overrides, message in ((["agent=ppo", "opt=hesscale"], "SAC's"), (["agent=sac", "opt=adam"], "needs a curvature")):
        with pytest.raises(ConfigError, match=f"critic_optimizer.*{message}"):
            _model([*overrides, "opt.critic_optimizer=adam"])
