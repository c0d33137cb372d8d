"""The progress bar of a run: SB3's, over the whole run, closed however training ends.

SB3's ``ProgressBarCallback`` counts the steps of one ``learn()`` call from 0, so a resumed run
showed "0 of the remaining steps"; this one starts at the resumed step (49,664/1,000,000). It is
closed explicitly (:meth:`OverallProgressBar.close`) when training stops early (preemption,
Ctrl-C, a failure); left to the garbage collector at interpreter shutdown, tqdm's rich bar failed
with an ``ImportError``.
"""

from __future__ import annotations

from stable_baselines3.common.callbacks import ProgressBarCallback


class OverallProgressBar(ProgressBarCallback):
    """``tqdm`` (rich) from the model's step at the start of ``learn()`` to ``total_timesteps``."""

    def __init__(self, total_timesteps: int) -> None:
        super().__init__()
        self.total_timesteps = int(total_timesteps)
        self.pbar = None

    def _on_training_start(self) -> None:
        from stable_baselines3.common.callbacks import tqdm

        self.pbar = tqdm(total=self.total_timesteps, initial=int(self.model.num_timesteps))

    def _on_training_end(self) -> None:
        self.close()

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.refresh()
            self.pbar.close()
            self.pbar = None
