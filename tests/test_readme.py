"""Every ```python block of README.md runs as written, each in a fresh interpreter; the README's
layout section names exactly the project's modules.

Long runs are shortened by one switch, the environment variable ``HESSCALE_README_STEPS``: it caps
the env steps of every Stable-Baselines3 ``learn()`` a block calls (default 2048, one PPO rollout;
``0`` runs the blocks at their full length, e.g. ``HESSCALE_README_STEPS=0 pytest
tests/test_readme.py``). Nothing else about a block is changed: it runs in a temporary directory so
the files it writes (``runs/``, ``*.zip``) do not land in the checkout. Blocks that train an agent
(``.learn(``) are marked ``slow`` (``make test-all``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
STEPS = int(os.environ.get("HESSCALE_README_STEPS", "2048"))

# Run before each block: cap SB3's learn() at STEPS env steps (BaseAlgorithm._setup_learn is where
# every algorithm turns its `total_timesteps` argument into the loop's target).
_PREAMBLE = """
import sys
steps = int(sys.argv[1])
if steps > 0:
    from stable_baselines3.common.base_class import BaseAlgorithm
    _setup = BaseAlgorithm._setup_learn
    def _capped(self, total_timesteps, *args, **kwargs):
        return _setup(self, min(total_timesteps, steps), *args, **kwargs)
    BaseAlgorithm._setup_learn = _capped
source, name = open(sys.argv[2]).read(), sys.argv[3]
exec(compile(source, name, "exec"), {"__name__": "__main__"})
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, source) of each fenced ```python block."""
    blocks = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text())
PARAMS = [pytest.param(line, source, id=f"README.md:{line}",
                       marks=[pytest.mark.slow] if ".learn(" in source else [])
          for line, source in BLOCKS]


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4  # core, capture, register_rule, optimizers, agents


@pytest.mark.parametrize("line,source", PARAMS)
def test_readme_block_runs(line: int, source: str, tmp_path: Path):
    block = tmp_path / "block.py"
    block.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", _PREAMBLE, str(STEPS), str(block), f"README.md:{line}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"README.md block at line {line} failed:\n{proc.stderr[-4000:]}"


def layout_paths(text: str) -> list[str]:
    """The paths the ``## Layout`` section's tree names: one entry a line, two spaces of indent per
    level, a folder ends with ``/``; ``configs/agent/`` and the like are named as written."""
    section = re.split(r"^## Layout\n", text, maxsplit=1, flags=re.M)[1].split("\n## ", 1)[0]
    tree = re.search(r"^```text\n(.*?)^```", section, flags=re.S | re.M).group(1)
    paths, stack = [], []
    for line in tree.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        stack[depth:] = [line.split()[0]]
        paths.append("".join(stack))
    return paths


def test_layout_section_matches_the_tree():
    named = layout_paths(README.read_text())
    assert len(named) == len(set(named)), "a path is named twice"
    missing = [p for p in named if not (ROOT / p).exists() or p.endswith("/") != (ROOT / p).is_dir()]
    assert not missing, f"the README's layout names paths that do not exist: {missing}"
    modules = sorted(str(f.relative_to(ROOT)) for pkg in ("agents", "hesscale", "scripts")
                     for f in (ROOT / pkg).rglob("*.py") if "__pycache__" not in f.parts)
    unnamed = [m for m in modules if m not in named]
    assert not unnamed, f"modules missing from the README's layout section: {unnamed}"


def test_layout_parser_reads_nesting():
    text = "## Layout\n```text\na/   x\n  b/  y\n    c.py  z\n  d.py\ne.py\n```\n## Next\n"
    assert layout_paths(text) == ["a/", "a/b/", "a/b/c.py", "a/d.py", "e.py"]
