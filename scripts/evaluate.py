#!/usr/bin/env python
"""Replay a run's recorded final evaluation exactly: python scripts/evaluate.py <run dir> [--json]
(--fresh [--seed S] [-n N] [--stochastic] [--video [DIR]]: its saved model on a fresh env)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.experiment.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
