"""The command line's configuration errors: one message, exit code 2, a "did you mean" where one fits.

``scripts/train.py`` runs its ``@hydra.main`` function through :func:`run_hydra_main`:

Ctrl-C is a preemption here too (:func:`~agents.experiment.preemption.install_interrupt_handler`):
the runs checkpoint and the process exits 130.

1. :func:`normalize_overrides`: ``tuned=null`` (what Hydra users write for an optional group) becomes
   ``~tuned``, which Hydra's defaults list understands (it rejects a null group override);
2. Hydra reports its own errors by raising them (``HYDRA_FULL_ERROR``) instead of printing them and
   exiting with 1, the code of a failed run;
3. :func:`explain` turns Hydra's composition and override errors (an unknown group option, an
   unknown key, a bad override) into one message with the nearest valid name; the process exits 2
   (:func:`exit_config_error`), as for every other :class:`~agents.experiment.errors.ConfigError`
   (``main_task``; no Slurm for ``hydra/launcher=slurm``: :mod:`~agents.experiment.cluster`).

Torch-free: a configuration error is answered before torch or SB3 load.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

CONFIG_ERROR_EXIT = 2
_NULL_GROUP = re.compile(r"^(tuned|opt_agent|sweep)=(null|None|~)$")


def normalize_overrides(argv: Sequence[str]) -> list[str]:
    """``tuned=null`` / ``sweep=null`` → ``~tuned`` / ``~sweep``; everything else unchanged."""
    return [f"~{m.group(1)}" if (m := _NULL_GROUP.match(a)) else a for a in argv]


def exit_config_error(msg: str) -> NoReturn:
    """Print the one-line message and exit with :data:`CONFIG_ERROR_EXIT` (works inside Hydra's
    callbacks too, which turn exceptions into warnings: ``SystemExit`` passes through)."""
    print(f"Invalid configuration: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(CONFIG_ERROR_EXIT)


def explain(ex: BaseException) -> str | None:
    """The one-paragraph message for a Hydra configuration error, or None if ``ex`` is not one."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from agents.experiment.keys import did_you_mean, known_tree, nearest_key

    if isinstance(ex, MissingConfigException) and ex.missing_cfg_file and ex.options:
        group, _, name = str(ex.missing_cfg_file).rpartition("/")
        return (f"{group}={name} is not a config in configs/{group}/{did_you_mean(name, ex.options)}; "
                f"valid: {', '.join(ex.options)}")
    if isinstance(ex, ConfigCompositionException):
        m = re.search(r"Could not override '([^']+)'", str(ex))
        if m and "not in struct" in str(ex.__cause__) + str(ex):
            key = m.group(1)
            return f"{key}: unknown key{nearest_key(key, known_tree())}"
        cause = f": {ex.__cause__}" if ex.__cause__ is not None else ""
        return f"{ex}{cause}".strip()
    if isinstance(ex, (OverrideParseException, OmegaConfBaseException)):
        return str(ex).strip()
    if isinstance(ex, ValueError) and str(ex).startswith("Only one of --run, --multirun"):
        return f"{ex} (to see one run of a sweep, drop -m and give that run's values: --cfg job agent=a2c ...)"
    return None


def run_hydra_main(main: Callable[[], Any], argv: list[str] | None = None) -> None:
    """Run a ``@hydra.main`` function; configuration errors exit with code 2 and one message."""
    argv = sys.argv if argv is None else argv
    argv[1:] = normalize_overrides(argv[1:])
    ours = "HYDRA_FULL_ERROR" not in os.environ
    if ours:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing and exiting 1
    from agents.experiment.preemption import install_interrupt_handler, preemption_requested

    install_interrupt_handler()  # Ctrl-C: every running job checkpoints; a second one exits at once
    try:
        main()
        if preemption_requested() is not None:  # a multirun interrupted by Ctrl-C (single runs exit in the task)
            raise SystemExit(128 + int(preemption_requested()))
    except Exception as ex:  # noqa: BLE001 - sorted into config errors (2) and the rest (1)
        import traceback

        msg = explain(ex)
        if msg is None or not ours:  # not a config error, or the user asked for full traces
            traceback.print_exc()
        if msg is None:
            raise SystemExit(1) from None
        exit_config_error(msg)
    finally:
        if ours:
            os.environ.pop("HYDRA_FULL_ERROR", None)
