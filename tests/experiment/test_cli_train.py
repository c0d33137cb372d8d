"""End-to-end command lines: a tiny multirun, its report, replaying a run, and user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN, REPORT, EVALUATE = (str(ROOT / "scripts" / f"{n}.py") for n in ("train", "report", "evaluate"))
# A few hundred steps of PPO on Pendulum-v1, two evaluations.
TINY = ["env=pendulum", "total_timesteps=400", "agent.kwargs.n_steps=200", "agent.kwargs.batch_size=50",
        "eval.freq=200", "eval.n_episodes=2"]
VARIANT = "agent.kwargs.batch_size=50,agent.kwargs.n_steps=200,eval.freq=200,eval.n_episodes=2,total_timesteps=400"


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_multirun_report_evaluate(tmp_path: Path):
    out = tmp_path / "runs"
    p = _run([TRAIN, "-m", "agent=ppo", "opt=adam,hesscale", "seed=0,1", *TINY, f"out_dir={out}",
              "sweep_name=tiny", "hydra.launcher.n_jobs=2"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    sweep = out / "tiny"
    for opt in ("adam", "hesscale"):
        for seed in (0, 1):
            # deterministic: a function of the choices and overrides only
            d = sweep / "pendulum" / "ppo" / f"{opt}_lr0.0003" / VARIANT / f"seed{seed}"
            assert d.is_dir(), sorted(str(x) for x in sweep.rglob("seed*"))
            r = json.loads((d / "result.json").read_text())
            assert r["status"] == "finished", r
            assert (r["env"], r["agent"], r["opt"], r["seed"], r["lr"]) == ("pendulum", "ppo", opt, seed, 3e-4)
            assert r["timesteps"] == 400 and r["wall_time_s"] > 0 and r["env_steps_per_s"] > 0
            assert r["final_return"] is not None and r["auc_return"] is not None
            assert r["n_evaluations"] == 2
            prov = r["provenance"]
            assert {"git_commit", "packages", "threads", "cpu", "python"} <= set(prov)
            assert prov["threads"] == 1 and prov["torch_threads"] == 1
            assert prov["packages"]["stable-baselines3"] == "2.9.2"
            for f in ("config.yaml", "model.zip", "vecnormalize.pkl", "evaluations.npz", ".hydra/config.yaml"):
                assert (d / f).is_file(), f
            assert list((d / "tb").glob("events.out.tfevents.*"))
            with np.load(d / "evaluations.npz") as ev:
                assert ev["timesteps"].tolist() == [200, 400] and ev["results"].shape == (2, 2)
    # TensorBoard: readable run names under the sweep dir, SB3 keys + curvature diagnostics
    from tbparse import SummaryReader

    tags = set(SummaryReader(str(sweep / "pendulum/ppo/hesscale_lr0.0003" / VARIANT / "seed0/tb")).scalars.tag)
    assert {"rollout/ep_rew_mean", "train/value_loss", "eval/mean_reward"} <= tags
    assert any(t.startswith("train/step_scale/") for t in tags), tags
    # the two seeds differ, the same seed of the two optimizers starts from the same env seed
    a = json.loads((sweep / "pendulum/ppo/adam_lr0.0003" / VARIANT / "seed0/result.json").read_text())
    b = json.loads((sweep / "pendulum/ppo/adam_lr0.0003" / VARIANT / "seed1/result.json").read_text())
    assert a["final_return"] != b["final_return"]

    rep = _run([REPORT, str(sweep), "--reps", "50"], tmp_path)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    for f in ("curves.png", "table.md", "table.csv"):
        assert (sweep / "report" / f).stat().st_size > 0
    table = (sweep / "report" / "table.md").read_text()
    assert "| pendulum | ppo | adam | 0.0003 | 2 | 0 | 0 |" in table
    assert "| pendulum | ppo | hesscale | 0.0003 | 2 | 0 | 0 |" in table

    run = sweep / "pendulum/ppo/hesscale_lr0.0003" / VARIANT / "seed1"
    ev = _run([EVALUATE, str(run), "-n", "2"], tmp_path)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    assert "over 2 episodes" in ev.stdout and "±" in ev.stdout
    bad = _run([EVALUATE, str(tmp_path / "nope")], tmp_path)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_divergence_does_not_stop_the_sweep(tmp_path: Path):
    """An absurd learning rate diverges; the other job still finishes; exit code 0."""
    p = _run([TRAIN, "-m", "agent=ppo", "opt=sgd", "opt.lr=1e5,3e-4", "env=pendulum", "total_timesteps=200",
              "agent.kwargs.n_steps=100", "agent.kwargs.batch_size=50", "eval.freq=0", "eval.n_episodes=1",
              f"out_dir={tmp_path}", "sweep_name=div", "hydra.launcher.n_jobs=2"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    status = {json.loads(f.read_text())["lr"]: json.loads(f.read_text()) for f in (tmp_path / "div").rglob("result.json")}
    assert status[1e5]["status"] == "diverged" and status[1e5]["divergence"]["step"] <= 200
    assert status[3e-4]["status"] == "finished" and status[3e-4]["timesteps"] == 200
    rep = _run([REPORT, str(tmp_path / "div"), "--reps", "10"], tmp_path)
    assert rep.returncode == 0 and "1 diverged" in rep.stdout, rep.stdout + rep.stderr
    assert (tmp_path / "div" / "report" / "sensitivity.png").is_file()


def test_submitit_local_launcher(tmp_path: Path):
    """The Slurm code path (hydra-submitit-launcher), run locally."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    p = _run([TRAIN, "-m", "hydra/launcher=local", "agent=a2c", "opt=adam", "env=pendulum",
              "total_timesteps=100", "eval.freq=0", "eval.n_episodes=1", f"out_dir={tmp_path}",
              "sweep_name=sub"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    (res,) = (tmp_path / "sub").rglob("result.json")
    assert json.loads(res.read_text())["status"] == "finished"
    assert "a2c/adam_lr0.0007" in str(res)
    assert list((tmp_path / "sub" / ".submitit").iterdir())


@pytest.mark.parametrize("override,valid", [("opt=hessscale", "hesscale"), ("agent=ddpg", "sac"),
                                            ("env=halfcheetah_v9", "hopper")])
def test_wrong_choice_lists_the_options(tmp_path: Path, override: str, valid: str):
    p = _run([TRAIN, override, f"out_dir={tmp_path}"], tmp_path, timeout=120)
    assert p.returncode == 2
    group = override.split("=")[0]
    assert f"is not a config in configs/{group}/" in p.stderr and valid in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not list(tmp_path.rglob("result.json"))


@pytest.mark.parametrize("override,key", [("total_timesteps=-5", "total_timesteps"), ("opt.lr=0", "opt.lr"),
                                          ("opt.lr=-3e-4", "opt.lr"), ("env.id=NoSuchEnv-v0", "env.id")])
def test_bad_value_fails_before_training(tmp_path: Path, override: str, key: str):
    p = _run([TRAIN, "opt=hesscale", "env=pendulum", override, f"out_dir={tmp_path}"], tmp_path, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Invalid configuration" in p.stderr and key in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not list(tmp_path.rglob("model.zip")) and not list(tmp_path.rglob("events.out.tfevents.*"))


def test_sac_on_discrete_env_is_refused(tmp_path: Path):
    p = _run([TRAIN, "agent=sac", "env=cartpole", f"out_dir={tmp_path}"], tmp_path, timeout=120)
    assert p.returncode == 2 and "agent=sac needs a continuous" in p.stderr and "Traceback" not in p.stderr
