"""Benchmark results that accumulate (issue 13): committed runs are skipped while current, rerun
when stale, and the report (probability of improvement included) comes from the committed files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from agents.experiment.lifecycle import identity, stale_reason
from agents.experiment.report import make_report
from agents.experiment.report_improvement import improvement_table
from agents.experiment.results import RESULTS_FORMAT

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "scripts" / "train.py")
SMALL_FILES = {"result.json", "evaluations.npz", "progress.csv", "config.yaml"}


# ----------------------------------------------------------------------------- stale runs
def _config() -> dict:
    return {"seed": 0, "agent": {"name": "ppo", "kwargs": {"gamma": 0.99, "n_steps": 64}},
            "opt": {"name": "adam", "lr": 3e-4}, "out_dir": "/somewhere", "threads": 1,
            "checkpoint": {"freq": 100}}


def _done_run(tmp_path: Path, c: dict) -> Path:
    d = tmp_path / "run"
    d.mkdir(exist_ok=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(c)))
    return d


def test_stale_reason(tmp_path: Path):
    c = _config()
    d = _done_run(tmp_path, c)
    current = {"status": "finished", "results_format": RESULTS_FORMAT}
    assert stale_reason(d, c, current) is None
    # volatile keys (where the run lives, threads, checkpointing) never make a run stale
    moved = {**c, "out_dir": "docs/results", "threads": 4, "checkpoint": {"freq": 0}}
    assert stale_reason(d, moved, current) is None
    assert identity(moved) == identity(c)
    # a changed value is named with its dotted key, old and new value
    changed = json.loads(json.dumps(c))
    changed["agent"]["kwargs"]["gamma"] = 0.98
    assert stale_reason(d, changed, current) == "its config.yaml differs: agent.kwargs.gamma: 0.99 -> 0.98"
    added = json.loads(json.dumps(c))
    added["opt"]["clip"] = True
    assert stale_reason(d, added, current) == "its config.yaml differs: opt.clip: (absent) -> True"
    # an option added since at its null default (as opt.critic_optimizer was) keeps the run current
    added["opt"]["clip"] = None
    assert stale_reason(d, added, current) is None
    # another results format, or a result.json from before the key (format 1)
    assert "results format 0" in stale_reason(d, c, {**current, "results_format": 0})
    assert (stale_reason(d, c, {"status": "finished"}) is None) == (RESULTS_FORMAT == 1)
    (d / "config.yaml").unlink()
    assert stale_reason(d, c, current) == "it has no config.yaml"


# ----------------------------------------------------------------------------- probability of improvement
def _pairs_reference(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) + ½ P(X = Y) by counting every pair (independent of rliable's Mann-Whitney U)."""
    wins = sum((xi > yj) + 0.5 * (xi == yj) for xi in x for yj in y)
    return wins / (len(x) * len(y))


def test_improvement_matches_pair_counting():
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for env, shift in (("hopper", 1.0), ("walker2d", -0.5)):
        for opt, n in (("hesscale", 4), ("adam", 5)):
            for seed in range(n):
                v = rng.normal(shift if opt == "hesscale" else 0.0, 1.0)
                rows.append({"env": env, "agent": "ppo", "opt": opt, "lr": 3e-4, "variant": "", "seed": seed,
                             "status": "finished", "final": v + 0.1, "auc": v})
    # A2C's baseline is RMSprop: an Adam arm there is no pair
    rows.append({"env": "hopper", "agent": "a2c", "opt": "adam", "lr": 7e-4, "variant": "", "seed": 0,
                 "status": "finished", "final": 1.0, "auc": 1.0})
    df = pd.DataFrame(rows)
    t = improvement_table(df, "hesscale", reps=50, seed=0)
    assert list(t["env"]) == ["hopper", "walker2d", "all"] and set(t["baseline"]) == {"adam"}
    per_env = []
    for env in ("hopper", "walker2d"):
        g = df[(df["env"] == env) & (df["agent"] == "ppo")]
        ref = _pairs_reference(g[g.opt == "hesscale"]["auc"].to_numpy(), g[g.opt == "adam"]["auc"].to_numpy())
        row = t[t["env"] == env].iloc[0]
        assert row["poi_auc"] == pytest.approx(ref, abs=1e-12)
        assert row["poi_auc_lo"] <= row["poi_auc"] <= row["poi_auc_hi"]
        assert (row["n_challenger"], row["n_baseline"]) == (4, 5)
        per_env.append(ref)
    assert t[t["env"] == "all"].iloc[0]["poi_auc"] == pytest.approx(np.mean(per_env), abs=1e-12)


