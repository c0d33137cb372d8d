"""Resume after SIGKILL / SIGTERM, atomic checkpoints: killed runs finish exactly as uninterrupted ones.

Runs are tiny (Pendulum-v1, 16-unit nets, a few hundred steps). A run is frozen at a known point
by ``tests/pause_train.py`` (``scripts/train.py`` with a pause injected after env step N, or while
writing the K-th checkpoint) and killed from outside; the same command then resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.experiment import preemption
from agents.experiment.build import MODEL_FILE
from agents.experiment.compose import compose_config
from agents.experiment.run import train
from agents.experiment.store import CheckpointStore, load_state

ROOT = Path(__file__).resolve().parents[2]
TRAIN = str(ROOT / "scripts" / "train.py")
PAUSE_TRAIN = str(ROOT / "tests" / "pause_train.py")
COMMON = ["env=pendulum", "opt=hesscale", "eval.freq=400", "eval.n_episodes=1", "checkpoint.freq=200",
          "progress_bar=false", "++agent.policy_kwargs.net_arch=[16]"]
# Rollouts of 200 steps = one Pendulum episode: checkpoints fall on episode boundaries.
AGENTS = {
    "ppo": ["agent=ppo", "agent.kwargs.n_steps=200", "agent.kwargs.batch_size=50", "agent.kwargs.n_epochs=2",
            "total_timesteps=1000"],
    # both networks on the curvature path (the shipped SAC default keeps the critic on Adam:
    # test_resume_mid_episode_is_exact runs that one)
    "sac": ["agent=sac", "opt.critic_optimizer=null", "agent.kwargs.learning_starts=100", "agent.kwargs.batch_size=32",
            "agent.kwargs.buffer_size=2000", "total_timesteps=600"],
}


PER_ITERATION = {"ppo": ("rollout/ep_rew_mean", [200, 400, 600, 800, 1000]),
                 "sac": ("eval/mean_reward", [400, 600])}


def _overrides(agent: str, *extra: str) -> list[str]:
    return [*AGENTS[agent], *COMMON, *extra]


def _start(args: list[str], cwd: Path, pause: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    command = [PAUSE_TRAIN, pause, *args] if pause else [TRAIN, *args]
    return subprocess.Popen([sys.executable, *command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_paused(p: subprocess.Popen, root: Path, timeout: float = 120) -> Path:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = list(root.rglob(".paused"))
        if found:
            return found[0].parent
        if p.poll() is not None:
            out, err = p.communicate()
            pytest.fail(f"the run ended before pausing (rc {p.returncode}):\n{out}\n{err}")
        time.sleep(0.05)
    p.kill()
    pytest.fail("the run did not reach the pause point")


def _finish(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    p = _start(args, cwd)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _scalars(run: Path) -> list[tuple[str, int, float]]:
    """Every scalar TensorBoard reads back (purged events dropped), ``time/*`` left out."""
    from tbparse import SummaryReader

    df = SummaryReader(str(run / "tb")).scalars
    df = df[~df.tag.str.startswith("time/")]
    return sorted((t, int(s), float(v)) for t, s, v in zip(df.tag, df.step, df.value))


def _csv(run: Path) -> list[dict]:
    import csv

    with open(run / "tb" / "progress.csv") as f:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(f)]


def _params(run: Path) -> dict:
    from stable_baselines3.common.save_util import load_from_zip_file

    _, params, _ = load_from_zip_file(str(run / "model.zip"))
    return params


def _assert_same_run(run: Path, ref: Path, agent: str) -> None:
    r = json.loads((run / "result.json").read_text())
    assert r["status"] == "finished" and r["timesteps"] == r["total_timesteps"], r
    got, want = _scalars(run), _scalars(ref)
    # the step axis: each per-iteration tag once per iteration, no gaps, no duplicates
    tag, steps = PER_ITERATION[agent]
    assert [s for t, s, _ in got if t == tag] == steps
    assert got == want, sorted(set(got) ^ set(want))[:10]
    pa, pb = _params(run), _params(ref)
    assert pa.keys() == pb.keys()
    for name in pa:
        a, b = pa[name], pb[name]
        if isinstance(a, dict) and "state" in a or name.endswith("optimizer"):
            continue  # optimizer state: compared through the parameters it produced
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert _csv(run) == _csv(ref)
    with np.load(run / "evaluations.npz") as ea, np.load(ref / "evaluations.npz") as eb:
        assert ea["timesteps"].tolist() == eb["timesteps"].tolist()
        assert np.array_equal(ea["results"], eb["results"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs (same seed and config), trained in this process."""
    out = {}
    for agent in AGENTS:
        d = tmp_path_factory.mktemp(f"ref_{agent}")
        r = train(compose_config(_overrides(agent)), d)
        assert r["status"] == "finished", r
        assert not (d / "checkpoints").exists()  # removed once the run is done
        out[agent] = d
    return out


@pytest.mark.parametrize("agent,pause,extra", [
    # PPO: checkpoint at 400, logs at 600 written after it, killed at 700 -> those are dropped
    ("ppo", "step:700", ["checkpoint.freq=400"]),
    # SAC: checkpoints every 200 steps (at step boundaries), killed at 500
    pytest.param("sac", "step:500", [], marks=pytest.mark.slow),
])
def test_sigkill_then_rerun_resumes_and_equals_uninterrupted(tmp_path: Path, reference, agent: str,
                                                             pause: str, extra: list[str]):
    args = [*_overrides(agent, *extra), f"out_dir={tmp_path}"]
    p = _start(args, tmp_path, pause=pause)
    run = _wait_paused(p, tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert CheckpointStore(run).latest().name == "step_000000000400"
    assert json.loads((run / "result.json").read_text())["status"] == "running"
    _assert_replays(run, step=400, source="checkpoint step_000000000400")  # the unfinished run
    (run / ".paused").unlink()
    done = _finish(args, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[resume]" in done.stdout and "from the checkpoint at step 400" in done.stdout, done.stdout
    r = json.loads((run / "result.json").read_text())
    assert r["resumed_from"] == [400]
    _assert_same_run(run, reference[agent], agent)
    assert not (run / "checkpoints").exists()
    replay = _assert_replays(run, step=1000 if agent == "ppo" else 600, source="the final model")
    assert replay["mean"] == r["final_return"]


def _assert_replays(run: Path, step: int, source: str) -> dict:
    """``evaluate.py``'s default: the evaluation at ``step`` recorded in evaluations.npz, replayed."""
    from agents.experiment.evaluate import evaluate_run

    got = evaluate_run(run)
    assert (got["mode"], got["step"], got["source"]) == ("replay", step, source), got
    with np.load(run / "evaluations.npz") as ev:
        assert got["returns"] == ev["results"][ev["timesteps"].tolist().index(step)].tolist()
    return got


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path: Path, reference):
    args = [*_overrides("ppo"), f"out_dir={tmp_path}"]
    p = _start(args, tmp_path, pause="checkpoint:2")  # frozen inside the write of step 400
    run = _wait_paused(p, tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    store = CheckpointStore(run)
    assert list(store.root.glob(".tmp-400-*")), list(store.root.iterdir())  # the interrupted write
    latest = store.latest()
    assert latest.name == "step_000000000200" and (store.root / "latest").read_text().strip() == latest.name
    import agents

    model = agents.PPO.load(str(latest / MODEL_FILE))  # loadable
    assert model.num_timesteps == 200 and load_state(latest)["step"] == 200
    (run / ".paused").unlink()
    done = _finish(args, tmp_path)
    assert done.returncode == 0 and "from the checkpoint at step 200" in done.stdout, done.stdout + done.stderr
    _assert_same_run(run, reference["ppo"], "ppo")


def test_sigterm_checkpoints_exits_and_resumes(tmp_path: Path, reference):
    args = [*_overrides("ppo", "checkpoint.freq=0"), f"out_dir={tmp_path}"]  # only the preemption checkpoint
    p = _start(args, tmp_path, pause="step:500")
    run = _wait_paused(p, tmp_path)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, out + err
    assert "[preempted]" in out and "checkpoint at step 600" in out, out + err
    r = json.loads((run / "result.json").read_text())
    assert r["status"] == "running" and r["preempted"]["step"] == 600 and r["preempted"]["signal"] == "SIGTERM"
    assert CheckpointStore(run).latest().name == "step_000000000600"
    (run / ".paused").unlink()
    done = _finish(args, tmp_path)
    assert done.returncode == 0 and "from the checkpoint at step 600" in done.stdout, done.stdout + done.stderr
    _assert_same_run(run, reference["ppo"], "ppo")


def test_sigusr1_is_a_preemption_signal():
    preemption.reset_preemption()
    try:
        with preemption.PreemptionGuard():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)
            assert preemption.preemption_requested() == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) is not preemption._handler  # handlers put back
    finally:
        preemption.reset_preemption()


def test_store_ignores_incomplete_checkpoints(tmp_path: Path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (10, 20, 30):
        store.save(step, lambda d, s=step: (d / "a.bin").write_bytes(bytes(s)))
    assert [d.name for d in store.steps()] == ["step_000000000020", "step_000000000030"]  # keep=2
    assert store.latest().name == "step_000000000030"
    (store.root / "step_000000000030" / "a.bin").write_bytes(b"x")  # torn file: size mismatch
    assert store.latest().name == "step_000000000020"
    (store.root / "latest").write_text("step_000000000099\n")  # dangling pointer
    assert store.latest().name == "step_000000000020"
    (store.root / "step_000000000040").mkdir()  # renamed without a manifest: never used
    assert store.latest().name == "step_000000000020"


def test_submitit_preemption_handler_is_chained_after_the_checkpoint():
    """submitit's handler for its preemption signal (USR2) runs after ours has checkpointed."""
    calls = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))  # stands in for submitit's
    preemption.reset_preemption()
    try:
        with preemption.PreemptionGuard():
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            assert preemption.preemption_requested() == signal.SIGUSR2 and calls == []
        preemption.chain_previous_handler(signal.SIGUSR2)
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, old)
        preemption.reset_preemption()


@pytest.mark.parametrize("env,agent,resume_at", [
    ("pendulum", "sac", 150),                   # mid-episode (Pendulum episodes are 200 steps)
    ("halfcheetah", "ppo", 256),                # MuJoCo, mid-episode: mj_getState / mj_setState
])
def test_resume_mid_episode_is_exact(tmp_path: Path, env: str, agent: str, resume_at: int):
    """Rewind a finished run to an earlier checkpoint and resume it: same result, bit for bit."""
    import shutil

    if agent == "ppo":
        extra = ["tuned=none", "agent=ppo", "agent.kwargs.n_steps=64", "agent.kwargs.batch_size=32",
                 "agent.kwargs.n_epochs=2", "total_timesteps=320"]
    else:
        extra = ["agent=sac", "agent.kwargs.learning_starts=50", "agent.kwargs.batch_size=32",
                 "agent.kwargs.buffer_size=1000", "total_timesteps=250"]
    cfg = compose_config([*extra, f"env={env}", "opt=hesscale", "eval.freq=128", "eval.n_episodes=1", "checkpoint.freq=50",
                "checkpoint.keep=1000", "checkpoint.keep_when_done=true", "progress_bar=false",
                "++agent.policy_kwargs.net_arch=[16]"])
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(cfg, a)["status"] == "finished"
    shutil.copytree(a, b)
    r = json.loads((b / "result.json").read_text())
    (b / "result.json").write_text(json.dumps({**r, "status": "running"}))  # as if killed
    for d in (b / "checkpoints").glob("step_*"):
        if int(d.name[5:]) > resume_at:
            shutil.rmtree(d)
    (b / "checkpoints" / "latest").write_text(f"step_{resume_at:012d}\n")
    rb = train(cfg, b)
    assert rb["status"] == "finished" and rb["resumed_from"] == [resume_at], rb
    assert _scalars(a) == _scalars(b) and _csv(a) == _csv(b)
    pa, pb = _params(a), _params(b)
    assert all(torch.equal(pa["policy"][k], pb["policy"][k]) for k in pa["policy"])
