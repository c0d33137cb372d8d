#!/usr/bin/env python
"""Train one agent, or a sweep with -m (Hydra 1.3; configs in ../configs).

    python scripts/train.py agent=ppo opt=hesscale
    python scripts/train.py -m agent=ppo opt=adam,hesscale 'seed=range(0,10)'
    python scripts/train.py -m sweep=lr_sensitivity hydra/launcher=slurm
    python scripts/train.py --cfg job           # print the composed config
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig):
    from agents.experiment.run import main_task

    return main_task(cfg)


if __name__ == "__main__":
    from agents.experiment.cli import run_hydra_main

    run_hydra_main(main)  # every configuration error (Hydra's included): one message, exit code 2
