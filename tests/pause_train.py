"""``scripts/train.py`` with a pause injected, for the kill/resume tests.

    python tests/pause_train.py step:N <overrides...>         # freeze after env step N
    python tests/pause_train.py checkpoint:K <overrides...>   # freeze inside the K-th checkpoint write

At the pause the run writes ``<run dir>/.paused`` (its pid) and waits (up to 600 s) until a
preemption signal arrives, so the test can kill it or send it SIGTERM at a known point. A run
pauses once: a later session that finds ``.paused`` goes on (a Slurm job requeued after the
signal). The production code has no test switch: the hooks wrap
:class:`~agents.experiment.resume.ResumeCallback`. They are installed inside the task function,
so that jobs run elsewhere (``hydra/launcher=slurm``: submitit unpickles ``main`` there) pause too.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402

from agents.experiment.preemption import preemption_requested  # noqa: E402
from agents.experiment.resume import ResumeCallback  # noqa: E402


PAUSE: tuple[str, int] | None = None  # from the command line; pickled with ``main`` into Slurm jobs


def _pause(run_dir: Path) -> None:
    if (run_dir / ".paused").exists():  # paused in an earlier session of this run
        return
    (run_dir / ".paused").write_text(str(os.getpid()))
    t0 = time.monotonic()
    while preemption_requested() is None and time.monotonic() - t0 < 600:
        time.sleep(0.02)


def install(what: str, n: int) -> None:
    if getattr(ResumeCallback, "_pause_installed", False):  # several jobs in one process
        return
    ResumeCallback._pause_installed = True
    if what == "step":
        on_step = ResumeCallback._on_step

        def paused_on_step(self) -> bool:
            if not getattr(self, "_paused", False) and self.num_timesteps >= n:
                self._paused = True
                _pause(self.store.root.parent)
            return on_step(self)

        ResumeCallback._on_step = paused_on_step
    elif what == "checkpoint":
        write = ResumeCallback.write

        def paused_write(self, folder: Path) -> None:
            self._writes = getattr(self, "_writes", 0) + 1
            write(self, folder)
            if self._writes == n:
                _pause(self.store.root.parent)

        ResumeCallback.write = paused_write


@hydra.main(version_base="1.3", config_path=str(ROOT / "configs"), config_name="config")
def main(cfg):
    from agents.experiment.run import main_task

    install(*PAUSE)
    return main_task(cfg)


if __name__ == "__main__":
    what, n = sys.argv.pop(1).split(":")
    if what not in ("step", "checkpoint"):
        raise SystemExit(f"unknown pause {what!r}: step:N or checkpoint:K")
    PAUSE = (what, int(n))
    main()
