"""Peak tensor memory of one curvature update relative to one first-order (Adam) update.

Usage: python scripts/bench_optim_memory.py [--quick]

For each network, every arm takes 3 warm-up updates, then one update under
``torch.profiler.profile(profile_memory=True)``; the peak is the largest total of torch's memory
timeline for it (every tensor alive: parameters, gradients, ĥ, activations, temporaries,
persistent work buffers) less the optimizer state (the wrapped optimizer's and the scaler's EMA,
each storage once):

* first-order: ``zero_grad()``, ``loss.backward()``, ``Adam.step()``
* curvature:   ``zero_grad()``, ``hesscale.hessian_diagonal`` (gradient + ĥ, written into the
  optimizer's ``gradient_storage()`` as the agents' update writes them), the optimizer's step

Reported beside the peak of the whole update: the same without the optimizers' persistent work
buffers (u, c, a copy of θ: kept so that no parameter-sized temporary is allocated per step; not
the flat ``gh`` buffer, which holds the gradient and ĥ themselves), the peak of the optimizer step
alone, and those buffers in units of the parameters' size. Writes
docs/results/bench_optim_memory.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import hesscale  # noqa: E402
from hesscale.optim import AdaHesScale, StepSizeScaling  # noqa: E402

RESULTS = ROOT / "docs" / "results"

# name -> (layer widths, activation, batch size)
NETWORKS: dict[str, tuple[list[int], type[nn.Module], int]] = {
    "ppo actor 17-64-64-6 tanh, N=64": ([17, 64, 64, 6], nn.Tanh, 64),
    "sac actor 17-256-256-12 relu, N=256": ([17, 256, 256, 12], nn.ReLU, 256),
    "mlp 64-512x4-100 tanh, N=128": ([64, 512, 512, 512, 512, 100], nn.Tanh, 128),
}

ARMS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "Adam (first-order)": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "AdaHesScale": lambda ps: AdaHesScale(ps, lr=1e-3),
    "Scaled Adam": lambda ps: StepSizeScaling(torch.optim.Adam(ps, lr=1e-3)),
    "Scaled Adam (snapshot)": lambda ps: StepSizeScaling(torch.optim.Adam(ps, lr=1e-3), fused=False),
    "Scaled AdaHesScale": lambda ps: StepSizeScaling(AdaHesScale(ps, lr=1e-3)),
}


def memory_timeline(fn: Callable[[], object]) -> tuple[int, int]:
    """``(peak, at the end)`` of the bytes of all tensors alive while ``fn`` runs (its result kept
    alive to the end), from torch's memory timeline (``tracemalloc`` does not see tensors)."""
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


def peak_bytes(fn: Callable[[], None], exclude: int) -> int:
    """Peak of all tensors alive while ``fn`` runs (torch's memory timeline), less ``exclude`` bytes."""
    return memory_timeline(fn)[0] - exclude


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state (the wrapped optimizer's too), each storage once."""
    storages = {}
    for o in (opt, getattr(opt, "optimizer", None)):
        for st in getattr(o, "state", {}).values():
            for v in st.values():
                if torch.is_tensor(v):
                    storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(storages.values())


def build(widths: list[int], act: type[nn.Module], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def measure(name: str) -> dict:
    widths, act, n = NETWORKS[name]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, widths[0], generator=g), torch.randn(n, widths[-1], generator=g)
    loss_fn = nn.MSELoss()
    out: dict = {"network": name, "n_params": sum(p.numel() for p in build(widths, act).parameters())}
    param_bytes = 4 * out["n_params"]
    for arm, make in ARMS.items():
        model = build(widths, act)
        opt = make(list(model.parameters()))
        first_order = arm.startswith("Adam (")

        def gradients() -> None:
            opt.zero_grad()
            if first_order:
                loss_fn(model(x), y).backward()
            else:
                hesscale.hessian_diagonal(model, loss_fn, x, y, into=opt.gradient_storage())

        def update() -> None:
            gradients()
            opt.step()

        for _ in range(3):
            update()
        total = peak_bytes(update, state_bytes(opt))
        gradients()
        step = peak_bytes(opt.step, state_bytes(opt))
        chunks = getattr(opt, "_chunks", {})
        # the EMA is optimizer state; gh holds the gradient and ĥ themselves (the backward writes them there)
        work = sum(b.numel() * b.element_size() for _, cs in chunks.values() for c in cs
                   for key, b in c.buffers.items() if key not in ("ema", "gh"))
        out[arm] = {"update_peak_bytes": total, "step_peak_bytes": step, "persistent_work_in_params": work / param_bytes}
    base = out["Adam (first-order)"]
    for arm in ARMS:
        a = out[arm]
        a["update_ratio"] = a["update_peak_bytes"] / base["update_peak_bytes"]
        a["update_ratio_without_work"] = (a["update_peak_bytes"] - a["persistent_work_in_params"] * param_bytes) / (
            base["update_peak_bytes"])
        a["step_ratio"] = a["step_peak_bytes"] / max(base["step_peak_bytes"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first network only, no files")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = list(NETWORKS)[:1] if args.quick else list(NETWORKS)
    results = [measure(n) for n in names]
    print("peak tensor memory of one update / the first-order (Adam) update's (optimizer state excluded);")
    print("the same less the scaler's persistent work buffers (-work); the step alone / Adam's step;")
    print("those work buffers (× the parameters' size)")
    print(f"{'network':38} {'arm':24} {'update':>7} {'-work':>6} {'MiB':>7} {'step':>6} {'step MiB':>8} {'work':>5}")
    for r in results:
        for arm in ARMS:
            a = r[arm]
            print(f"{r['network']:38} {arm:24} {a['update_ratio']:>7.2f} {a['update_ratio_without_work']:>6.2f} "
                  f"{a['update_peak_bytes'] / 2**20:>7.2f} {a['step_ratio']:>6.2f} {a['step_peak_bytes'] / 2**20:>8.2f} "
                  f"{a['persistent_work_in_params']:>5.1f}")
    if args.quick:
        return
    meta = {"torch": torch.__version__, "threads": 1, "command": "python scripts/bench_optim_memory.py",
            "method": "torch.profiler memory timeline (profile_memory, record_shapes, with_stack): peak total "
                      "less the optimizer state"}
    (RESULTS / "bench_optim_memory.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {RESULTS / 'bench_optim_memory.json'}")


if __name__ == "__main__":
    main()
