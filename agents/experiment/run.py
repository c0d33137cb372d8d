"""The Hydra task function: validate, then one session of a run (fresh or resumed), then report.

A run directory holds ``config.yaml`` (resolved), ``.hydra/`` (Hydra's own record), ``tb/``
(TensorBoard events and ``progress.csv``), ``evaluations.npz``, ``model.zip``,
``vecnormalize.pkl``, ``final_eval.pkl`` (what the final evaluation read, for
``scripts/evaluate.py``) and ``result.json``, and while the run is unfinished ``checkpoints/``
(see :mod:`agents.experiment.resume`). The task function returns normally when a run fails
or diverges (the status is in ``result.json``), so one bad job never stops a sweep. A run that
was killed, preempted or failed resumes from its latest checkpoint when the same command is run
again (:mod:`agents.experiment.lifecycle`).

Torch-free at import: a configuration error is answered before torch or SB3 load.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from agents.experiment.console import say
from agents.experiment.errors import ConfigError
from agents.experiment.lifecycle import Session, identity, open_run
from agents.experiment.results import FINAL_EVAL_FILE, RESULT_FILE, RunStatus, eval_summary, now_iso, read_result, write_json
from agents.experiment.validation import validate


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
    lock, skipped = open_run(c, run_dir)
    if skipped is not None:
        return skipped
    import torch

    from agents.experiment.preemption import PreemptionGuard

    threads = torch.get_num_threads()
    try:
        with PreemptionGuard():  # SIGTERM/SIGUSR1 from here on: checkpoint at the next boundary, stop
            torch.set_num_threads(c["threads"])
            session = Session.begin(c, run_dir, labels(c, override_dirname))
            return _train_session(session, progress_bar)
    finally:
        lock.close()
        torch.set_num_threads(threads)


def _train_session(session: Session, progress_bar: bool | None) -> dict:
    """Build or restore envs and agent, learn the remaining steps, evaluate, save, end the session."""
    from agents.experiment.envs import MujocoInstabilityCallback
    from agents.experiment.preemption import Preempted
    from agents.experiment.progress import OverallProgressBar
    from agents.experiment.resume import ResumeCallback

    c, run_dir, result = session.c, session.run_dir, session.result
    env = eval_env = model = eval_cb = None
    t0 = time.perf_counter() - session.wall_time_before
    try:
        env, eval_env, model, eval_cb = _open_agent(session)
        session.write_result()
        resume_cb = ResumeCallback(
            session.store, c["checkpoint"]["freq"], eval_callback=eval_cb, eval_env=eval_env,
            resume_state=session.state,
            extra=lambda: {"identity": identity(c), "wall_time_s": time.perf_counter() - t0})
        show = c["progress_bar"] if progress_bar is None else progress_bar
        bar = OverallProgressBar(c["total_timesteps"]) if show else None
        try:
            model.learn(max(c["total_timesteps"] - session.start_step, 0),
                        callback=[resume_cb, MujocoInstabilityCallback(), eval_cb, *([bar] if bar else [])],
                        reset_num_timesteps=not session.resumed)
        finally:
            if bar is not None:
                bar.close()
        div = getattr(model, "divergence", None)
        result["status"] = RunStatus.DIVERGED if div else RunStatus.FINISHED
        result["divergence"] = div
    except ConfigError:
        raise
    except Preempted as p:
        result["preempted"] = {"step": p.step, "signal": p.__str__().split()[0], "signum": p.signum,
                               "checkpoint": str(session.store.latest())}
    except Exception as e:  # noqa: BLE001 - a failed run must not stop the sweep
        div = getattr(model, "divergence", None) if model is not None else None
        result["status"] = RunStatus.DIVERGED if div else RunStatus.FAILED
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
        _save_outputs(session, model, env, eval_cb)
    for e in (env, eval_env):
        try:
            if e is not None:
                e.close()
        except Exception:  # noqa: BLE001
            pass
    return session.end()


def _save_outputs(session: Session, model, env, eval_cb) -> None:
    """``model.zip``, ``vecnormalize.pkl`` and ``final_eval.pkl``; a failure is recorded in the
    result, not raised."""
    from agents.experiment.eval_history import save_eval_inputs

    try:
        model.save(str(session.run_dir / "model.zip"))
        if env is not None and hasattr(env, "save") and session.c["env"]["normalize"]:
            env.save(str(session.run_dir / "vecnormalize.pkl"))
        if eval_cb is not None and eval_cb.last_eval is not None:
            save_eval_inputs(session.run_dir / FINAL_EVAL_FILE, eval_cb.last_eval)
    except Exception as e:  # noqa: BLE001
        session.result.setdefault("error", f"saving failed: {type(e).__name__}: {e}")


def _open_agent(session: Session):
    """``(env, eval_env, model, eval_callback)``: built fresh, or restored from the checkpoint."""
    from agents.experiment.build import build_model, load_model
    from agents.experiment.env_state import restore_vec_env
    from agents.experiment.envs import make_eval_env, make_train_env_checked
    from agents.experiment.eval_history import eval_callback, restore_eval
    from agents.experiment.logs import make_logger
    from agents.experiment.model_state import restore_last_obs

    c, run_dir, state = session.c, session.run_dir, session.state
    stdout = bool(c.get("verbose", 0))
    env = make_train_env_checked(c)
    eval_env = make_eval_env(c)
    if state is None:
        model = build_model(c, env)
        logger = make_logger(run_dir / "tb", stdout=stdout)
    else:
        exact = restore_vec_env(env, state["train_env"])
        if state.get("eval_env"):
            restore_vec_env(eval_env, state["eval_env"])
        model = load_model(c, session.checkpoint, env)
        restore_last_obs(model, state["last_obs"], exact)
        logger = make_logger(run_dir / "tb", purge_step=session.start_step + 1,
                             csv_rows=state["logger"]["csv_rows"], stdout=stdout)
        say(f"[resume] {run_dir}: resuming from the checkpoint at step {state['step']} "
            f"of {c['total_timesteps']}" + ("" if exact else " (env state not captured: its episode restarts)"))
    model.set_logger(logger)
    eval_cb = eval_callback(c, eval_env, run_dir)
    if state is not None:
        restore_eval(eval_cb, state.get("eval"), run_dir)
    return env, eval_env, model, eval_cb


def main_task(cfg: Any) -> dict:
    """Entry point for ``scripts/train.py`` (inside ``@hydra.main``).

    Single run: a config error prints one message and exits with code 2, a failed run exits 1,
    a diverged run exits 0, a preempted run (SIGTERM / SIGUSR1 / submitit's signal / Ctrl-C)
    checkpoints and exits with 128 + the signal number (Ctrl-C: 130). Multirun: always returns (the status is in
    result.json; a preempted run stays ``running`` and resumes when the sweep is run again).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    name = f"{hc.runtime.choices.get('agent')}/{hc.runtime.choices.get('opt')}/" \
           f"{hc.runtime.choices.get('env')} seed={cfg.get('seed')}"
    from agents.experiment.preemption import preemption_requested

    if preemption_requested() is not None:  # Ctrl-C / a preemption before this job began: not started
        say(f"[not started] {name}: interrupted before it began -> {run_dir}")
        if not multirun:
            raise SystemExit(128 + int(preemption_requested()))
        return {"status": RunStatus.RUNNING, "run_dir": str(run_dir), "skipped": True}
    say(f"[run] {name} -> {run_dir}")
    try:
        result = train(cfg, run_dir, override_dirname=hc.job.override_dirname,
                       progress_bar=False if multirun else None)
    except ConfigError as e:
        msg = f"Invalid configuration ({name}):\n  " + str(e).replace("\n", "\n  ")
        say(msg, sys.stderr)
        result = {"status": RunStatus.FAILED, "error": f"ConfigError: {e}", "run_dir": str(run_dir)}
        if (run_dir / RESULT_FILE).exists() or multirun:
            prev = read_result(run_dir) or {}
            write_json(run_dir / RESULT_FILE, {**prev, **result, "finished_at": now_iso()})
        if not multirun:
            raise SystemExit(2) from None
        return result
    if result.get("preempted"):
        p = result["preempted"]
        say(f"[preempted] {name}: {p['signal']} -> checkpoint at step {p['step']}; run the same command "
            f"again to resume -> {run_dir}")
        from agents.experiment.preemption import chain_previous_handler

        chain_previous_handler(p["signum"])  # submitit: requeue the job (and exit)
        if not multirun:
            raise SystemExit(128 + int(p["signum"]))
        return result
    if result.get("skipped"):
        why = "locked by another process" if result["status"] == RunStatus.LOCKED else \
            f"already {result['status']} (rerun=true to train again)"
        say(f"[skip] {name}: {why} -> {run_dir}")
        return result
    _print_summary(name, result)
    if not multirun and result["status"] == RunStatus.FAILED:
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
    say(line, sys.stderr if r["status"] == RunStatus.FAILED else sys.stdout)
