"""Sweeps on a real Slurm (``hydra/launcher=slurm``): a one-node cluster from ``scripts/slurm_local.sh``.

* a 2 x 2 sweep finishes: four ``finished`` results, ``sacct`` has the jobs ``COMPLETED``, a report;
* a time limit, and a preemption sent by hand (``scancel --signal=USR2``), signal the run, which
  checkpoints; submitit requeues the job and the run resumes to exactly the uninterrupted run
  (final parameters, TensorBoard scalars, progress.csv, evaluations: ``_assert_same_run``);
* a job with a bad override is recorded ``failed`` while the other one finishes;
* no Slurm reachable (no ``sbatch``, a controller that does not answer): the sweep fails at once
  with one line and exit code 2 (in the default suite, with stand-in commands; slow: real ones).

The cluster comes up once for the module (about 15 s; the Debian packages are installed first
when missing, which needs root and apt-get, else the tests skip) and is stopped afterwards. A run
is frozen at step 500 (``tests/pause_train.py``) until a signal comes, so the signal falls mid-run
whatever the machine's speed (by hand: always; Slurm's time limit: whenever it signals after the
job got there, else the requeued job pauses there for the next signal).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability_resume import PAUSE_TRAIN, TRAIN, _assert_same_run, _overrides

from agents.experiment.cluster import ClusterUnavailable, check_slurm

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
REPORT = str(ROOT / "scripts" / "report.py")
RUN = _overrides("ppo", "checkpoint.freq=0")  # PPO, opt=hesscale, 1000 steps; only the preemption checkpoints
GRID = [*(a for a in RUN if not a.startswith("opt=")), "opt=adam,hesscale", "seed=0,1"]
# against one's own cluster (README, "On Slurm"): SLURM_TEST_CLUSTER=existing, and e.g.
# SLURM_TEST_ARGS="hydra.launcher.partition=debug hydra.launcher.account=me hydra.launcher.qos=short"
OWN_CLUSTER = os.environ.get("SLURM_TEST_CLUSTER") == "existing"
OWN_ARGS = shlex.split(os.environ.get("SLURM_TEST_ARGS", ""))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict:
    """The environment (``SLURM_CONF``) of a one-node cluster that runs while the module does (each
    xdist worker that runs these tests starts its own: free ports, its own folder); with
    ``SLURM_TEST_CLUSTER=existing``, the Slurm this environment already reaches."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    if OWN_CLUSTER:
        try:
            check_slurm()
        except ClusterUnavailable as e:
            pytest.fail(f"SLURM_TEST_CLUSTER=existing: {e}")
        yield env
        return
    if not sys.platform.startswith("linux") or shutil.which("bash") is None:
        pytest.skip("the one-node Slurm cluster needs Linux and bash")
    d = tmp_path_factory.mktemp("slurm")
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up", str(d)], capture_output=True, text=True, timeout=900)
        if up.returncode == 3:
            pytest.skip(up.stderr.strip().splitlines()[-1])
        assert up.returncode == 0, f"scripts/slurm_local.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield {**env, "SLURM_CONF": str(d / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(d)], capture_output=True, timeout=300)


def _sweep(env: dict, out: Path, name: str, *args: str, pause: str | None = None) -> subprocess.Popen:
    script = [PAUSE_TRAIN, pause] if pause else [TRAIN]
    return subprocess.Popen([sys.executable, *script, "-m", "hydra/launcher=slurm", *args, *OWN_ARGS, f"out_dir={out}",
                             f"sweep_name={name}"], cwd=out, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, timeout: float = 600) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, out + err
    assert "Traceback" not in err and "Bypassing sacct error" not in out + err, err  # sacct answered
    return out + err


def _job_id(sweep: Path) -> str:
    (job,) = [d.name for d in (sweep / ".submitit").iterdir() if d.name.isdigit()]
    return job


def _sacct(env: dict, job: str) -> list[tuple[str, str]]:
    """``(job id, state)`` of every run of the job (``-D``: requeued runs too), allocations only."""
    out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job], env=env,
                         capture_output=True, text=True, check=True).stdout
    return [tuple(line.split("|")) for line in out.splitlines() if line]


