"""The lifecycle of one run directory: skipped, locked, fresh or resumed, then ended.

1. :func:`open_run`: a run already finished or diverged is skipped (unless ``rerun=true``) when it
   is current — its ``config.yaml`` equals the configuration asked for, volatile keys aside, and its
   ``result.json`` has this results format (:func:`stale_reason`); a stale one is trained again. A
   run directory locked by another process is left alone (:attr:`RunStatus.LOCKED`);
2. :meth:`Session.begin`: the latest complete checkpoint of the same configuration is resumed
   (``checkpoint.resume``), else the directory's outputs are cleared for a fresh start; either way
   ``config.yaml`` is written and the result starts as ``running``;
3. :meth:`Session.end`: ``result.json`` gets the final status; the checkpoints are cleared once the
   run is done (unless ``checkpoint.keep_when_done``).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from agents.experiment.console import say
from agents.experiment.results import (CONFIG_FILE, DONE, FINAL_EVAL_FILE, RESULT_FILE, RESULTS_FORMAT, RunStatus,
                                       now_iso, provenance, read_result, write_json)
from agents.experiment.store import CheckpointStore, load_state

# keys that may differ between the session that wrote a checkpoint and the one resuming it
VOLATILE_KEYS = ("progress_bar", "verbose", "rerun", "threads", "checkpoint", "save_model", "device",
                 "out_dir", "sweep_name")
OUTPUTS = ("evaluations.npz", "model.zip", "vecnormalize.pkl", FINAL_EVAL_FILE, "error.txt", RESULT_FILE)


def identity(c: dict) -> dict:
    """The part of a resolved config that must match for a checkpoint to be resumed."""
    return {k: v for k, v in c.items() if k not in VOLATILE_KEYS}


def open_run(c: dict, run_dir: Path) -> tuple[IO | None, dict | None]:
    """``(lock, None)`` for a run to train, or ``(None, result)`` for one to skip (done or locked)."""
    prev = read_result(run_dir)
    if prev and prev.get("status") in DONE and not c.get("rerun", False):
        why = stale_reason(run_dir, c, prev)
        if why is None:
            return None, {**prev, "skipped": True}
        say(f"[stale] {run_dir}: {prev['status']}, but {why}; training it again")
    lock = _lock(run_dir)
    if lock is None:
        return None, {"status": RunStatus.LOCKED, "run_dir": str(run_dir), "skipped": True,
                      "error": "another process holds this run directory's lock"}
    return lock, None


def stale_reason(run_dir: Path, c: dict, result: dict) -> str | None:
    """Why a done run no longer stands for the configuration ``c`` (None: it is current).

    Stale when ``result.json``'s ``results_format`` differs from :data:`RESULTS_FORMAT` (absent
    means 1, the format before the key existed) or when ``config.yaml``'s identity (the resolved
    config without :data:`VOLATILE_KEYS`) differs from ``c``'s, both compared after one YAML round
    trip so that formatting never counts as a change. A key the old config lacks and ``c`` has at
    null (an option added since, whose null default keeps the earlier behaviour, as every
    ``configs/opt/schema`` key added later does) is no difference. The reason names the first
    differing keys.
    """
    fmt = result.get("results_format", 1)
    if fmt != RESULTS_FORMAT:
        return f"its result.json has results format {fmt}, this code writes {RESULTS_FORMAT}"
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return f"it has no {CONFIG_FILE}"
    from omegaconf import OmegaConf

    old = identity(OmegaConf.to_container(OmegaConf.load(path), resolve=True))  # type: ignore[arg-type]
    new = identity(OmegaConf.to_container(OmegaConf.create(config_yaml(c)), resolve=True))  # type: ignore[arg-type]
    diff = _dotted_diff(old, new)
    if not diff:
        return None
    shown = ", ".join(diff[:3]) + (f" (+{len(diff) - 3} more)" if len(diff) > 3 else "")
    return f"its {CONFIG_FILE} differs: {shown}"


def config_yaml(c: dict) -> str:
    """The text of a run's ``config.yaml`` for the resolved configuration ``c``."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(c))


