"""report.py on runs with one or two evaluation points: a warning, and training-episode returns
(progress.csv) when every run is that sparse and they are denser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from agents.experiment.report import main, make_report


def _run(root: Path, opt: str, seed: int, eval_steps, train_steps) -> Path:
    d = root / "pendulum" / "ppo" / f"{opt}_lr0.001" / f"seed{seed}"
    (d / "tb").mkdir(parents=True)
    eval_steps = np.asarray(eval_steps)
    res = np.tile(-1000.0 + eval_steps[:, None] / 10, (1, 2))
    np.savez(d / "evaluations.npz", timesteps=eval_steps, results=res, ep_lengths=np.ones_like(res))
    # SB3's progress.csv: one row per rollout, ep_rew_mean empty before the first episode ends
    rows = ["time/total_timesteps,rollout/ep_rew_mean,train/loss"]
    rows += [f"{s},{'' if i == 0 else -500.0 + s / 100 + seed},0.1" for i, s in enumerate(train_steps)]
    (d / "tb" / "progress.csv").write_text("\n".join(rows) + "\n")
    r = {"status": "finished", "env": "pendulum", "env_id": "Pendulum-v1", "agent": "ppo", "opt": opt,
         "lr": 1e-3, "seed": seed, "variant": "", "total_timesteps": int(train_steps[-1])}
    (d / "result.json").write_text(json.dumps(r))
    return d


TRAIN = np.arange(200, 2001, 200)


def test_two_evaluations_fall_back_to_denser_training_returns(tmp_path: Path, capsys):
    for opt in ("adam", "hesscale"):
        for seed in (0, 1):
            _run(tmp_path, opt, seed, [1000, 2000], TRAIN)
    out = make_report(tmp_path, reps=0, points=10)
    assert len(out["warnings"]) == 2
    assert "only 1-2 evaluation points" in out["warnings"][0]
    assert "training-episode returns" in out["warnings"][1]
    # final return = the last training-episode return (mean over the two seeds), not -800
    row = out["table"].set_index("opt").loc["adam"]
    assert row["final_mean"] == np.mean([-500 + 2000 / 100 + s for s in (0, 1)])
    assert main([str(tmp_path), "--reps", "0"]) == 0
    assert "warning: 4 of 4 runs have only 1-2 evaluation points" in capsys.readouterr().err


def test_sparse_eval_only_warns_when_other_runs_are_dense_or_source_is_eval(tmp_path: Path):
    _run(tmp_path, "adam", 0, [2000], TRAIN)
    _run(tmp_path, "adam", 1, TRAIN, TRAIN)
    out = make_report(tmp_path, reps=0, points=10)
    assert len(out["warnings"]) == 1 and "1 of 2 runs" in out["warnings"][0]
    row = out["table"].iloc[0]
    assert row["final_mean"] == -1000 + 2000 / 10  # the evaluations, as before
    assert make_report(tmp_path, reps=0, points=10, source="eval")["warnings"] == []


def test_dense_evaluations_are_used_without_warning(tmp_path: Path):
    _run(tmp_path, "adam", 0, TRAIN, TRAIN)
    assert make_report(tmp_path, reps=0, points=10)["warnings"] == []
