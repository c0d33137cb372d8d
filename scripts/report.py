#!/usr/bin/env python
"""Report of a sweep: python scripts/report.py <sweep dir> [--out DIR] [--reps 2000] [--source auto|eval|tb]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.experiment.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
