"""Replay a saved run: ``python scripts/evaluate.py <run dir> [-n 10] [--video]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agents.experiment.errors import ConfigError


def load_run(run_dir: Path) -> dict:
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    if not (run_dir / "model.zip").is_file():
        raise ConfigError(f"{run_dir}: no saved model (model.zip); was the run finished with save_model=true?")
    return OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)  # type: ignore[return-value]


def evaluate_run(run_dir: Path, n_episodes: int = 10, deterministic: bool = True,
                 seed: int | None = None, video_dir: Path | None = None) -> dict:
    """Evaluate the saved agent of ``run_dir``; returns mean/std/episode returns."""
    import numpy as np
    import torch
    from stable_baselines3.common.evaluation import evaluate_policy

    from agents.experiment.build import agent_class
    from agents.experiment.envs import load_normalization, make_eval_env

    run_dir = Path(run_dir)
    c = load_run(run_dir)
    torch.set_num_threads(int(c.get("threads", 1)))
    if seed is None:
        seed = c["seed"] + c["eval"]["seed_offset"] + 1  # not the seed used during training evals
    render_mode = "rgb_array" if video_dir is not None else None
    env = make_eval_env(c, seed=seed, render_mode=render_mode)
    if c["env"]["normalize"] and (run_dir / "vecnormalize.pkl").is_file():
        env = load_normalization(env, run_dir / "vecnormalize.pkl")
    if video_dir is not None:
        env = _with_video(env, video_dir, c)
    model = agent_class(c["agent"]["cls"]).load(str(run_dir / "model.zip"), env=env, device="cpu")
    rets, lens = evaluate_policy(model, env, n_eval_episodes=n_episodes, deterministic=deterministic,
                                 return_episode_rewards=True)
    env.close()
    rets = np.asarray(rets, dtype=float)
    return {"mean": float(rets.mean()), "std": float(rets.std()), "returns": rets.tolist(),
            "lengths": [int(x) for x in lens], "n_episodes": n_episodes, "seed": seed}


def _with_video(env, video_dir: Path, c: dict):
    try:
        from stable_baselines3.common.vec_env import VecVideoRecorder

        env.reset()
        frame = env.render()
        if frame is None:
            raise RuntimeError("the env returned no frame")
        return VecVideoRecorder(env, str(video_dir), record_video_trigger=lambda step: step == 0,
                                video_length=int(c.get("video_length", 1000)),
                                name_prefix="eval")
    except Exception as e:  # noqa: BLE001 - rendering is optional
        print(f"note: no video ({type(e).__name__}: {e}); evaluating without it", file=sys.stderr)
        return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Replay a saved run deterministically and print its return.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("-n", "--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=None, help="eval env seed (default: seed + eval.seed_offset + 1)")
    p.add_argument("--stochastic", action="store_true", help="sample actions instead of the mode")
    p.add_argument("--video", nargs="?", const="", default=None, metavar="DIR",
                   help="record a video when rendering is available (default DIR: <run dir>/videos)")
    a = p.parse_args(argv)
    if a.episodes < 1:
        print("error: --episodes must be >= 1", file=sys.stderr)
        return 2
    video = None if a.video is None else (Path(a.video) if a.video else a.run_dir / "videos")
    try:
        r = evaluate_run(a.run_dir, a.episodes, not a.stochastic, a.seed, video)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.run_dir}: return {r['mean']:.2f} ± {r['std']:.2f} over {r['n_episodes']} episodes "
          f"({'stochastic' if a.stochastic else 'deterministic'}, eval seed {r['seed']})")
    return 0
