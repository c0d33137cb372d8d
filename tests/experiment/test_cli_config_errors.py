"""The command line: every configuration error exits 2 with one message (Hydra's composition errors
included, with a "did you mean"); every way of switching `tuned` off works; each run prints its
directory as it starts, and TensorBoard names runs by their directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["env=pendulum", "total_timesteps=64", "agent.kwargs.n_steps=64", "agent.kwargs.batch_size=32",
        "eval.freq=0", "eval.n_episodes=1", "progress_bar=false"]


def _train(args, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """``train.py [flags] [overrides] out_dir=<tmp_path>`` (argparse wants the flags first)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *flags, *args, f"out_dir={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("args,expected", [
    (["opt=hesscal"], "opt=hesscal is not a config in configs/opt/ (did you mean hesscale?)"),
    (["agent=ppo2"], "agent=ppo2 is not a config in configs/agent/ (did you mean ppo?)"),
    (["env=hoppper"], "env=hoppper is not a config in configs/env/ (did you mean hopper?)"),
    (["opt=adam,hesscal"], "(did you mean hesscale?)"),  # with -m
    (["opt.scalng.delta=1e-4"], "opt.scalng.delta: unknown key (did you mean opt.scaling.delta?)"),
    (["opt.lr=["], "no viable alternative at input '['"),
    (["+opt.scalng.delta=1e-4"], "opt.scalng.delta: unknown key (did you mean opt.scaling.delta?)"),  # Hydra's hint
    (["opt.lr=0"], "opt.lr=0"),  # a value error, found by validation after composition
    (["--cfg", "job", "opt=adam,sgd"], "Only one of --run, --multirun, --cfg"),  # with -m
])
def test_every_config_error_exits_2_with_one_message(args, expected, tmp_path: Path):
    p = _train(args, tmp_path, *(["-m"] if "," in args[-1] else []))
    assert p.returncode == 2, p.stderr
    assert expected in p.stderr and "Traceback" not in p.stderr
    assert "HYDRA_FULL_ERROR" not in p.stderr


def test_every_documented_way_of_switching_tuned_off(tmp_path: Path):
    default = _train([], tmp_path, "--cfg", "job")
    assert default.returncode == 0 and "n_steps: 512" in default.stdout  # RL Zoo's PPO HalfCheetah value
    off = [_train([way], tmp_path, "--cfg", "job") for way in ("tuned=none", "tuned=null", "~tuned")]
    assert all(p.returncode == 0 for p in off), [p.stderr for p in off]
    assert off[0].stdout == off[1].stdout == off[2].stdout != default.stdout
    assert "n_steps: 2048" in off[0].stdout  # SB3's default


def test_run_directory_is_printed_first_and_names_the_tensorboard_run(tmp_path: Path):
    single = _train(["agent=ppo", "opt=adam", *TINY], tmp_path)
    assert single.returncode == 0, single.stderr
    first = single.stdout.splitlines()[0]
    assert first.startswith("[run] ppo/adam/pendulum seed=0 -> "), single.stdout
    run_dir = Path(first.split(" -> ")[1])
    assert (run_dir / "result.json").is_file()
    # TensorBoard's run name is the directory below --logdir: <env>/<agent>/<opt>_lr<lr>/<overrides>/seed<k>/tb
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len(events) == 1
    parts = events[0].parent.relative_to(tmp_path).parts
    assert parts[:3] == ("pendulum", "ppo", "adam_lr0.0003") and parts[-2:] == ("seed0", "tb")

    multi = _train(["agent=ppo", "opt=adam,sgd", *TINY, "hydra.launcher.n_jobs=2"], tmp_path / "m", "-m")
    assert multi.returncode == 0, multi.stderr
    starts = sorted(line for line in multi.stdout.splitlines() if line.startswith("[run] "))
    assert [s.split(" -> ")[0] for s in starts] == ["[run] ppo/adam/pendulum seed=0", "[run] ppo/sgd/pendulum seed=0"], (
        multi.stdout + multi.stderr
    )
    for s in starts:
        assert (Path(s.split(" -> ")[1]) / "result.json").is_file()
