"""The Hydra task function: validate, build envs and agent, train, evaluate, write the run directory.

A run directory holds ``config.yaml`` (resolved), ``.hydra/`` (Hydra's own record), ``tb/``
(TensorBoard events and ``progress.csv``), ``evaluations.npz``, ``model.zip``,
``vecnormalize.pkl`` and ``result.json``, and while the run is unfinished ``checkpoints/``
(see :mod:`agents.experiment.checkpoint`). The task function returns normally when a run fails
or diverges (the status is in ``result.json``), so one bad job never stops a sweep. A run that
was killed, preempted or failed resumes from its latest checkpoint when the same command is run
again.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from agents.experiment.build import build_model, load_model
from agents.experiment.errors import ConfigError
from agents.experiment.results import (RESULT_FILE, eval_summary, now_iso, provenance,
                                       read_result, write_json)
from agents.experiment.validation import check_action_space, validate


def _eval_callback(c: Mapping[str, Any], eval_env, run_dir: Path):
    from stable_baselines3.common.callbacks import EvalCallback

    class FinalEvalCallback(EvalCallback):
        """SB3's EvalCallback plus one evaluation at the end of training (unless just done)."""

        def _on_training_end(self) -> None:
            done = self.evaluations_timesteps and self.evaluations_timesteps[-1] == self.num_timesteps
            if done or getattr(self.model, "divergence", None):
                return
            freq, self.eval_freq = self.eval_freq, 1
            try:
                self._on_step()
            finally:
                self.eval_freq = freq

    n_envs = c["env"]["n_envs"]
    freq = c["eval"]["freq"]
    return FinalEvalCallback(eval_env, n_eval_episodes=c["eval"]["n_episodes"],
                             eval_freq=max(freq // n_envs, 1) if freq > 0 else 0,
                             log_path=str(run_dir), best_model_save_path=None,
                             deterministic=c["eval"]["deterministic"], render=False, warn=False,
                             verbose=0)


def _instability_callback():
    from stable_baselines3.common.callbacks import BaseCallback

    class MujocoInstabilityCallback(BaseCallback):
        """Ends training as ``diverged`` when MuJoCo reports the simulation unstable."""

        def _on_step(self) -> bool:
            for i, info in enumerate(self.locals.get("infos") or ()):
                what = info.get("mujoco_instability")
                if what:
                    reason = f"MuJoCo instability warning ({what}) in training env {i}"
                    mark = getattr(self.model, "_mark_diverged", None)
                    if mark is not None:
                        mark(reason)
                    else:
                        self.model.divergence = {"step": int(self.num_timesteps), "reason": reason}
                    return False
            return True

    return MujocoInstabilityCallback()


def labels(c: Mapping[str, Any], override_dirname: str = "") -> dict:
    """What identifies a run in reports and TensorBoard."""
    return {"env": c["env"]["name"], "env_id": c["env"]["id"], "agent": c["agent"]["name"],
            "opt": c["opt"]["name"], "lr": float(c["opt"]["lr"]), "seed": c["seed"],
            "variant": override_dirname}


def train(cfg: Any, run_dir: Path, override_dirname: str = "", progress_bar: bool | None = None) -> dict:
    """Train one run into ``run_dir`` and return its result dict (also written to result.json).

    Raises ConfigError (before anything is trained) for bad configurations. Any other error
    during training ends the run with status ``failed``; a divergence reported by the agent ends
    it with ``diverged``; both return normally. A run whose ``result.json`` already says
    ``finished`` or ``diverged`` is skipped (``rerun=true`` trains it again); a run directory
    locked by another process is left alone (status ``locked``, nothing written). Any other run
    with a complete checkpoint of the same configuration resumes from it (``checkpoint.resume``);
    a preemption signal ends it with ``preempted`` in the result (status stays ``running``).
    """
    c = validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prev = read_result(run_dir)
    if prev and prev.get("status") in DONE and not c.get("rerun", False):
        return {**prev, "skipped": True}
    lock = _lock(run_dir)
    if lock is None:
        return {"status": "locked", "run_dir": str(run_dir), "skipped": True,
                "error": "another process holds this run directory's lock"}
    import torch

    from agents.experiment.checkpoint import PreemptionGuard

    threads = torch.get_num_threads()
    try:
        with PreemptionGuard():  # SIGTERM/SIGUSR1 from here on: checkpoint at the next boundary, stop
            return _train_locked(c, run_dir, override_dirname, progress_bar)
    finally:
        lock.close()
        torch.set_num_threads(threads)


DONE = ("finished", "diverged")


def _lock(run_dir: Path):
    """An exclusive, non-blocking lock on ``run_dir/.lock`` (None if another process holds it)."""
    f = open(run_dir / ".lock", "a+")
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not POSIX: no locking
        pass
    except OSError:
        f.close()
        return None
    return f


_OUTPUTS = ("evaluations.npz", "model.zip", "vecnormalize.pkl", "error.txt", RESULT_FILE)


def _clear_outputs(run_dir: Path) -> None:
    import shutil

    shutil.rmtree(run_dir / "tb", ignore_errors=True)
    for f in _OUTPUTS:
        (run_dir / f).unlink(missing_ok=True)


def _train_locked(c: dict, run_dir: Path, override_dirname: str, progress_bar: bool | None) -> dict:
    import torch
    from omegaconf import OmegaConf

    from agents.experiment import checkpoint as ck

    torch.set_num_threads(c["threads"])
    ckc = c["checkpoint"]
    store = ck.CheckpointStore(run_dir, keep=ckc["keep"])
    folder, state = _resume_point(c, run_dir, store)
    if state is None:
        _clear_outputs(run_dir)  # a fresh start (nothing to resume, rerun=true, checkpoint.resume=false)
        store.clear()
    else:
        store.cleanup_tmp()
        (run_dir / "error.txt").unlink(missing_ok=True)  # from a failed session being resumed
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(c)))

    prev = (read_result(run_dir) or {}) if state is not None else {}
    result: dict[str, Any] = {
        "status": "running", "run_dir": str(run_dir), **labels(c, override_dirname),
        "total_timesteps": c["total_timesteps"], "started_at": prev.get("started_at") or now_iso(),
        "provenance": provenance(c["threads"]),
    }
    if state is not None:
        result["resumed_from"] = [*(prev.get("resumed_from") or []), int(state["step"])]
    env = eval_env = model = None
    t0 = time.perf_counter() - (float(state.get("wall_time_s", 0.0)) if state else 0.0)
    try:
        from agents.experiment.envs import make_eval_env

        env = make_train_env_checked(c)
        eval_env = make_eval_env(c)
        if state is None:
            model = build_model(c, env)
            logger = ck.make_logger(run_dir / "tb", stdout=bool(c.get("verbose", 0)))
        else:
            exact = ck.restore_vec_env(env, state["train_env"])
            if state.get("eval_env"):
                ck.restore_vec_env(eval_env, state["eval_env"])
            model = load_model(c, folder, env)
            model._last_obs, last_original, model._last_episode_starts = state["last_obs"]
            if last_original is not None:
                model._last_original_obs = last_original
            if not exact:
                model._last_obs = None  # SB3 resets the env: the episode in progress is cut
            logger = ck.make_logger(run_dir / "tb", purge_step=int(state["step"]) + 1,
                                    csv_rows=state["logger"]["csv_rows"], stdout=bool(c.get("verbose", 0)))
            print(f"[resume] {run_dir}: resuming from the checkpoint at step {state['step']} "
                  f"of {c['total_timesteps']}" + ("" if exact else " (env state not captured: its episode "
                                                  "restarts)"), flush=True)
        write_json(run_dir / RESULT_FILE, result)
        model.set_logger(logger)
        eval_cb = _eval_callback(c, eval_env, run_dir)
        if state is not None:
            ck.restore_eval(eval_cb, state.get("eval"), run_dir)
        resume_cb = ck.ResumeCallback(
            store, run_dir, ckc["freq"], eval_callback=eval_cb, eval_env=eval_env,
            resume_state=state,
            extra=lambda: {"identity": ck.identity(c), "wall_time_s": time.perf_counter() - t0})
        show = c["progress_bar"] if progress_bar is None else progress_bar
        done = int(model.num_timesteps) if state is not None else 0
        model.learn(max(c["total_timesteps"] - done, 0),
                    callback=[resume_cb, _instability_callback(), eval_cb],
                    progress_bar=bool(show), reset_num_timesteps=state is None)
        div = getattr(model, "divergence", None)
        result["status"] = "diverged" if div else "finished"
        result["divergence"] = div
    except ConfigError:
        raise
    except ck.Preempted as p:
        result["preempted"] = {"step": p.step, "signal": p.__str__().split()[0], "signum": p.signum,
                               "checkpoint": str(store.latest())}
    except Exception as e:  # noqa: BLE001 - a failed run must not stop the sweep
        div = getattr(model, "divergence", None) if model is not None else None
        result["status"] = "diverged" if div else "failed"
        result["divergence"] = div
        result["error"] = f"{type(e).__name__}: {e}"
        (run_dir / "error.txt").write_text(traceback.format_exc())
    wall = time.perf_counter() - t0
    steps = int(getattr(model, "num_timesteps", 0) or 0) if model is not None else 0
    if "preempted" in result:
        steps = int(result["preempted"]["step"])
    result.update({"timesteps": steps, "wall_time_s": round(wall, 3),
                   "env_steps_per_s": round(steps / wall, 2) if wall > 0 else None,
                   "finished_at": now_iso(), **eval_summary(run_dir)})
    if model is not None and c.get("save_model", True) and "preempted" not in result:
        try:
            model.save(str(run_dir / "model.zip"))
            if env is not None and hasattr(env, "save") and c["env"]["normalize"]:
                env.save(str(run_dir / "vecnormalize.pkl"))
        except Exception as e:  # noqa: BLE001
            result.setdefault("error", f"saving failed: {type(e).__name__}: {e}")
    for e in (env, eval_env):
        try:
            if e is not None:
                e.close()
        except Exception:  # noqa: BLE001
            pass
    write_json(run_dir / RESULT_FILE, result)
    if result["status"] in DONE and not ckc["keep_when_done"]:
        store.clear()
    return result


