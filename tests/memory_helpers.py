"""Tensor memory as torch's profiler sees it: the memory benchmark's own measure, shared."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_optim_memory import memory_timeline  # noqa: E402

__all__ = ["memory_timeline"]