# ----------------------------------------------------------------------------- the sweep, end to end
def _sweep(out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """Two tiny PPO runs on Pendulum (Adam and opt=hesscale) as one multirun."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, TRAIN, "-m", "agent=ppo", "env=pendulum", "opt=adam,hesscale", "tuned=none",
           "total_timesteps=256", "agent.kwargs.n_steps=128", "agent.kwargs.batch_size=64",
           "agent.kwargs.n_epochs=1", "eval.freq=128", "eval.n_episodes=1", "checkpoint.freq=0",
           "++agent.policy_kwargs.net_arch=[8]", "hydra/launcher=basic", f"out_dir={out_dir}",
           "sweep_name=benchmark", *extra]
    p = subprocess.run(cmd, cwd=out_dir.parent, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def _commit_small_files(src: Path, dst: Path) -> None:
    """What ``git add`` takes below ``docs/results/benchmark`` with its ``.gitignore``, copied to
    ``dst`` (the files a fresh checkout has)."""
    repo = dst.parent / "repo"
    shutil.copytree(src, repo / "benchmark")
    shutil.copy(ROOT / "docs" / "results" / "benchmark" / ".gitignore", repo / "benchmark" / ".gitignore")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    listed = subprocess.run(["git", "-C", str(repo), "add", "-A", "--dry-run"], check=True, capture_output=True,
                            text=True).stdout
    for line in listed.splitlines():  # "add 'benchmark/pendulum/.../result.json'"
        rel = Path(line.split("'")[1]).relative_to("benchmark")
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / "benchmark" / rel, dst / rel)


@pytest.mark.slow
def test_sweep_skips_committed_runs_and_reruns_stale_ones(tmp_path: Path):
    work, committed = tmp_path / "work", tmp_path / "committed" / "results"
    work.mkdir()
    _sweep(work)
    runs = sorted(p.parent for p in (work / "benchmark").rglob("result.json"))
    assert len(runs) == 2 and all(json.loads((r / "result.json").read_text())["status"] == "finished" for r in runs)

    # only the small files travel: no model, checkpoint, event file or Hydra record
    _commit_small_files(work / "benchmark", committed / "benchmark")
    for r in runs:
        d = committed / "benchmark" / r.relative_to(work / "benchmark")
        files = {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
        assert files == {"result.json", "evaluations.npz", "tb/progress.csv", "config.yaml"}, files
    assert (committed / "benchmark" / ".gitignore").is_file()

    # the same command on the committed results skips both runs
    before = {p: p.read_bytes() for p in committed.rglob("result.json")}
    p = _sweep(committed)
    assert p.stdout.count("[skip]") == 2 and "[stale]" not in p.stdout, p.stdout
    assert {q: q.read_bytes() for q in committed.rglob("result.json")} == before

    # a committed config that differs from what the command runs (a default changed since): that run
    # is stale and trained again, the other one still skipped
    stale = next(d for d in committed.rglob("config.yaml") if "hesscale" in str(d)).parent
    cfg = OmegaConf.load(stale / "config.yaml")
    cfg.agent.kwargs.gamma = 0.98
    (stale / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    p = _sweep(committed)
    assert p.stdout.count("[skip]") == 1 and p.stdout.count("[stale]") == 1, p.stdout
    assert "agent.kwargs.gamma: 0.98 -> 0.99" in p.stdout
    assert OmegaConf.load(stale / "config.yaml").agent.kwargs.gamma == 0.99
    res = json.loads((stale / "result.json").read_text())
    assert res["status"] == "finished" and res["results_format"] == RESULTS_FORMAT
    assert res["provenance"]["git_commit"] is not None or res["provenance"]["git_dirty"] is None
    assert {"packages", "threads", "cpu"} <= set(res["provenance"])

    # the report from the committed small files alone
    for f in committed.rglob("*"):
        if f.is_file() and f.name not in SMALL_FILES | {".gitignore"}:
            f.unlink()
    out = make_report(committed / "benchmark", reps=20, points=5)
    assert out["runs"] == 2 and out["curves"] is not None
    imp = (committed / "benchmark" / "report" / "improvement.md").read_text()
    assert "hesscale vs adam" in imp and "pendulum" in imp
