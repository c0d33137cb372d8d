"""Resumable runs: the callback that checkpoints at safe boundaries and restores there.

A checkpoint (:class:`~agents.experiment.store.CheckpointStore`) holds

* ``model.zip``: SB3's ``save()`` (parameters, optimizer states — curvature EMAs and step-size
  state included —, step counter, episode-info buffers, ...);
* ``replay_buffer.pkl`` (off-policy agents);
* ``state.pkl``: what SB3's ``save()`` leaves out, each part beside its restore: the RNG states and
  the last observation (:mod:`~agents.experiment.model_state`), the training and evaluation envs
  (:mod:`~agents.experiment.env_state`), the logger's pending values and CSV rows
  (:mod:`~agents.experiment.logs`), the evaluation history (:mod:`~agents.experiment.eval_history`),
  and what the runner adds (config identity, wall time so far).

Checkpoints are taken at *safe boundaries*: at the start of a rollout (``on_rollout_start``),
i.e. after ``train()`` and before the next environment step — for PPO/A2C a rollout boundary, for
SAC a step boundary. The state saved there and the state restored there are the same, so a
resumed run continues exactly as the uninterrupted one would have (same RNG draws, same
episodes), as long as the envs' state could be captured.

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

SB3 pitfalls handled: ``load()`` reseeds every RNG (the saved states are put back at the first
boundary, after loading); ``load()`` drops the last observation (restored, with
``force_reset=False``); ``learn(T, reset_num_timesteps=False)`` trains T *more* steps (the runner
passes the remaining budget); SB3's ``CheckpointCallback`` saves mid-rollout (not used).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from stable_baselines3.common.callbacks import BaseCallback

from agents.experiment.build import BUFFER_FILE, MODEL_FILE
from agents.experiment.env_state import restore_pending_seeds, snapshot_vec_env
from agents.experiment.eval_history import eval_state
from agents.experiment.logs import logger_state, restore_logger
from agents.experiment.model_state import last_obs_state, restore_rng, rng_state
from agents.experiment.preemption import Preempted, preemption_requested
from agents.experiment.store import FORMAT_VERSION, CheckpointStore, save_state


class ResumeCallback(BaseCallback):
    """Checkpoints at safe boundaries every ``freq`` env steps and on preemption; restores the
    saved RNG / logger / env seeds at the first boundary of a resumed session (``resume_state``).

    ``extra()`` returns what the runner adds to each checkpoint's state.
    """

    def __init__(self, store: CheckpointStore, freq: int, extra: Callable[[], dict], eval_callback=None,
                 eval_env=None, resume_state: dict | None = None) -> None:
        super().__init__(verbose=0)
        self.store = store
        self.freq = int(freq)
        self.extra = extra
        self.eval_callback = eval_callback
        self.eval_env = eval_env
        self.resume_state = resume_state
        self.last_saved: int | None = None

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
        return True

    def save(self) -> Path:
        """Write a checkpoint of the model at its current step (atomically)."""
        out = self.store.save(int(self.model.num_timesteps), self.write)
        self.last_saved = int(self.model.num_timesteps)
        return out

    def write(self, folder: Path) -> None:
        """The checkpoint's files, into ``folder``."""
        model = self.model
        model.save(str(folder / MODEL_FILE))
        if getattr(model, "replay_buffer", None) is not None:
            model.save_replay_buffer(str(folder / BUFFER_FILE))
        save_state(folder, {
            "format": FORMAT_VERSION,
            "step": int(model.num_timesteps),
            "rng": rng_state(model),
            "logger": logger_state(model.logger),
            "train_env": snapshot_vec_env(model.get_env()),
            "eval_env": snapshot_vec_env(self.eval_env) if self.eval_env is not None else None,
            "eval": eval_state(self.eval_callback),
            "last_obs": last_obs_state(model),
            **self.extra(),
        })
