"""Resumable runs: atomic checkpoints, exact restore of a run's state, preemption signals.

A checkpoint is a folder ``<run dir>/checkpoints/step_<N>/`` holding

* ``model.zip``: SB3's ``save()`` (parameters, optimizer states — curvature EMAs and step-size
  state included —, step counter, episode-info buffers, ...);
* ``replay_buffer.pkl`` (off-policy agents);
* ``state.pkl``: what SB3's ``save()`` leaves out: the RNG states (Python, NumPy, torch, the model's
  action space), the training and evaluation envs (each Gymnasium env pickled — for MuJoCo envs
  also ``mj_getState`` and the env's ``np_random`` —, pending reset seeds, VecNormalize statistics
  *and* its running returns), the last observation, the logger's pending values and the number of
  CSV rows written, the evaluation callback's history and call counter, the wall time so far;
* ``MANIFEST.json``, written last (file names and sizes).

Atomicity: the files go into ``checkpoints/.tmp-<step>-<pid>/``, which is renamed to
``step_<N>`` once complete; then the text file ``checkpoints/latest`` is replaced atomically
(write + ``os.replace``). A kill at any moment leaves either the previous checkpoint or the new
one as ``latest``; a folder without a complete manifest is never loaded (loading falls back to the
newest complete checkpoint).

Checkpoints are taken at *safe boundaries*: at the start of a rollout (``on_rollout_start``),
i.e. after ``train()`` and before the next environment step — for PPO/A2C a rollout boundary, for
SAC a step boundary. The state saved there and the state restored there are the same, so a
resumed run continues exactly as the uninterrupted one would have (same RNG draws, same
episodes), as long as the envs' state could be captured (see :func:`snapshot_vec_env`).

Where a resumed run is *not* bit-identical to an uninterrupted one:

* an env that cannot be pickled, or a ``SubprocVecEnv``: the episode in progress is cut (SB3
  resets the env; the resume message says so);
* envs that pickle by constructor arguments (MuJoCo's ``EzPickle``) are rebuilt, then get their
  ``np_random`` and simulator state (``mjSTATE_INTEGRATION``) back; Python attributes such an
  env changes during an episode beyond these are not carried over (none in Gymnasium's v5 tasks);
* gSDE (``use_sde=True``): SB3 draws the exploration matrix before ``on_rollout_start`` and does
  not save it, so the first rollout after a resume uses a different one;
* a different machine, thread count, library version or a GPU (non-deterministic kernels);
* the wall time only counts up to the checkpoint for the session that was killed.

SB3 pitfalls handled here and in :mod:`agents.experiment.run`: ``load()`` reseeds every RNG (the
saved states are put back at the first boundary, after loading); ``load()`` drops the last
observation (it is restored, with ``force_reset=False``); ``learn(T, reset_num_timesteps=False)``
trains T *more* steps (the runner passes the remaining budget); SB3's ``CheckpointCallback`` saves
mid-rollout (not used); TensorBoard events written after the checkpoint are dropped (``purge_step``
and the old event files rewritten); ``EvalCallback`` keeps its history in memory (saved here).
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from agents.experiment.build import BUFFER_FILE, MODEL_FILE

CKPT_DIR = "checkpoints"
LATEST = "latest"
MANIFEST = "MANIFEST.json"
STATE_FILE = "state.pkl"
FORMAT_VERSION = 1
# keys that may differ between the session that wrote a checkpoint and the one resuming it
VOLATILE_KEYS = ("progress_bar", "verbose", "rerun", "threads", "checkpoint", "save_model", "device",
                 "out_dir", "sweep_name")


def identity(c: dict) -> dict:
    """The part of a resolved config that must match for a checkpoint to be resumed."""
    return {k: v for k, v in c.items() if k not in VOLATILE_KEYS}


# -- on-disk store --------------------------------------------------------------------------------
class CheckpointStore:
    """The checkpoints of one run directory (``<run dir>/checkpoints``)."""

    def __init__(self, run_dir: Path, keep: int = 1) -> None:
        self.root = Path(run_dir) / CKPT_DIR
        self.keep = max(int(keep), 1)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def cleanup_tmp(self) -> None:
        """Remove folders left by checkpoints that were interrupted."""
        if self.root.is_dir():
            for d in self.root.glob(".tmp-*"):
                shutil.rmtree(d, ignore_errors=True)
            for f in self.root.glob(f".{LATEST}.*"):
                f.unlink(missing_ok=True)

    @staticmethod
    def is_complete(d: Path) -> bool:
        try:
            manifest = json.loads((d / MANIFEST).read_text())
            return manifest.get("format") == FORMAT_VERSION and all(
                (d / name).is_file() and (d / name).stat().st_size == size
                for name, size in manifest["files"].items())
        except (OSError, ValueError, KeyError, AttributeError):
            return False

    def steps(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((d for d in self.root.glob("step_*") if d.is_dir() and self.is_complete(d)),
                      key=lambda d: d.name)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` points to, else the newest complete one, else None."""
        try:
            name = (self.root / LATEST).read_text().strip()
        except OSError:
            name = ""
        if name and "/" not in name and self.is_complete(self.root / name):
            return self.root / name
        done = self.steps()
        return done[-1] if done else None

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write a checkpoint for ``step`` with ``write(folder)``, atomically; returns its folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{int(step):012d}"
        if self.is_complete(final):  # already saved at this step (e.g. preempted right after resuming)
            self._point(final.name)
            return final
        tmp = self.root / f".tmp-{int(step)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        files = {}
        for f in sorted(tmp.iterdir()):
            _fsync(f)
            files[f.name] = f.stat().st_size
        manifest = {"format": FORMAT_VERSION, "step": int(step), "files": files, "written_at": time.time()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if final.exists():  # an incomplete leftover with the same name
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(self.root)
        self._point(final.name)
        self._prune(final)
        return final

    def _point(self, name: str) -> None:
        tmp = self.root / f".{LATEST}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)
        _fsync(self.root)

    def _prune(self, current: Path) -> None:
        old = [d for d in sorted(self.root.glob("step_*"), key=lambda d: d.name) if d != current]
        for d in old[: max(len(old) - (self.keep - 1), 0)]:
            shutil.rmtree(d, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (best effort: not every file system supports it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_state(folder: Path) -> dict:
    with open(Path(folder) / STATE_FILE, "rb") as f:
        return pickle.load(f)


# -- env state ---------------------------------------------------------------------------------------
def _unwrap_vec(venv):
    """(VecNormalize or None, innermost VecEnv)."""
    from stable_baselines3.common.vec_env import VecNormalize

    norm, v = None, venv
    while hasattr(v, "venv"):
        if norm is None and isinstance(v, VecNormalize):
            norm = v
        v = v.venv
    return norm, v


_NORM_KEYS = ("obs_rms", "ret_rms", "returns", "old_obs", "old_reward")


def snapshot_vec_env(venv) -> dict:
    """Everything needed to continue ``venv`` (a VecEnv, possibly VecNormalize-wrapped) exactly.

    Each Gymnasium env of a ``DummyVecEnv`` is pickled with its wrappers (time-limit counters,
    Monitor's episode sums, its ``np_random`` when the env pickles by value). Envs that pickle by
    constructor arguments (``EzPickle``, e.g. MuJoCo) come back fresh from the pickle, so their
    ``np_random`` state and, for MuJoCo, the full integration state (``mj_getState``) are saved
    too. ``exact`` is False when an env could not be captured (its episode then restarts).
    """
    import cloudpickle

    norm, inner = _unwrap_vec(venv)
    out: dict[str, Any] = {"exact": True, "norm": None, "envs": None}
    if norm is not None:
        out["norm"] = {k: copy.deepcopy(getattr(norm, k, None)) for k in _NORM_KEYS}
    if hasattr(inner, "envs"):
        out["seeds"] = list(getattr(inner, "_seeds", []))
        out["options"] = copy.deepcopy(list(getattr(inner, "_options", [])))
        envs = []
        for e in inner.envs:
            item: dict[str, Any] = {"pickle": None, "np_random": None, "mujoco": None}
            try:
                item["pickle"] = cloudpickle.dumps(e)
            except Exception as exc:  # noqa: BLE001 - an env that cannot be pickled restarts its episode
                item["error"] = f"{type(exc).__name__}: {exc}"
                out["exact"] = False
            u = e.unwrapped
            rng = getattr(u, "_np_random", None)
            if rng is not None:
                item["np_random"] = pickle.dumps(rng)
            item["mujoco"] = _mujoco_state(u)
            envs.append(item)
        out["envs"] = envs
    else:  # e.g. SubprocVecEnv: the envs live in other processes
        out["exact"] = False
    return out


def _mujoco_state(u) -> np.ndarray | None:
    model, data = getattr(u, "model", None), getattr(u, "data", None)
    if model is None or data is None or not type(data).__module__.startswith("mujoco"):
        return None
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    st = np.empty(mujoco.mj_stateSize(model, spec))
    mujoco.mj_getState(model, data, st, spec)
    return st


def restore_vec_env(venv, snap: dict) -> bool:
    """Put a snapshot back into a freshly built ``venv`` of the same config; True if exact."""
    norm, inner = _unwrap_vec(venv)
    if norm is not None and snap.get("norm") is not None:
        for k, v in snap["norm"].items():
            if v is not None:
                setattr(norm, k, copy.deepcopy(v))
    envs = snap.get("envs")
    if envs is None or not hasattr(inner, "envs") or len(envs) != len(inner.envs):
        return False
    exact = bool(snap.get("exact"))
    for i, item in enumerate(envs):
        if item.get("pickle") is None:
            continue
        env = pickle.loads(item["pickle"])
        try:
            inner.envs[i].close()
        except Exception:  # noqa: BLE001
            pass
        inner.envs[i] = env
        u = env.unwrapped
        if item.get("np_random") is not None:
            u._np_random = pickle.loads(item["np_random"])
        if item.get("mujoco") is not None and getattr(u, "data", None) is not None:
            import mujoco

            mujoco.mj_setState(u.model, u.data, item["mujoco"], mujoco.mjtState.mjSTATE_INTEGRATION)
            mujoco.mj_forward(u.model, u.data)
        w = env
        while w is not None:  # counters that compare against MuJoCo's (now fresh) warning counts
            if hasattr(w, "_seen") and hasattr(w, "_counts"):
                w._seen = w._counts()
            w = getattr(w, "env", None)
    restore_pending_seeds(venv, snap)
    return exact


def restore_pending_seeds(venv, snap: dict) -> None:
    """Reset seeds/options not yet consumed (SB3's ``load()`` and ``seed()`` set new ones)."""
    _, inner = _unwrap_vec(venv)
    if "seeds" in snap and hasattr(inner, "_seeds"):
        inner._seeds = list(snap["seeds"])
        inner._options = copy.deepcopy(list(snap["options"]))


# -- RNG ---------------------------------------------------------------------------------------------
def rng_state(model) -> dict:
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "action_space": copy.deepcopy(model.action_space),  # with its np_random
    }


def restore_rng(model, s: dict) -> None:
    import torch

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    model.action_space = copy.deepcopy(s["action_space"])


# -- logger ------------------------------------------------------------------------------------------
def make_logger(folder: Path, purge_step: int | None = None, csv_rows: int | None = None,
                stdout: bool = False):
    """SB3 logger writing TensorBoard events and ``progress.csv`` into ``folder``.

    On resume, ``purge_step`` (the checkpoint's step + 1) makes TensorBoard drop the events the
    killed session wrote after the checkpoint, and ``progress.csv`` is cut back to the
    ``csv_rows`` rows written before it.
    """
    from stable_baselines3.common.logger import HumanOutputFormat, Logger

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if purge_step is not None:
        truncate_tensorboard(folder, purge_step - 1)
    formats = [ResumableTensorBoard(str(folder), purge_step), ResumableCSV(str(folder / "progress.csv"), csv_rows)]
    if stdout:
        import sys

        formats.append(HumanOutputFormat(sys.stdout))
    return Logger(folder=str(folder), output_formats=formats)


def truncate_tensorboard(folder: Path, last_step: int) -> None:
    """Rewrite the event files in ``folder`` without the events after ``last_step``.

    ``purge_step`` alone is honoured by TensorBoard (and by an ``EventAccumulator`` over the whole
    folder), but readers that load one file at a time (tbparse) would still see the events the
    killed session wrote after its checkpoint. Each file is replaced atomically; a record torn
    by the kill is dropped.
    """
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    for f in sorted(Path(folder).glob("events.out.tfevents.*")):
        tmp = f.with_name(f".{f.name}.tmp")
        with open(tmp, "wb") as out:
            w = RecordWriter(out)
            for raw in RawEventFileLoader(str(f)).Load():
                if event_pb2.Event.FromString(raw).step <= last_step:
                    w.write(raw)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, f)


def _tb_classes():
    from stable_baselines3.common.logger import CSVOutputFormat, TensorBoardOutputFormat

    return CSVOutputFormat, TensorBoardOutputFormat


class ResumableTensorBoard(_tb_classes()[1]):  # type: ignore[misc]
    """SB3's TensorBoard writer with a ``purge_step``."""

    def __init__(self, folder: str, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder, purge_step=purge_step)
        self._is_closed = False


class ResumableCSV(_tb_classes()[0]):  # type: ignore[misc]
    """SB3's CSV writer that counts its rows and can continue a file cut back to ``rows`` rows."""

    def __init__(self, filename: str, rows: int | None = None) -> None:
        self.separator = ","
        self.quotechar = '"'
        self.rows = 0
        self.keys: list[str] = []
        path = Path(filename)
        if rows is None or not path.is_file():
            self.file = open(filename, "w+")
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = lines[: 1 + rows] if lines else []
        with open(filename, "w") as f:
            f.writelines(kept)
        self.file = open(filename, "r+")
        self.file.seek(0, io.SEEK_END)
        if kept:
            self.keys = kept[0].rstrip("\n").split(self.separator)
        self.rows = max(len(kept) - 1, 0)

    def write(self, key_values, key_excluded, step: int = 0) -> None:
        super().write(key_values, key_excluded, step)
        self.rows += 1


def logger_state(logger) -> dict:
    rows = next((f.rows for f in logger.output_formats if isinstance(f, ResumableCSV)), None)
    return {"name_to_value": dict(logger.name_to_value), "name_to_count": dict(logger.name_to_count),
            "name_to_excluded": dict(logger.name_to_excluded), "csv_rows": rows}


def restore_logger(logger, s: dict) -> None:
    logger.name_to_value.update(s["name_to_value"])
    logger.name_to_count.update(s["name_to_count"])
    logger.name_to_excluded.update(s["name_to_excluded"])


# -- evaluation callback -------------------------------------------------------------------------------
_EVAL_KEYS = ("n_calls", "evaluations_results", "evaluations_timesteps", "evaluations_length",
              "evaluations_successes", "best_mean_reward", "last_mean_reward")


def eval_state(cb) -> dict | None:
    if cb is None:
        return None
    return {k: copy.deepcopy(getattr(cb, k)) for k in _EVAL_KEYS if hasattr(cb, k)}


def restore_eval(cb, s: dict | None, run_dir: Path) -> None:
    """Put the evaluation history back and rewrite ``evaluations.npz`` to match it."""
    if cb is None or not s:
        return
    for k, v in s.items():
        setattr(cb, k, copy.deepcopy(v))
    path = Path(run_dir) / "evaluations.npz"
    if cb.evaluations_timesteps:
        extra = {"successes": cb.evaluations_successes} if cb.evaluations_successes else {}
        np.savez(path, timesteps=cb.evaluations_timesteps, results=cb.evaluations_results,
                 ep_lengths=cb.evaluations_length, **extra)
    else:
        path.unlink(missing_ok=True)


# -- preemption --------------------------------------------------------------------------------------
class Preempted(Exception):
    """Raised out of ``learn()`` after the checkpoint that a preemption signal asked for."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum = signum
        self.step = step


_requested: int | None = None  # the first preemption signal received by this process
_previous: dict[int, Any] = {}


def preemption_requested() -> int | None:
    return _requested


def reset_preemption() -> None:
    """Forget a received signal (tests; a process that was preempted stops its runs otherwise)."""
    global _requested
    _requested = None


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    global _requested
    if _requested is None:
        _requested = signum


def preemption_signals() -> list[int]:
    """SIGTERM and SIGUSR1; also submitit's preemption signal (``SUBMITIT_PREEMPT_SIGNAL``,
    default USR2) when submitit has a handler installed for it."""
    sigs = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None]
    sub = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if sub is not None and sub not in sigs:
        try:
            if callable(signal.getsignal(sub)):
                sigs.append(sub)
        except (ValueError, OSError):
            pass
    return sigs


class PreemptionGuard:
    """While active, preemption signals only set a flag; training checkpoints at the next safe
    boundary and stops (:class:`Preempted`). Outside the main thread it does nothing."""

    def __enter__(self) -> "PreemptionGuard":
        self._installed: dict[int, Any] = {}
        for s in preemption_signals():
            try:
                prev = signal.signal(s, _handler)
            except (ValueError, OSError):  # not the main thread
                continue
            self._installed[s] = prev
            if prev is not _handler:
                _previous[s] = prev
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._installed.items():
            try:
                signal.signal(s, prev)
            except (ValueError, OSError):
                pass


def chain_previous_handler(signum: int) -> None:
    """After the checkpoint, give the signal to whoever handled it before us when that was Python
    code (submitit: requeue the job and exit; for SIGTERM it only logs)."""
    prev = _previous.get(signum)
    if callable(prev) and prev not in (signal.default_int_handler, _handler):
        prev(signum, None)


# -- the callback ---------------------------------------------------------------------------------------
def _test_hook() -> tuple[str, int] | None:
    """``HESSCALE_TEST_PAUSE=step:N`` or ``checkpoint:K``: the tests' way to freeze a run at a known
    point (after env step N / while writing the K-th checkpoint) and kill it from outside."""
    v = os.environ.get("HESSCALE_TEST_PAUSE", "")
    if ":" not in v:
        return None
    what, n = v.split(":", 1)
    return what, int(n)


def _pause(run_dir: Path) -> None:
    (Path(run_dir) / ".paused").write_text(str(os.getpid()))
    t0 = time.monotonic()
    while preemption_requested() is None and time.monotonic() - t0 < 600:
        time.sleep(0.02)


def _callback_base():
    from stable_baselines3.common.callbacks import BaseCallback

    return BaseCallback


class ResumeCallback(_callback_base()):  # type: ignore[misc]
    """Checkpoints at safe boundaries every ``freq`` env steps and on preemption; restores the
    saved RNG / logger / env seeds at the first boundary of a resumed session."""

    def __init__(self, store: CheckpointStore, run_dir: Path, freq: int, extra: Callable[[], dict],
                 eval_callback=None, eval_env=None, replay_buffer: bool = True,
                 resume_state: dict | None = None) -> None:
        super().__init__(verbose=0)
        self.store = store
        self.run_dir = Path(run_dir)
        self.freq = int(freq)
        self.extra = extra
        self.eval_callback = eval_callback
        self.eval_env = eval_env
        self.save_buffer = replay_buffer
        self.resume_state = resume_state
        self.last_saved: int | None = None
        self.saves = 0
        self._hook = _test_hook()
        self._paused = False

    def _on_rollout_start(self) -> None:
        step = int(self.model.num_timesteps)
        if self.resume_state is not None:
            s, self.resume_state = self.resume_state, None
            restore_rng(self.model, s["rng"])
            restore_logger(self.model.logger, s["logger"])
            restore_pending_seeds(self.model.get_env(), s["train_env"])
            if self.eval_env is not None and s.get("eval_env"):
                restore_pending_seeds(self.eval_env, s["eval_env"])
            self.last_saved = step
        elif self.last_saved is None:
            self.last_saved = step
        due = self.freq > 0 and step // self.freq > self.last_saved // self.freq
        sig = preemption_requested()
        if due or sig is not None:
            self.save()
        if sig is not None:
            raise Preempted(sig, step)

    def _on_step(self) -> bool:
        if self._hook and self._hook[0] == "step" and not self._paused and self.num_timesteps >= self._hook[1]:
            self._paused = True
            _pause(self.run_dir)
        return True

    def save(self) -> Path:
        model = self.model
        step = int(model.num_timesteps)

        def write(folder: Path) -> None:
            model.save(str(folder / MODEL_FILE))
            if self._hook == ("checkpoint", self.saves):
                _pause(self.run_dir)
            if self.save_buffer and getattr(model, "replay_buffer", None) is not None:
                model.save_replay_buffer(str(folder / BUFFER_FILE))
            state = {
                "format": FORMAT_VERSION,
                "step": step,
                "rng": rng_state(model),
                "logger": logger_state(model.logger),
                "train_env": snapshot_vec_env(model.get_env()),
                "eval_env": snapshot_vec_env(self.eval_env) if self.eval_env is not None else None,
                "eval": eval_state(self.eval_callback),
                "last_obs": copy.deepcopy((model._last_obs, getattr(model, "_last_original_obs", None),
                                           model._last_episode_starts)),
                **self.extra(),
            }
            with open(folder / STATE_FILE, "wb") as f:
                pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)

        self.saves += 1
        out = self.store.save(step, write)
        self.last_saved = step
        return out
