"""Sweep reliability from the runner's side: skip done runs, per-run lock, MuJoCo instability."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from agents.experiment.compose import CONFIGS, compose_config
from agents.experiment.run import train

TINY_PPO = ["agent=ppo", "opt=adam", "agent.kwargs.n_steps=64", "agent.kwargs.batch_size=32",
            "eval.freq=0", "eval.n_episodes=1", "progress_bar=false"]


def test_done_runs_are_skipped_and_rerun_is_explicit(tmp_path: Path):
    cfg = compose_config([*TINY_PPO, "env=pendulum", "total_timesteps=64"])
    r1 = train(cfg, tmp_path)
    assert r1["status"] == "finished" and not r1.get("skipped")
    stamp = (tmp_path / "result.json").stat().st_mtime_ns
    r2 = train(cfg, tmp_path)
    assert r2["skipped"] and r2["status"] == "finished"
    assert (tmp_path / "result.json").stat().st_mtime_ns == stamp
    r3 = train(compose_config([*TINY_PPO, "env=pendulum", "total_timesteps=64", "rerun=true"]), tmp_path)
    assert r3["status"] == "finished" and not r3.get("skipped")
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1  # old events cleared


def test_a_locked_run_directory_is_left_alone(tmp_path: Path):
    with open(tmp_path / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = train(compose_config([*TINY_PPO, "env=pendulum", "total_timesteps=64"]), tmp_path)
    assert r["status"] == "locked" and not (tmp_path / "result.json").exists()


class _UnstablePendulum(gym.Wrapper):
    """InvertedPendulum-v5 whose simulation blows up at the 100th step."""

    def __init__(self, **kwargs):
        super().__init__(gym.make("InvertedPendulum-v5", **kwargs))
        self.n = 0

    def step(self, action):
        self.n += 1
        if self.n == 100:
            self.env.unwrapped.data.qvel[:] = np.nan
        return self.env.step(action)


def test_mujoco_instability_ends_the_run_diverged(tmp_path: Path):
    if "UnstablePendulumTest-v0" not in gym.registry:
        gym.register("UnstablePendulumTest-v0", entry_point=_UnstablePendulum, max_episode_steps=1000)
    cfg = compose_config([*TINY_PPO, "env=inverted_pendulum", "env.id=UnstablePendulumTest-v0", "total_timesteps=640"])
    r = train(cfg, tmp_path)
    assert r["status"] == "diverged", r
    assert "MuJoCo instability" in r["divergence"]["reason"] and "BADQVEL" in r["divergence"]["reason"]
    assert r["divergence"]["step"] <= 128 and r["timesteps"] < 640
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "diverged"
    assert (tmp_path / "model.zip").is_file()  # saves what it has


def test_a_crash_is_recorded_as_failed_and_returns(tmp_path: Path, monkeypatch):
    import agents.experiment.eval_history as eval_history

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(eval_history, "eval_callback", boom)
    r = train(compose_config([*TINY_PPO, "env=pendulum", "total_timesteps=64"]), tmp_path)
    assert r["status"] == "failed" and "simulated crash" in r["error"]
    assert "simulated crash" in (tmp_path / "error.txt").read_text()
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"


def test_status_lines_of_parallel_workers_never_merge():
    """Two workers writing status lines into one pipe with ``PYTHONUNBUFFERED`` (as sweep workers
    share the sweep's stdout): every line arrives whole (``say`` writes text and newline at once)."""
    import os
    import subprocess
    import sys

    code = ("import sys; from agents.experiment.console import say\n"
            "for i in range(2000): say(f'[run] worker {sys.argv[1]} line {i} -> ' + 'x' * 120)")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(CONFIGS.parent)}
    read, write = os.pipe()
    workers = [subprocess.Popen([sys.executable, "-c", code, w], stdout=write, env=env) for w in "ab"]
    os.close(write)
    with os.fdopen(read) as pipe:
        lines = pipe.read().splitlines()
    assert all(p.wait(timeout=120) == 0 for p in workers)
    assert len(lines) == 4000
    assert all(line.startswith("[run] worker ") and line.endswith("x" * 120) and line.count("[run]") == 1 for line in lines)
