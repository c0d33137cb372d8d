"""Cost of the HesScale sweep relative to a plain forward+backward, beside its floor (issues 2, 12).

Cells: tanh MLPs 784 → width×3 → C with cross-entropy (the paper's grid), and the networks
Stable-Baselines3 builds: tanh / ReLU MLPs 17 → w → w → 6 (w = 64, 256) at N = 64, 256 with a
squared-error loss, and NatureCNN (4×84×84 → 512 → 6) at N = 64. Per cell, one process, one thread,
methods interleaved, medians:

* ``autograd``: plain forward + ``loss.backward()`` (the baseline, ratio 1);
* ``hesscale`` / ``hesscale_gn``: forward + backward + sweep (``hesscale.hessian_diagonal``);
  ``hesscale_unfused``: the same with ``fused=False`` (where the engine has the option);
* ``extra``: the sweep's extra matmuls / convolutions alone (per Linear ``D·(W∘W)`` and
  ``Dᵀ(x∘x)``, per Conv the two backward kernels on ``W∘W`` and ``x∘x``; none for the first
  layer's input) on premade operands; the cell's **floor** is ``(T(autograd) + T(extra)) / T(autograd)``;
* MLP grid only: ``hutchinson_1`` and BackPACK ``DiagGGNMC(1)`` / ``DiagGGNExact`` (if installed).

Writes ``docs/results/bench_core.{json,png}`` and prints each cell's ratios ``T(method)/T(autograd)``
with the floor beside them. Usage: ``python scripts/bench_core.py [--quick] [--reps 20] [--out docs/results]``.
"""
from __future__ import annotations

import argparse
import copy
import inspect
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


def sb3_mlp(width: int, act: type[nn.Module]) -> nn.Sequential:
    """SB3's actor/critic MLP shape (``net_arch=[w, w]``) on a 17-dim observation, 6 outputs."""
    return nn.Sequential(nn.Linear(17, width), act(), nn.Linear(width, width), act(), nn.Linear(width, 6))


