"""Ctrl-C on a real `scripts/train.py` run behaves like SIGTERM: checkpoint at the next safe boundary,
one line saying how to resume, exit 130, no traceback; a second Ctrl-C exits at once; in a multirun
every running job checkpoints. After a resume the progress bar counts from the resumed step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "scripts" / "train.py")
TINY = ["agent=ppo", "opt=adam", "env=pendulum", "total_timesteps=1000000", "agent.kwargs.n_steps=200",
        "agent.kwargs.batch_size=100", "agent.kwargs.n_epochs=1", "++agent.policy_kwargs.net_arch=[16]",
        "eval.freq=0", "eval.n_episodes=1", "checkpoint.freq=0"]


def _start(args: list[str], out_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.Popen([sys.executable, TRAIN, *args, f"out_dir={out_dir}"], cwd=out_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's job


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.1)


def _rows(run_dir: Path) -> int:
    csv = run_dir / "tb" / "progress.csv"
    return len(csv.read_text().splitlines()) - 1 if csv.is_file() else 0


def _ctrl_c(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def _one_run_dir(out: Path) -> Path:
    (res,) = out.rglob("result.json")
    return res.parent


def test_ctrl_c_checkpoints_exits_130_and_the_resume_counts_from_there(tmp_path: Path):
    args = [*TINY, "progress_bar=true"]
    proc = _start(args, tmp_path)
    _wait_for(lambda: list(tmp_path.rglob("progress.csv")) and _rows(_one_run_dir(tmp_path)) >= 3, proc,
              "3 rollouts")
    _ctrl_c(proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "ImportError" not in err and "KeyboardInterrupt" not in err, err
    assert "[interrupt] Ctrl-C: checkpointing at the next safe boundary" in err
    run_dir = _one_run_dir(tmp_path)
    (first,) = _checkpoints(run_dir)
    assert first % 200 == 0 and first >= 600  # a rollout boundary after the 3rd rollout
    (line,) = [ln for ln in out.splitlines() if ln.startswith("[preempted]")]
    assert f"SIGINT -> checkpoint at step {first}; run the same command again to resume" in line
    r = json.loads((run_dir / "result.json").read_text())
    assert r["status"] == "running" and r["preempted"]["step"] == first and r["preempted"]["signal"] == "SIGINT"

    proc = _start(args, tmp_path)  # the same command resumes; interrupt it again a few rollouts later
    _wait_for(lambda: _rows(run_dir) >= first // 200 + 2, proc, "2 more rollouts")
    _ctrl_c(proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert f"resuming from the checkpoint at step {first} of 1000000" in out
    (second,) = _checkpoints(run_dir)
    assert second > first
    # the bar's last state: the overall position out of the whole budget, not "k of the remaining steps"
    bars = re.findall(r"([\d,]+)/([\d,]+)", out)
    assert bars and bars[-1] == (f"{second:,}", "1,000,000"), out


def test_a_second_ctrl_c_exits_at_once(tmp_path: Path):
    # one rollout of 1M steps: no safe boundary comes for a long time
    args = [*TINY, "agent.kwargs.n_steps=1000000", "agent.kwargs.batch_size=1000", "progress_bar=false"]
    proc = _start(args, tmp_path)
    _wait_for(lambda: list(tmp_path.rglob("result.json")), proc, "the run's start")
    time.sleep(2)
    _ctrl_c(proc)
    time.sleep(1)
    _ctrl_c(proc)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "second Ctrl-C: exiting now" in err and "Traceback" not in err
    assert _checkpoints(_one_run_dir(tmp_path)) == []  # no boundary was reached


@pytest.mark.slow
def test_ctrl_c_in_a_multirun_checkpoints_every_running_job(tmp_path: Path):
    proc = _start(["-m", *TINY, "opt=adam,sgd", "hydra.launcher.n_jobs=2"], tmp_path)

    def both_training() -> bool:
        dirs = [p.parent.parent for p in tmp_path.rglob("progress.csv")]
        return len(dirs) == 2 and all(_rows(d) >= 2 for d in dirs)

    _wait_for(both_training, proc, "both jobs training")
    _ctrl_c(proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    runs = [p.parent for p in tmp_path.rglob("result.json")]
    assert len(runs) == 2
    for d in runs:
        r = json.loads((d / "result.json").read_text())
        assert r["preempted"]["signal"] == "SIGINT" and _checkpoints(d) == [r["preempted"]["step"]]
    assert len([ln for ln in out.splitlines() if ln.startswith("[preempted]")]) == 2