def _resume_point(c: dict, run_dir: Path, store) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its state, or (None, None) for a fresh start."""
    from agents.experiment import checkpoint as ck

    prev = read_result(run_dir)
    if not c["checkpoint"]["resume"] or (prev and prev.get("status") in DONE):
        return None, None  # rerun=true of a finished run, or resuming switched off
    folder = store.latest()
    if folder is None:
        return None, None
    try:
        state = ck.load_state(folder)
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint: start again
        print(f"[resume] {run_dir}: checkpoint {folder.name} unreadable ({type(e).__name__}: {e}); "
              "starting from scratch", file=sys.stderr, flush=True)
        return None, None
    if state.get("identity") != ck.identity(c):
        print(f"[resume] {run_dir}: the checkpoint was written with a different configuration; "
              "starting from scratch", file=sys.stderr, flush=True)
        return None, None
    return folder, state


def make_train_env_checked(c: Mapping[str, Any]):
    """The training env, after checking the env id and that the agent can act in it."""
    from agents.experiment.envs import make_train_env

    env = make_train_env(c)
    try:
        check_action_space(c["agent"]["cls"], c["env"]["id"], env.action_space)
    except ConfigError:
        env.close()
        raise
    return env


def main_task(cfg: Any) -> dict:
    """Entry point for ``scripts/train.py`` (inside ``@hydra.main``).

    Single run: a config error prints one message and exits with code 2, a failed run exits 1,
    a diverged run exits 0, a preempted run (SIGTERM / SIGUSR1 / submitit's signal) checkpoints
    and exits with 128 + the signal number. Multirun: always returns (the status is in
    result.json; a preempted run stays ``running`` and resumes when the sweep is run again).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    name = f"{hc.runtime.choices.get('agent')}/{hc.runtime.choices.get('opt')}/" \
           f"{hc.runtime.choices.get('env')} seed={cfg.get('seed')}"
    try:
        result = train(cfg, run_dir, override_dirname=hc.job.override_dirname,
                       progress_bar=False if multirun else None)
    except ConfigError as e:
        msg = f"Invalid configuration ({name}):\n  " + str(e).replace("\n", "\n  ")
        print(msg, file=sys.stderr)
        result = {"status": "failed", "error": f"ConfigError: {e}", "run_dir": str(run_dir)}
        if (run_dir / RESULT_FILE).exists() or multirun:
            prev = read_result(run_dir) or {}
            write_json(run_dir / RESULT_FILE, {**prev, **result, "finished_at": now_iso()})
        if not multirun:
            raise SystemExit(2) from None
        return result
    if result.get("preempted"):
        p = result["preempted"]
        print(f"[preempted] {name}: {p['signal']} -> checkpoint at step {p['step']}; the same command "
              f"resumes it -> {run_dir}", flush=True)
        from agents.experiment.checkpoint import chain_previous_handler

        chain_previous_handler(p["signum"])  # submitit: requeue the job (and exit)
        if not multirun:
            raise SystemExit(128 + int(p["signum"]))
        return result
    if result.get("skipped"):
        why = "locked by another process" if result["status"] == "locked" else \
            f"already {result['status']} (rerun=true to train again)"
        print(f"[skip] {name}: {why} -> {run_dir}", flush=True)
        return result
    _print_summary(name, result)
    if not multirun and result["status"] == "failed":
        raise SystemExit(1)
    return result


def _print_summary(name: str, r: dict) -> None:
    fin = r.get("final_return")
    ret = f"final eval return {fin:.2f}" if isinstance(fin, (int, float)) else "no evaluation"
    line = (f"[{r['status']}] {name}: {ret}, {r.get('timesteps', 0)} steps in "
            f"{r.get('wall_time_s', 0):.1f}s -> {r['run_dir']}")
    if r.get("divergence"):
        line += f"  (diverged at step {r['divergence'].get('step')}: {r['divergence'].get('reason')})"
    if r.get("error"):
        line += f"\n  error: {r['error']}"
    print(line, file=sys.stderr if r["status"] == "failed" else sys.stdout, flush=True)