def nature_cnn() -> nn.Sequential:
    """SB3's ``NatureCNN`` (84×84×4 frames, 512 features) with a 6-output head."""
    return nn.Sequential(
        nn.Conv2d(4, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(),
        nn.Linear(512, 6),
    )


def extra_ops(model: nn.Module, x: torch.Tensor):
    """A function running only the sweep's extra matmuls / convolutions for ``model`` on ``x``."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, a, y: shapes.append((m, a[0].shape, y.shape)))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    ops = []
    for k, (m, x_shape, y_shape) in enumerate(shapes):
        d, x2, w2 = torch.rand(y_shape), torch.rand(x_shape), m.weight.detach().square()
        if isinstance(m, nn.Linear):
            ops.append(lambda d=d, x2=x2: d.t().mm(x2))
            if k:
                ops.append(lambda d=d, w2=w2: d.mm(w2))
        else:
            opts = dict(stride=m.stride, padding=m.padding)
            ops.append(lambda d=d, x2=x2, s=m.weight.shape, o=opts: torch.nn.grad.conv2d_weight(x2, s, d, **o))
            if k:
                ops.append(lambda d=d, w2=w2, s=x_shape, o=opts: torch.nn.grad.conv2d_input(s, w2, d, **o))

    def run():
        for op in ops:
            op()
    return run


def make_methods(model, loss_fn, x, y, comparators: bool):
    def autograd():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def sweep(**kw):
        def run():
            model.zero_grad(set_to_none=True)
            hesscale.hessian_diagonal(model, loss_fn, x, y, **kw)
        return run

    methods = {"autograd": autograd, "hesscale": sweep(), "hesscale_gn": sweep(method="hesscale_gn")}
    if "fused" in inspect.signature(hesscale.capture).parameters:
        methods["hesscale_unfused"] = sweep(fused=False)
    methods["extra"] = extra_ops(model, x)
    if not comparators:
        return methods

    def hutchinson():
        model.zero_grad(set_to_none=True)
        params = list(model.parameters())
        grads = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
        z = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        torch.autograd.grad(grads, params, z)

    methods["hutchinson_1"] = hutchinson
    try:
        import backpack
        from backpack.extensions import DiagGGNExact, DiagGGNMC

        bp_model, bp_loss = backpack.extend(copy.deepcopy(model)), backpack.extend(copy.deepcopy(loss_fn))

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
    """Median seconds per call; methods interleaved so machine noise hits them alike, in an order
    rotated every repetition (the call right after autograd's backward runs ~30 µs slower on the
    small nets, which would otherwise fall on the same method every time)."""
    times = {name: [] for name in methods}
    names = list(methods)
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def cells(quick: bool) -> list[dict]:
    """``{net, width, classes, batch, build, loss}`` per measured cell."""
    if quick:
        return [dict(net="mlp784_tanh", width=64, classes=10, batch=8, build=lambda: mlp(64, 10), loss="ce")]
    grid = [dict(net="mlp784_tanh", width=w, classes=c, batch=n, build=lambda w=w, c=c: mlp(w, c), loss="ce")
            for w in (128, 512, 1024) for c in (10, 100) for n in (1, 32, 128)]
    grid += [dict(net=f"sb3_mlp17_{act.__name__.lower()}", width=w, classes=6, batch=n,
                  build=lambda w=w, act=act: sb3_mlp(w, act), loss="mse")
             for act in (nn.Tanh, nn.ReLU) for w in (64, 256) for n in (64, 256)]
    grid.append(dict(net="nature_cnn", width=512, classes=6, batch=64, build=nature_cnn, loss="mse"))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny configuration (smoke test)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only", default=None, help="measure only the cells whose net name contains this")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--skip-exact-above", type=int, default=10,
                        help="skip BackPACK DiagGGNExact when C exceeds this (it costs ~C backward passes)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = []
    for cell in cells(args.quick):
        if args.only and args.only not in cell["net"]:
            continue
        torch.manual_seed(0)
        model, n = cell["build"](), cell["batch"]
        if cell["net"] == "nature_cnn":
            x = torch.rand(n, 4, 84, 84)
        else:
            x = torch.randn(n, model[0].in_features)
        if cell["loss"] == "ce":
            loss_fn, y = nn.CrossEntropyLoss(), torch.randint(0, cell["classes"], (n,))
        else:
            loss_fn, y = nn.MSELoss(), torch.randn(n, cell["classes"])
        methods = make_methods(model, loss_fn, x, y, comparators=cell["net"].startswith("mlp784"))
        if cell["classes"] > args.skip_exact_above:
            methods.pop("backpack_ggn_exact", None)
        med = measure(methods, 3 if args.quick else args.reps)
        base = med.pop("autograd")
        row = {k: cell[k] for k in ("net", "width", "classes", "batch")}
        row["autograd_ms"] = base * 1e3
        row["floor"] = (base + med.pop("extra")) / base
        row.update({f"R_{k}": v / base for k, v in med.items()})
        rows.append(row)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": 1, "reps": args.reps, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "floor": "(T(fwd+bwd) + T(extra matmuls/convolutions alone)) / T(fwd+bwd), same run"}
    (args.out / "bench_core.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args.out / "bench_core.png")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k.startswith("R_")]
    fig, ax = plt.subplots(figsize=(14, 4))
    labels = [f"{r['net'].replace('sb3_mlp17_', '')}\nw{r['width']}\nC{r['classes']}\nN{r['batch']}" for r in rows]
    for i, key in enumerate(keys):
        ax.bar([j + i * 0.8 / len(keys) for j in range(len(rows))], [r.get(key, float("nan")) for r in rows],
               width=0.8 / len(keys), label=key[2:])
    ax.scatter(range(len(rows)), [r["floor"] for r in rows], color="k", marker="_", s=200, zorder=3, label="floor")
    ax.set_xticks(range(len(rows)), labels, fontsize=5)
    ax.set_ylabel("time / (forward + backward)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
