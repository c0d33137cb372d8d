"""Tensor memory as torch's profiler sees it (``tracemalloc`` does not see tensors)."""
import json
import tempfile
import warnings
from pathlib import Path

from torch.profiler import ProfilerActivity, profile


def memory_timeline(fn) -> tuple[int, int]:
    """``(peak, at the end)`` of the bytes of all tensors alive while ``fn`` runs (its result kept
    alive to the end), from torch's memory timeline."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        kept = fn()  # noqa: F841  (alive until the timeline ends)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        with warnings.catch_warnings():  # deprecated for CUDA snapshots; the CPU timeline has no successor
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(row) for row in sizes]
    return max(totals), totals[-1]
