"""The project's Hydra configs, composed outside ``scripts/train.py`` (tests, benchmarks, diagnostics).

One place knows where the configs live and which Hydra version base they are written for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

#: the ``configs/`` folder (``config.yaml`` and its groups)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def compose_config(
    overrides: Sequence[str] = (), return_hydra_config: bool = False, config_dir: Path = CONFIGS
) -> DictConfig:
    """``config.yaml`` of ``config_dir`` with ``overrides`` (Hydra's compose API, as ``scripts/train.py``
    resolves it before validation); ``return_hydra_config`` keeps the ``hydra`` node (launcher,
    sweeper)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(config_dir), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)
