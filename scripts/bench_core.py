"""Cost of the HesScale sweep relative to a plain forward+backward (issue 2's benchmark).

For tanh MLPs 784 → width×3 → C with cross-entropy, measures interleaved in one process, on one
thread, the median time of:

* ``autograd``: plain forward + ``loss.backward()`` (the baseline, ratio 1);
* ``hesscale``: forward + backward + HesScale sweep (``hesscale.hessian_diagonal``);
* ``hutchinson``: forward + backward with ``create_graph`` + one Hessian-vector product;
* BackPACK ``DiagGGNMC(1)`` and ``DiagGGNExact`` (if installed).

Writes ``docs/results/bench_core.{json,png}`` and prints a table of ratios ``T(method)/T(autograd)``.
Usage: ``python scripts/bench_core.py [--quick] [--reps 20] [--out docs/results]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import hesscale


def mlp(width: int, classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, classes),
    )


def make_methods(model, x, y):
    loss_fn = nn.CrossEntropyLoss()

    def autograd():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def hesscale_sweep():
        model.zero_grad(set_to_none=True)
        hesscale.hessian_diagonal(model, loss_fn, x, y)

    def hutchinson():
        model.zero_grad(set_to_none=True)
        params = list(model.parameters())
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        z = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        torch.autograd.grad(grads, params, z)

    methods = {"autograd": autograd, "hesscale": hesscale_sweep, "hutchinson_1": hutchinson}
    try:
        import backpack
        from backpack.extensions import DiagGGNExact, DiagGGNMC

        bp_model, bp_loss = backpack.extend(copy.deepcopy(model)), backpack.extend(nn.CrossEntropyLoss())

        def with_backpack(ext):
            def run():
                bp_model.zero_grad(set_to_none=True)
                with backpack.backpack(ext):
                    bp_loss(bp_model(x), y).backward()
            return run

        methods["backpack_ggn_mc_1"] = with_backpack(DiagGGNMC(mc_samples=1))
        methods["backpack_ggn_exact"] = with_backpack(DiagGGNExact())
    except ImportError:
        pass
    return methods


def measure(methods: dict, reps: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call; methods interleaved so machine noise hits them alike."""
    times = {name: [] for name in methods}
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    for _ in range(reps):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny configuration (smoke test)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--skip-exact-above", type=int, default=10,
                        help="skip BackPACK DiagGGNExact when C exceeds this (it costs ~C backward passes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    grid = [(64, 10, 8)] if args.quick else [
        (w, c, n) for w in (128, 512, 1024) for c in (10, 100) for n in (1, 32, 128)
    ]
    rows = []
    for width, classes, n in grid:
        torch.manual_seed(0)
        model = mlp(width, classes)
        x, y = torch.randn(n, 784), torch.randint(0, classes, (n,))
        methods = make_methods(model, x, y)
        if classes > args.skip_exact_above:
            methods.pop("backpack_ggn_exact", None)
        med = measure(methods, 3 if args.quick else args.reps)
        row = {"width": width, "classes": classes, "batch": n, "autograd_ms": med["autograd"] * 1e3}
        row.update({f"R_{k}": v / med["autograd"] for k, v in med.items() if k != "autograd"})
        rows.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": 1, "reps": args.reps, "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    (args.out / "bench_core.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args.out / "bench_core.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k.startswith("R_")]
    fig, ax = plt.subplots(figsize=(10, 4))
    labels = [f"w{r['width']}\nC{r['classes']}\nN{r['batch']}" for r in rows]
    for i, key in enumerate(keys):
        ax.bar([j + i * 0.8 / len(keys) for j in range(len(rows))], [r.get(key, float("nan")) for r in rows],
               width=0.8 / len(keys), label=key[2:])
    ax.axhline(10 / 6, color="k", ls="--", lw=0.8, label="FLOP floor 1.67")
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("time / (forward + backward)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
