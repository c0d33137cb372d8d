"""Replay a run's evaluation: ``python scripts/evaluate.py <run dir> [--fresh [--seed S]] [-n N]``.

By default the run's latest recorded evaluation is replayed exactly, so the output equals the
recorded returns: for a finished or diverged run its final evaluation (``final_eval.pkl`` beside
``model.zip``; ``result.json``'s ``final_return``), for an unfinished one (killed, preempted,
failed) the latest evaluation its latest checkpoint holds. What that evaluation read is restored
(:func:`agents.experiment.eval_history.eval_inputs`): the evaluation env with each sub-env's
``np_random`` (and MuJoCo state) and VecNormalize's statistics, the policy's parameters as they were
then, torch's RNG state; episodes and determinism are the run's.

``--fresh`` (implied by ``--seed`` and ``--video``) evaluates the saved model (``model.zip``, or
the checkpoint's) on a new evaluation env seeded ``seed + eval.seed_offset + 1`` (apart from the
evaluations during training), with the training env's final VecNormalize statistics.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

from agents.experiment.errors import ConfigError
from agents.experiment.results import CONFIG_FILE, DONE, FINAL_EVAL_FILE, read_result


def load_run(run_dir: Path) -> dict:
    """The resolved config of a run directory (``config.yaml``)."""
    from omegaconf import OmegaConf

    cfg_path = Path(run_dir) / CONFIG_FILE
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG_FILE})")
    return OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)  # type: ignore[return-value]


@dataclass
class RunSource:
    """Where a run's agent is read from: the final outputs or the latest checkpoint."""

    model: Path  # an SB3 model.zip
    inputs: dict | None  # what the latest recorded evaluation read (None: not recorded)
    norm: dict | None  # VecNormalize statistics at the end of training / at the checkpoint
    label: str


def run_source(run_dir: Path) -> RunSource:
    """The final outputs of a finished or diverged run, else its latest complete checkpoint,
    else the outputs it has (a run trained with an older version)."""
    from agents.experiment.build import MODEL_FILE
    from agents.experiment.eval_history import load_eval_inputs
    from agents.experiment.store import CheckpointStore, load_state

    run_dir = Path(run_dir)
    final = run_dir / MODEL_FILE
    done = (read_result(run_dir) or {}).get("status") in DONE
    if not (done and final.is_file()):
        folder = CheckpointStore(run_dir).verified_latest(lambda msg: print(f"[evaluate] {run_dir}: {msg}",
                                                                          file=sys.stderr))
        if folder is not None:
            state = load_state(folder)
            return RunSource(folder / MODEL_FILE, (state.get("eval") or {}).get("last_eval"),
                             state["train_env"].get("norm"), f"checkpoint {folder.name}")
    if not final.is_file():
        raise ConfigError(f"{run_dir}: no saved model ({MODEL_FILE}) and no complete checkpoint; "
                          "was the run trained with save_model=false?")
    inputs = load_eval_inputs(run_dir / FINAL_EVAL_FILE) if (run_dir / FINAL_EVAL_FILE).is_file() else None
    norm = None
    if (run_dir / "vecnormalize.pkl").is_file():
        with open(run_dir / "vecnormalize.pkl", "rb") as f:
            saved = pickle.load(f)  # VecNormalize.save(): the wrapper without its envs
        norm = {"obs_rms": saved.obs_rms, "ret_rms": saved.ret_rms}
    return RunSource(final, inputs, norm, "the final model")