def _dotted_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every differing leaf of two nested dicts (dotted keys)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}{k}"
            if k not in new:
                out.append(f"{key}: {old[k]!r} -> (absent)")
            elif k not in old:
                if new[k] is not None:  # a key added since, at its null default: results unchanged
                    out.append(f"{key}: (absent) -> {new[k]!r}")
            else:
                out += _dotted_diff(old[k], new[k], f"{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _lock(run_dir: Path) -> IO | None:
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


@dataclass
class Session:
    """One session of a locked run: fresh (``state is None``) or resumed from ``checkpoint``."""

    c: dict
    run_dir: Path
    store: CheckpointStore
    checkpoint: Path | None = None
    state: dict | None = None  # the checkpoint's state.pkl
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def resumed(self) -> bool:
        return self.state is not None

    @property
    def start_step(self) -> int:
        return int(self.state["step"]) if self.state is not None else 0

    @property
    def wall_time_before(self) -> float:
        """Wall time of the earlier sessions, up to the checkpoint."""
        return float(self.state.get("wall_time_s", 0.0)) if self.state is not None else 0.0

    @classmethod
    def begin(cls, c: dict, run_dir: Path, labels: dict) -> "Session":
        """Pick the resume point, prepare the directory, write ``config.yaml``; ``result`` starts
        as ``running`` (with ``resumed_from`` extended when resumed)."""
        store = CheckpointStore(run_dir, keep=c["checkpoint"]["keep"])
        checkpoint, state = _resume_point(c, run_dir, store)
        prev = (read_result(run_dir) or {}) if state is not None else {}
        if state is None:
            _clear_outputs(run_dir)  # a fresh start (nothing to resume, rerun=true, checkpoint.resume=false)
            store.clear()
        else:
            store.cleanup_tmp()
            (run_dir / "error.txt").unlink(missing_ok=True)  # from a failed session being resumed
        (run_dir / CONFIG_FILE).write_text(config_yaml(c))
        result: dict[str, Any] = {
            "status": RunStatus.RUNNING, "results_format": RESULTS_FORMAT, "run_dir": str(run_dir), **labels,
            "total_timesteps": c["total_timesteps"], "started_at": prev.get("started_at") or now_iso(),
            "provenance": provenance(c["threads"]),
        }
        if state is not None:
            result["resumed_from"] = [*(prev.get("resumed_from") or []), int(state["step"])]
        return cls(c, run_dir, store, checkpoint, state, result)

    def write_result(self) -> None:
        write_json(self.run_dir / RESULT_FILE, self.result)

    def end(self) -> dict:
        """Write the final ``result.json``; clear the checkpoints of a done run."""
        self.write_result()
        if self.result["status"] in DONE and not self.c["checkpoint"]["keep_when_done"]:
            self.store.clear()
        return self.result


def _resume_point(c: dict, run_dir: Path, store: CheckpointStore) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its state, or (None, None) for a fresh start."""
    prev = read_result(run_dir)
    if not c["checkpoint"]["resume"] or (prev and prev.get("status") in DONE):
        return None, None  # rerun=true of a finished run, or resuming switched off
    folder = store.verified_latest(
        lambda msg: say(f"[resume] {run_dir}: {msg}", sys.stderr))
    if folder is None:
        return None, None
    try:
        state = load_state(folder)
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint: start again
        say(f"[resume] {run_dir}: checkpoint {folder.name} unreadable ({type(e).__name__}: {e}); "
            "starting from scratch", sys.stderr)
        return None, None
    if state.get("identity") != identity(c):
        say(f"[resume] {run_dir}: the checkpoint was written with a different configuration; "
            "starting from scratch", sys.stderr)
        return None, None
    return folder, state


def _clear_outputs(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "tb", ignore_errors=True)
    for f in OUTPUTS:
        (run_dir / f).unlink(missing_ok=True)

