"""``result.json`` (status, returns, speed) and provenance of a run."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"  # the run's resolved configuration
#: bumped whenever result.json or evaluations.npz change meaning: committed runs of another format
#: are stale and run again (a result.json without the key is format 1)
RESULTS_FORMAT = 1
#: the inputs of the run's final evaluation (:mod:`agents.experiment.eval_history`)
FINAL_EVAL_FILE = "final_eval.pkl"


class RunStatus(str, Enum):
    """``result.json``'s ``status`` (a ``str``: it compares and serialises as its value)."""

    RUNNING = "running"  # training, killed or preempted: resumes from its checkpoint
    FINISHED = "finished"
    DIVERGED = "diverged"  # NaN/Inf or a MuJoCo instability stopped it
    FAILED = "failed"  # an error; resumes from its checkpoint too
    LOCKED = "locked"  # another process holds the run directory (never written to result.json)

    def __str__(self) -> str:
        return self.value


#: finished or diverged: repeating the command skips the run (``rerun=true`` trains it again)
DONE = (RunStatus.FINISHED, RunStatus.DIVERGED)


_PACKAGES = ("hesscale-rl", "torch", "numpy", "stable-baselines3", "gymnasium", "mujoco",
             "hydra-core", "omegaconf", "hydra-joblib-launcher", "hydra-submitit-launcher")
REPO_ROOT = Path(__file__).resolve().parents[2]


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def read_result(run_dir: Path) -> dict | None:
    p = Path(run_dir) / RESULT_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(threads: int) -> dict:
    """Where and with what a run was made: git commit, package versions, threads, CPU."""
    import torch

    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "packages": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def read_evaluations(run_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """``(timesteps, returns[n_evals, n_episodes])`` from the run's ``evaluations.npz``, or None."""
    p = Path(run_dir) / "evaluations.npz"
    if not p.is_file():
        return None
    with np.load(p) as d:
        steps = np.asarray(d["timesteps"], dtype=float)
        results = np.asarray(d["results"], dtype=float)
    return None if results.size == 0 else (steps, results)


def eval_summary(run_dir: Path) -> dict:
    """Final and area-under-curve evaluation return from ``evaluations.npz``.

    ``auc_return`` is the trapezoidal area under the mean-evaluation-return curve divided by the
    step span (the return averaged over the run); with a single evaluation it is that return.
    """
    out: dict[str, Any] = {"final_return": None, "final_return_std": None, "auc_return": None,
                           "n_evaluations": 0}
    evaluations = read_evaluations(run_dir)
    if evaluations is None:
        return out
    steps, results = evaluations
    means = results.mean(axis=1)
    out["final_return"] = _finite(means[-1])
    out["final_return_std"] = _finite(results[-1].std())
    out["n_evaluations"] = int(len(means))
    if len(means) == 1 or steps[-1] <= steps[0]:
        out["auc_return"] = _finite(means.mean())
    else:
        area = float(np.sum((means[1:] + means[:-1]) * np.diff(steps)) / 2.0)
        out["auc_return"] = _finite(area / (steps[-1] - steps[0]))
    return out


def _finite(x: float) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