def evaluate_run(run_dir: Path, n_episodes: int | None = None, deterministic: bool | None = None,
                 fresh: bool = False, seed: int | None = None, video_dir: Path | None = None) -> dict:
    """Replay the run's latest recorded evaluation (default) or evaluate it on a fresh env.

    ``n_episodes`` / ``deterministic`` default to the run's. Returns ``mean``, ``std``,
    ``returns``, ``lengths``, ``mode`` (``replay`` / ``fresh``), ``source``, and for a replay the
    ``step`` evaluated and the ``recorded`` returns; for a fresh evaluation the env ``seed``.
    """
    import numpy as np
    import torch
    from stable_baselines3.common.evaluation import evaluate_policy

    from agents.experiment.env_state import restore_normalization, restore_vec_env
    from agents.experiment.envs import make_eval_env

    run_dir = Path(run_dir)
    c = load_run(run_dir)
    src = run_source(run_dir)
    torch.set_num_threads(int(c.get("threads", 1)))
    fresh = fresh or seed is not None or video_dir is not None
    if not fresh and src.inputs is None:
        print(f"note: {run_dir} holds no record of its evaluations' inputs (trained before they were "
              "saved): evaluating on a fresh env", file=sys.stderr)
        fresh = True
    out: dict = {"mode": "fresh" if fresh else "replay", "source": src.label}
    if fresh:
        seed = c["seed"] + c["eval"]["seed_offset"] + 1 if seed is None else int(seed)
        env = make_eval_env(c, seed=seed, render_mode="rgb_array" if video_dir is not None else None)
        restore_normalization(env, src.norm)
        if video_dir is not None:
            env = _with_video(env, video_dir, c)
        model = _load(c, src.model, env)
        env.seed(seed)  # load() reseeds the env with the training seed
        n = n_episodes or c["eval"]["n_episodes"]
        det = c["eval"]["deterministic"] if deterministic is None else deterministic
        out["seed"] = seed
    else:
        inputs = src.inputs
        env = make_eval_env(c)
        model = _load(c, src.model, env)
        out["exact"] = restore_vec_env(env, inputs["env"])  # after load(), which reseeds the env
        model.policy.load_state_dict(inputs["policy"])
        torch.set_rng_state(inputs["torch_rng"])
        n = n_episodes or inputs["n_episodes"]
        det = inputs["deterministic"] if deterministic is None else deterministic
        same = n == inputs["n_episodes"] and det == inputs["deterministic"]
        out.update(step=inputs["step"], recorded=inputs.get("returns") if same else None)
    rets, lens = evaluate_policy(model, env, n_eval_episodes=n, deterministic=det, return_episode_rewards=True)
    env.close()
    rets = np.asarray(rets, dtype=float)
    out.update(mean=float(rets.mean()), std=float(rets.std()), returns=rets.tolist(),
               lengths=[int(x) for x in lens], n_episodes=n, deterministic=det)
    return out


def _load(c: dict, path: Path, env):
    from agents.experiment.build import agent_class

    return agent_class(c["agent"]["cls"]).load(str(path), env=env, device="cpu")


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


def _describe(r: dict) -> str:
    how = "deterministic" if r["deterministic"] else "stochastic"
    if r["mode"] == "fresh":
        return f"{how}, {r['source']} on a fresh env, eval seed {r['seed']}"
    what = f"{how}, replay of the evaluation at step {r['step']} from {r['source']}"
    if r["recorded"] is None:
        return what + "; not the recorded protocol"
    same = r["returns"] == r["recorded"]
    return what + ("; identical to the recorded returns" if same else
                   f"; differs from the recorded {sum(r['recorded']) / len(r['recorded']):.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Replay a run's latest recorded evaluation exactly (default), "
                                            "or evaluate its saved model on a fresh env.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("-n", "--episodes", type=int, default=None, help="episodes (default: the run's eval.n_episodes)")
    p.add_argument("--fresh", action="store_true",
                   help="a fresh eval env (seed + eval.seed_offset + 1) instead of the recorded evaluation")
    p.add_argument("--seed", type=int, default=None, help="the fresh eval env's seed (implies --fresh)")
    p.add_argument("--stochastic", action="store_true", help="sample actions instead of the mode")
    p.add_argument("--video", nargs="?", const="", default=None, metavar="DIR",
                   help="record a video when rendering is available (implies --fresh; default DIR: "
                        "<run dir>/videos)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (every return, exact)")
    a = p.parse_args(argv)
    if a.episodes is not None and a.episodes < 1:
        print(f"error: --episodes must be >= 1, got {a.episodes}", file=sys.stderr)
        return 2
    video = None if a.video is None else (Path(a.video) if a.video else a.run_dir / "videos")
    try:
        r = evaluate_run(a.run_dir, a.episodes, False if a.stochastic else None, a.fresh, a.seed, video)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{a.run_dir}: return {r['mean']:.2f} ± {r['std']:.2f} over {r['n_episodes']} episodes "
              f"({_describe(r)})")
    return 0