def _settled(env: dict, job: str, n: int, timeout: float = 120) -> list[str]:
    """The states of the job's runs once its last ``n`` are over (Slurm ends a job shortly after
    submitit has its result)."""
    t0 = time.monotonic()
    while True:
        states = [s for _, s in _sacct(env, job)]
        if len(states) >= n and not {"PENDING", "RUNNING", "COMPLETING"} & set(states[-n:]):
            return states
        assert time.monotonic() - t0 < timeout, states
        time.sleep(1)


def _results(sweep: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(sweep.rglob("result.json"))]


@pytest.fixture(scope="module")
def grid(slurm: dict, tmp_path_factory) -> tuple[Path, str]:
    """The 2 x 2 sweep (opt=adam,hesscale x seed=0,1) of the run the preemption tests interrupt:
    its folder and the command's output."""
    out = tmp_path_factory.mktemp("grid")
    return out / "grid", _finish(_sweep(slurm, out, "grid", *GRID))


@pytest.fixture(scope="module")
def uninterrupted(grid: tuple[Path, str]) -> Path:
    """The run of the preemption tests (opt=hesscale seed=0), trained in one Slurm job."""
    (r,) = [r for r in _results(grid[0]) if r["opt"] == "hesscale" and r["seed"] == 0]
    return Path(r["run_dir"])


