"""Cost of one training step per optimizer, relative to Adam (the paper's cost figure, issue 7.2).

One step = forward, backward with the method's curvature, optimizer step; MSE loss; tanh MLPs
64 → 512×L → 100 (depth sweep) and 64 → W → 100 (width sweep); one thread, methods interleaved,
medians. Methods: SGD, Adam, AdaHesScale, AdaHesScaleGN, BL89 (AdaHesScale on BL89 curvature,
which equals HesScale for MSE), AdaHessian (Hutchinson, ``create_graph``), GGN-MC (BackPACK
``DiagGGNMC(1)`` + the AdaHesScale update) and GGN (BackPACK ``DiagGGNExact`` + the same update;
it costs one backward per output, so it is skipped above ``--exact-max-depth``).

Writes ``<out>/bench_cost.{json,png}``. Usage::

    python scripts/bench_cost.py                 # batch 1 and 128, L in 1..32, widths 64..2048
    python scripts/bench_cost.py --quick         # seconds (used by the tests)
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
from hesscale.optim import AdaHesScale, AdaHessian


def mlp(width: int, depth: int, inputs: int = 64, outputs: int = 100) -> nn.Sequential:
    layers, d = [], inputs
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, outputs))


def make_steps(model: nn.Module, x, y, exact: bool) -> dict:
    loss_fn = nn.MSELoss()
    nets = {name: copy.deepcopy(model) for name in
            ("sgd", "adam", "adahesscale", "adahesscale_gn", "bl89", "adahessian")}
    opts = {
        "sgd": torch.optim.SGD(nets["sgd"].parameters(), lr=1e-6),
        "adam": torch.optim.Adam(nets["adam"].parameters(), lr=1e-6, foreach=True),
        "adahessian": AdaHessian(nets["adahessian"].parameters(), lr=1e-6),
        **{k: AdaHesScale(nets[k].parameters(), lr=1e-6) for k in ("adahesscale", "adahesscale_gn", "bl89")},
    }

    def first_order(name):
        def step():
            opts[name].zero_grad()
            loss_fn(nets[name](x), y).backward()
            opts[name].step()
        return step

    def curvature(name, method):
        def step():
            opts[name].zero_grad()
            hesscale.hessian_diagonal(nets[name], loss_fn, x, y, method=method)
            opts[name].step()
        return step

    def adahessian():
        opts["adahessian"].zero_grad()
        loss_fn(nets["adahessian"](x), y).backward(create_graph=True)
        opts["adahessian"].step()

    steps = {
        "sgd": first_order("sgd"), "adam": first_order("adam"),
        "adahesscale": curvature("adahesscale", "hesscale"),
        "adahesscale_gn": curvature("adahesscale_gn", "hesscale_gn"),
        "bl89": curvature("bl89", "bl89"), "adahessian": adahessian,
    }
    try:
        import backpack
        from backpack.extensions import DiagGGNExact, DiagGGNMC
    except ImportError:
        return steps

    def with_backpack(ext, attr):
        net, lf = backpack.extend(copy.deepcopy(model)), backpack.extend(nn.MSELoss())
        opt = AdaHesScale(net.parameters(), lr=1e-6)

        def step():
            opt.zero_grad()
            with backpack.backpack(ext):
                lf(net(x), y).backward()
            for p in net.parameters():
                p.hess_diag = getattr(p, attr)
            opt.step()
        return step

    steps["ggn_mc"] = with_backpack(DiagGGNMC(mc_samples=1), "diag_ggn_mc")
    if exact:
        steps["ggn_exact"] = with_backpack(DiagGGNExact(), "diag_ggn_exact")
    return steps


def measure(steps: dict, reps: int, warmup: int = 2) -> dict[str, float]:
    times = {k: [] for k in steps}
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    for _ in range(reps):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024, 2048])
    parser.add_argument("--exact-max-depth", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    configs = [("depth", 512, d) for d in args.depths] + [("width", w, 1) for w in args.widths]
    if args.quick:
        args.batches, args.reps, configs = [4], 3, [("depth", 32, 1)]
    rows = []
    for batch in args.batches:
        for sweep, width, depth in configs:
            torch.manual_seed(0)
            model = mlp(width, depth)
            x, y = torch.randn(batch, 64), torch.randn(batch, 100)
            med = measure(make_steps(model, x, y, exact=depth <= args.exact_max_depth), args.reps)
            params = sum(p.numel() for p in model.parameters())
            row = {"sweep": sweep, "batch": batch, "width": width, "depth": depth, "params": params,
                   "adam_ms": med["adam"] * 1e3, **{k: v / med["adam"] for k, v in med.items()}}
            rows.append(row)
            print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": 1, "reps": args.reps, "loss": "MSE", "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "paper_reference": {"sgd": 0.4, "ggn_mc": 1.25, "adahesscale_gn": 1.35, "bl89": 2.05,
                                "adahesscale": 2.25, "adahessian": 3.25}}
    (args.out / "bench_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args.out / "bench_cost.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [k for k in rows[0] if k not in ("sweep", "batch", "width", "depth", "params", "adam_ms")]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(len(batches), 2, figsize=(10, 3.5 * len(batches)), squeeze=False)
    for i, b in enumerate(batches):
        for j, sweep in enumerate(("depth", "width")):
            ax = axes[i][j]
            sel = [r for r in rows if r["batch"] == b and r["sweep"] == sweep]
            for m in methods:
                pts = [(r["params"], r[m]) for r in sel if m in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.axhline(10 / 6, color="k", ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("parameters")
            ax.set_ylabel("step time / Adam step")
            ax.set_title(f"batch {b}, {sweep} sweep")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
