#!/usr/bin/env python
"""Replay a saved run: python scripts/evaluate.py <run dir> [-n 10] [--video [DIR]] [--stochastic]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.experiment.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