@pytest.mark.slow
def test_a_2x2_sweep_finishes_and_reports(slurm: dict, grid: tuple[Path, str], tmp_path: Path):
    sweep, _ = grid
    results = _results(sweep)
    assert sorted((r["opt"], r["seed"]) for r in results) == [("adam", 0), ("adam", 1), ("hesscale", 0),
                                                                ("hesscale", 1)]
    assert all(r["status"] == "finished" and r["timesteps"] == 1000 for r in results), results
    assert len({r["provenance"].get("slurm_job_id") for r in results} - {None}) == 4  # four Slurm jobs
    assert sorted(_settled(slurm, _job_id(sweep), 4)) == ["COMPLETED"] * 4
    rep = subprocess.run([sys.executable, REPORT, str(sweep), "--reps", "10"], cwd=tmp_path, env=slurm,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stdout + rep.stderr
    table = (sweep / "report" / "table.md").read_text()
    assert "adam" in table and "hesscale" in table, table


def _assert_requeued_and_resumed(env: dict, sweep: Path, ref: Path, case: str) -> dict:
    """The sweep's one run was signalled, requeued (at least once) and resumed to ``ref`` exactly."""
    (r,) = _results(sweep)
    _assert_same_run(Path(r["run_dir"]), ref, "ppo")
    job = _job_id(sweep)
    *before, last = _settled(env, job, 1)  # one run of the job per session
    assert last == "COMPLETED" and before and set(before) == {"REQUEUED"}, before + [last]
    assert 1 <= len(r["resumed_from"]) <= len(before), r
    log = (sweep / ".submitit" / job / f"{job}_0_log.out").read_text()
    assert re.search(rf"Caught signal SIGUSR2 on \S+: this job is {case}", log), log
    assert "Requeued job" in log and re.search(r"\[preempted\].*SIGUSR2 -> checkpoint at step \d+", log), log
    assert f"resuming from the checkpoint at step {r['resumed_from'][-1]} of 1000" in log, log
    return r


@pytest.mark.slow
def test_time_limit_requeues_and_resumes_exactly(slurm: dict, tmp_path: Path, uninterrupted: Path):
    # A one-minute limit. Slurm looks at time limits every 30 s: it sends USR2 at the first look
    # less than signal_delay_s + 30 s before the limit (here: 25 to 55 s into the job, usually at
    # the pause), and ends the job at the first look after the limit, at least 30 s later.
    p = _sweep(slurm, tmp_path, "limit", *RUN, "hydra.launcher.timeout_min=1",
               "hydra.launcher.signal_delay_s=5", pause="step:500")
    _finish(p)
    _assert_requeued_and_resumed(slurm, tmp_path / "limit", uninterrupted, "timed-out")


@pytest.mark.slow
def test_preemption_by_hand_requeues_and_resumes_exactly(slurm: dict, tmp_path: Path, uninterrupted: Path):
    # a long limit (submitit: "preempted", not "timed-out", for a job that ran < 80 % of it)
    p = _sweep(slurm, tmp_path, "preempt", *RUN, "hydra.launcher.timeout_min=30", pause="step:500")
    sweep = tmp_path / "preempt"
    t0 = time.monotonic()
    while not list(sweep.rglob(".paused")):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < 300, "the job did not reach step 500"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", _job_id(sweep)], env=slurm, check=True)
    _finish(p)
    r = _assert_requeued_and_resumed(slurm, sweep, uninterrupted, "preempted")
    assert r["resumed_from"] == [600]  # paused at 500, checkpointed at the next rollout boundary


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_the_other_finishes(slurm: dict, tmp_path: Path):
    p = _sweep(slurm, tmp_path, "bad", *_overrides("ppo"), "total_timesteps=400", "opt.lr=3e-4,0")
    _finish(p)
    results = _results(tmp_path / "bad")
    by_status = {r["status"]: r for r in results}
    assert sorted(by_status) == ["failed", "finished"] and len(results) == 2, results
    ok, bad = by_status["finished"], by_status["failed"]
    assert ok["lr"] == 3e-4 and ok["timesteps"] == 400, ok
    assert "_lr0/" in bad["run_dir"] and bad["error"].startswith("ConfigError: ") and "opt.lr" in bad["error"], bad


@pytest.mark.slow
def test_a_controller_that_does_not_answer_fails_in_one_line(slurm: dict, tmp_path: Path):
    """The real ``scontrol``, pointed at a port where no controller listens."""
    if not Path(slurm.get("SLURM_CONF", "")).is_file():
        pytest.skip("needs the cluster's slurm.conf (SLURM_CONF)")
    conf = Path(slurm["SLURM_CONF"]).read_text()
    bad = tmp_path / "slurm.conf"
    bad.write_text(re.sub(r"(?m)^SlurmctldPort=\d+$", "SlurmctldPort=1", conf))
    p = _sweep({**slurm, "SLURM_CONF": str(bad)}, tmp_path, "nowhere", "env=pendulum")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, out + err
    assert "the controller is not answering (scontrol ping: Slurmctld(primary) at" in err, err
    assert "Traceback" not in err and not (tmp_path / "nowhere" / ".submitit").exists()


# -- no Slurm reachable: the default suite, with stand-in commands -------------------------------

def _stub(folder: Path, name: str, body: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\n{body}\n")
    (folder / name).chmod(0o755)


def _no_slurm_sweep(tmp_path: Path, path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": str(path), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, TRAIN, "-m", "hydra/launcher=slurm", "env=pendulum", f"out_dir={tmp_path}",
                           "sweep_name=nowhere"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _assert_one_line(p: subprocess.CompletedProcess, tmp_path: Path, what: str) -> None:
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Invalid configuration: hydra/launcher=slurm: "), p.stderr
    assert what in lines[0], lines[0]
    assert not (tmp_path / "nowhere" / ".submitit").exists()  # nothing was submitted


def test_no_sbatch_fails_in_one_line(tmp_path: Path):
    p = _no_slurm_sweep(tmp_path, tmp_path / "empty")
    _assert_one_line(p, tmp_path, "`sbatch` not found on PATH")


def test_a_controller_that_does_not_answer_fails_in_one_line_stand_in(tmp_path: Path):
    bin_ = tmp_path / "bin"
    _stub(bin_, "sbatch", f"echo called > {tmp_path}/sbatch_called; exit 1")
    _stub(bin_, "scontrol", 'echo "Slurmctld(primary) at nowhere is DOWN"; exit 1')
    p = _no_slurm_sweep(tmp_path, bin_)
    _assert_one_line(p, tmp_path, "the controller is not answering (scontrol ping: Slurmctld(primary) at nowhere "
                                  "is DOWN)")
    assert not (tmp_path / "sbatch_called").exists()


def test_a_controller_that_hangs_is_given_up_on(tmp_path: Path, monkeypatch):
    bin_ = tmp_path / "bin"
    _stub(bin_, "sbatch", "exit 1")
    _stub(bin_, "scontrol", f"echo 'scontrol: error: retrying' >&2; exec {shutil.which('sleep')} 30")
    monkeypatch.setenv("PATH", str(bin_))
    with pytest.raises(ClusterUnavailable, match=r"did not answer `scontrol ping` within 0.5s \(scontrol: error: "
                                                 r"retrying\)"):
        check_slurm(timeout_s=0.5)
