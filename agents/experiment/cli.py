"""The command line's configuration errors: one message, exit code 2, a "did you mean" where one fits.

``scripts/train.py`` runs its ``@hydra.main`` function through :func:`run_hydra_main`:

Ctrl-C is a preemption here too (:func:`~agents.experiment.preemption.install_interrupt_handler`):
the runs checkpoint and the process exits 130.

1. :func:`normalize_overrides`: ``tuned=null`` (what Hydra users write for an optional group) becomes
   ``~tuned``, which Hydra's defaults list understands (it rejects a null group override);
2. Hydra reports its own errors by raising them (``HYDRA_FULL_ERROR``) instead of printing them and
   exiting with 1, the code of a failed run;
3. :func:`explain` turns Hydra's composition and override errors (an unknown group option, an
   unknown key, a bad override) into one message with the nearest valid name; the process exits 2,
   as for every other :class:`~agents.experiment.errors.ConfigError` (``main_task``).

Torch-free: a configuration error is answered before torch or SB3 load.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

CONFIG_ERROR_EXIT = 2
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
_NULL_GROUP = re.compile(r"^(tuned|sweep)=(null|None|~)$")


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the nearest of ``options``, or ``""``."""
    close = difflib.get_close_matches(word, sorted(set(options)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def nearest_key(dotted: str, tree: Mapping) -> str:
    """`` (did you mean a.b.c?)`` for an unknown dotted key of the nested mapping ``tree``.

    The known prefix is kept and the first unknown part is matched among its siblings
    (``opt.scalng.delta`` → ``opt.scaling.delta``); failing that, among all the leaf keys.
    """
    node: Any = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, Mapping):
            break
        if part in node:
            node = node[part]
            continue
        close = difflib.get_close_matches(part, [str(k) for k in node], n=1, cutoff=0.6)
        if close:
            return f" (did you mean {'.'.join([*parts[:i], close[0], *parts[i + 1:]])}?)"
        break
    return did_you_mean(dotted, _leaves(tree))


def _leaves(tree: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.extend(_leaves(v, key + ".") if isinstance(v, Mapping) and v else [key])
    return out


def normalize_overrides(argv: Sequence[str]) -> list[str]:
    """``tuned=null`` / ``sweep=null`` → ``~tuned`` / ``~sweep``; everything else unchanged."""
    return [f"~{m.group(1)}" if (m := _NULL_GROUP.match(a)) else a for a in argv]


def explain(ex: BaseException, overrides: Sequence[str] = ()) -> str | None:
    """The one-paragraph message for a Hydra configuration error, or None if ``ex`` is not one."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(ex, MissingConfigException) and ex.missing_cfg_file and ex.options:
        group, _, name = str(ex.missing_cfg_file).rpartition("/")
        return (f"{group}={name} is not a config in configs/{group}/{did_you_mean(name, ex.options)}; "
                f"valid: {', '.join(ex.options)}")
    if isinstance(ex, ConfigCompositionException):
        m = re.search(r"Could not override '([^']+)'", str(ex))
        if m and "not in struct" in str(ex.__cause__) + str(ex):
            key = m.group(1)
            return f"{key}: no such key{nearest_key(key, _composed(overrides))}"
        cause = f": {ex.__cause__}" if ex.__cause__ is not None else ""
        return f"{ex}{cause}".strip()
    if isinstance(ex, (OverrideParseException, OmegaConfBaseException)):
        return str(ex).strip()
    return None


def _composed(overrides: Sequence[str]) -> Mapping:
    """The config composed with the command line's group choices only (to list the valid keys)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    groups = [o for o in overrides if re.match(r"^~?(agent|opt|env|tuned|sweep)(=|$)", o) and "," not in o]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            return OmegaConf.to_container(compose("config", overrides=groups))  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - only a hint: without it the message stays valid
        return {}


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

        msg = explain(ex, [a for a in argv[1:] if not a.startswith("-")])
        if msg is None or not ours:  # not a config error, or the user asked for full traces
            traceback.print_exc()
        if msg is None:
            raise SystemExit(1) from None
        print(f"Invalid configuration: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(CONFIG_ERROR_EXIT) from None
    finally:
        if ours:
            os.environ.pop("HYDRA_FULL_ERROR", None)
