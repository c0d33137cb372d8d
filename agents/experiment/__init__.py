"""Experiment layer: Hydra task function, environments, result files, evaluation and reports.

Kept light on import (no torch / SB3 at import time) so that the command-line entry points can
reject bad configurations quickly. The entry points live in ``scripts/``:

* ``scripts/train.py``    -> :func:`agents.experiment.run.main_task`
* ``scripts/evaluate.py`` -> :func:`agents.experiment.evaluate.main`
* ``scripts/report.py``   -> :func:`agents.experiment.report.main`
"""

from agents.experiment.errors import ConfigError

__all__ = ["ConfigError"]
