"""Determinism per agent, forced divergence on a single run, and the remaining bad-input cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agents.experiment import ConfigError
from agents.experiment.compose import compose_config
from agents.experiment.run import train
from agents.experiment.validation import validate

ROOT = Path(__file__).resolve().parents[2]
TRAIN, REPORT = (str(ROOT / "scripts" / f"{n}.py") for n in ("train", "report"))
TINY = {
    "ppo": ["agent=ppo", "opt=hesscale", "agent.kwargs.n_steps=100", "agent.kwargs.batch_size=50",
            "agent.kwargs.n_epochs=2", "total_timesteps=400"],
    "a2c": ["agent=a2c", "opt=adahesscale", "total_timesteps=400"],
    "sac": ["agent=sac", "opt=hesscale", "agent.kwargs.learning_starts=100", "agent.kwargs.batch_size=32",
            "agent.kwargs.buffer_size=1000", "total_timesteps=300"],
}
COMMON = ["env=pendulum", "eval.freq=200", "eval.n_episodes=1", "progress_bar=false", "checkpoint.freq=100",
          "++agent.policy_kwargs.net_arch=[16]"]


def _scalars(run: Path) -> list[tuple[str, int, float]]:
    from tbparse import SummaryReader

    df = SummaryReader(str(run / "tb")).scalars
    df = df[~df.tag.str.startswith("time/")]
    return sorted((t, int(s), float(v)) for t, s, v in zip(df.tag, df.step, df.value))


def _params(run: Path) -> dict:
    from stable_baselines3.common.save_util import load_from_zip_file

    _, params, _ = load_from_zip_file(str(run / "model.zip"))
    return params["policy"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("agent", ["ppo", "a2c", "sac"])
def test_same_seed_same_scalars_and_parameters(tmp_path: Path, agent: str):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        r = train(compose_config([*TINY[agent], *COMMON, f"seed={seed}"]), tmp_path / name)
        assert r["status"] == "finished", r
        runs[name] = (_scalars(tmp_path / name), _params(tmp_path / name))
    (sa, pa), (sb, pb), (sc, pc) = runs["a"], runs["b"], runs["c"]
    assert len(sa) > 5 and any(t.startswith("train/") for t, _, _ in sa)
    assert sa == sb
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    assert sa != sc
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


def test_forced_divergence_single_run_exits_0_and_the_report_renders(tmp_path: Path):
    p = _run([TRAIN, "agent=ppo", "opt=sgd", "opt.lr=1e5", "env=pendulum", "total_timesteps=400",
              "agent.kwargs.n_steps=100", "agent.kwargs.batch_size=50", "eval.freq=0", "eval.n_episodes=1",
              "checkpoint.freq=100", f"out_dir={tmp_path / 'runs'}"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[diverged]" in p.stdout, p.stdout
    (res,) = (tmp_path / "runs").rglob("result.json")
    r = json.loads(res.read_text())
    assert r["status"] == "diverged" and r["divergence"]["step"] < 400, r
    assert (res.parent / "model.zip").is_file() and not (res.parent / "checkpoints").exists()
    again = _run([TRAIN, "agent=ppo", "opt=sgd", "opt.lr=1e5", "env=pendulum", "total_timesteps=400",
                  "agent.kwargs.n_steps=100", "agent.kwargs.batch_size=50", "eval.freq=0", "eval.n_episodes=1",
                  "checkpoint.freq=100", f"out_dir={tmp_path / 'runs'}"], tmp_path)
    assert again.returncode == 0 and "[skip]" in again.stdout and "already diverged" in again.stdout
    rep = _run([REPORT, str(tmp_path / "runs"), "--reps", "10"], tmp_path)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "diverged" in rep.stdout and (tmp_path / "runs" / "report" / "table.md").is_file()


def test_unknown_key_is_refused_without_traceback(tmp_path: Path):
    p = _run([TRAIN, "checkpoint.frequency=5", f"out_dir={tmp_path}"], tmp_path)
    assert p.returncode == 2
    assert "checkpoint.frequency: unknown key (did you mean checkpoint.freq?)" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not list(tmp_path.rglob("result.json"))


@pytest.mark.parametrize("override,message", [
    ("checkpoint.freq=-1", "checkpoint.freq=-1 is not allowed: expected an integer >= 0"),
    ("checkpoint.keep=0", "checkpoint.keep=0 is not allowed: expected an integer >= 1"),
    ("checkpoint.resume=maybe", "checkpoint.resume='maybe' is not allowed: expected true or false"),
])
def test_bad_checkpoint_values_name_the_key(override: str, message: str):
    with pytest.raises(ConfigError) as e:
        validate(compose_config(["env=pendulum", override]))
    assert message in str(e.value)


def test_unsupported_module_in_the_policy_fails_before_training(tmp_path: Path, monkeypatch):
    """A module the core has no rule for (Hardswish) is named, with what is supported."""
    import agents.experiment.build as b

    monkeypatch.setitem(b.ACTIVATIONS, "hardswish", "Hardswish")
    cfg = compose_config([*TINY["ppo"], *COMMON, "++agent.policy_kwargs.activation_fn=hardswish"])
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path)
    msg = str(e.value)
    assert "Hardswish" in msg and "has no HesScale rule" in msg and "Supported:" in msg and "opt=hesscale" in msg
    assert not list(tmp_path.rglob("events.out.tfevents.*")) and not (tmp_path / "model.zip").exists()


def _same_tree(a, b, path="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, set(a) ^ set(b))
        for k in a:
            _same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tree(x, y, f"{path}/{i}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("agent,opt", [("ppo", "hesscale"), ("sac", "adam_scaled"), ("a2c", "adahessian_scaled")])
def test_curvature_optimizer_state_round_trips_through_save_load(tmp_path: Path, agent: str, opt: str):
    """The agents' own save()/load() keep the curvature optimizers' state (EMAs, step-size state)."""
    import random

    import numpy as np

    from agents.experiment.envs import make_train_env
    from agents.experiment.build import agent_class, build_model

    c = validate(compose_config([*TINY[agent], *COMMON, f"opt={opt}"]))
    env = make_train_env(c)
    model = build_model(c, env)
    model.learn(200)
    model.save(str(tmp_path / "m.zip"))
    loaded = agent_class(c["agent"]["cls"]).load(str(tmp_path / "m.zip"), env=env)
    names = ["actor.optimizer", "critic.optimizer"] if agent == "sac" else ["policy.optimizer"]
    for name in names:
        a, b = model, loaded
        for part in name.split("."):
            a, b = getattr(a, part), getattr(b, part)
        assert type(a) is type(b) and type(a).__name__ == "StepSizeScaling"
        _same_tree(a.state_dict(), b.state_dict())
        # (the scaler keeps no EMA of its own when it can reuse AdaHesScale's / AdaHessian's v)
        assert a.state_dict()["optimizer"]["state"] and a.state_dict()["scaler"]["last_scales"]
        if opt == "adam_scaled":
            assert a.state_dict()["scaler"]["state"]  # the scaler's own curvature EMA
    # one more update from each: the same parameters
    loaded.set_logger(model.logger)
    if agent == "sac":
        loaded.replay_buffer = model.replay_buffer
    else:
        loaded.rollout_buffer = model.rollout_buffer
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    for m in (model, loaded):
        random.setstate(rng[0]), np.random.set_state(rng[1]), torch.set_rng_state(rng[2])
        m.train(gradient_steps=3, batch_size=32) if agent == "sac" else m.train()
    for p, q in zip(model.policy.parameters(), loaded.policy.parameters()):
        assert torch.equal(p, q)
    env.close()
