"""Before a sweep goes to Slurm: is there a Slurm to take it?

:class:`SlurmCheck` is a Hydra callback (``hydra.callbacks.slurm_check`` in ``configs/config.yaml``);
in the command line's process, before anything is submitted, a multirun with ``hydra/launcher=slurm``
asks

1. are Slurm's client commands here (``sbatch``, ``scontrol`` on PATH)?
2. does the controller answer (``scontrol ping`` within :data:`PING_TIMEOUT_S` seconds)?

and a ``no`` is a configuration error (:class:`ClusterUnavailable`): one line naming what is missing,
exit code 2, no traceback (:func:`agents.experiment.cli.exit_config_error`; Hydra turns a callback's
exceptions into warnings, so the callback exits itself). Without it, submitit's ``sbatch`` retries
for a minute and fails with a traceback. Torch-free.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

from hydra.experimental.callback import Callback

from agents.experiment.errors import ConfigError

PING_TIMEOUT_S = 10
SLURM_LAUNCHER = "SlurmLauncher"  # the class name of hydra-submitit-launcher's Slurm launcher
COMMANDS = ("sbatch", "scontrol")


class ClusterUnavailable(ConfigError):
    """``hydra/launcher=slurm`` where no Slurm is reachable."""


def check_slurm(timeout_s: float = PING_TIMEOUT_S) -> None:
    """Raise :class:`ClusterUnavailable` unless Slurm's commands are on PATH and the controller answers."""
    prefix = "hydra/launcher=slurm: no Slurm cluster reachable from here:"
    for cmd in COMMANDS:
        if shutil.which(cmd) is None:
            raise ClusterUnavailable(f"{prefix} `{cmd}` not found on PATH (Slurm's client commands are not "
                                     "installed; run the sweep on a login node, or use hydra/launcher=parallel)")
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        said = _first_line(e.stderr, e.stdout)
        raise ClusterUnavailable(f"{prefix} the controller did not answer `scontrol ping` within {timeout_s:g}s"
                                 + (f" ({said})" if said else "")) from None
    if p.returncode != 0:
        raise ClusterUnavailable(f"{prefix} the controller is not answering "
                                 f"(scontrol ping: {_first_line(p.stdout, p.stderr) or f'exit code {p.returncode}'})")


def _first_line(*texts: Any) -> str:
    for t in texts:
        if isinstance(t, bytes):
            t = t.decode(errors="replace")
        for line in (t or "").splitlines():
            if line.strip():
                return line.strip()
    return ""


class SlurmCheck(Callback):
    """Hydra callback: :func:`check_slurm` before a multirun whose launcher is Slurm's."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        target = str(config.hydra.launcher.get("_target_", ""))
        if target.rsplit(".", 1)[-1] == SLURM_LAUNCHER:
            from agents.experiment.cli import exit_config_error

            try:
                check_slurm()
            except ClusterUnavailable as e:
                exit_config_error(str(e))
