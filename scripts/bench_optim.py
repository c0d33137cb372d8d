"""Cost of one optimizer step of hesscale.optim relative to torch.optim.Adam(foreach=True).

Usage: python scripts/bench_optim.py [--reps 30] [--block-ms 10] [--baseline REV] [--quick]

One torch thread. For each network size, every arm gets its own copy of the same parameters,
gradients and ``hess_diag`` (fixed, never cleared), then the arms are timed interleaved in a
shuffled order per repetition (a block of steps each), after a warm-up. Time is the thread's CPU
time (``time.thread_time``), so that other processes on a shared machine do not count against
whichever arm happened to be running. Reported are medians over repetitions of per-repetition
ratios to Adam measured in that repetition, and the StepSizeScaling overhead
``(T(scaled X) − T(X)) / T(Adam)`` for X = Adam, RMSprop, SGD (momentum 0.9), AdaHesScale and
AdaHessian, "after" (this tree, fused route) beside "before": ``hesscale/optim`` as of git
revision ``--baseline`` (loaded from git into a temporary package), or this tree's snapshot
route (``fused=False``) without it. AdaHessian's gradients carry a graph that does not reach the
parameters (its Hutchinson product is then zero): the timed cost is its update, not a Hessian
product. Writes docs/results/bench_optim.json and docs/results/bench_optim.png.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import hesscale.optim as after  # noqa: E402

RESULTS = ROOT / "docs" / "results"
BASES = ("Adam", "RMSprop", "SGD", "AdaHesScale", "AdaHessian")

# name -> layer widths of an MLP (weights and biases are the parameters)
NETWORKS: dict[str, list[int]] = {
    "ppo actor+critic 17-64-64-(6|1)": [],  # SB3's default MuJoCo PPO nets (+ log_std), built below
    "sac actor 17-256-256-12": [17, 256, 256, 12],
    "mlp 64-512x4-100": [64, 512, 512, 512, 512, 100],  # the paper's cost benchmark shape
    "mlp 784-512-512-10": [784, 512, 512, 10],
}


def load_baseline(rev: str):
    """``hesscale/optim`` at git revision ``rev`` as a separate package (its imports are relative)."""
    pkg = Path(tempfile.mkdtemp()) / "hesscale_optim_baseline"
    pkg.mkdir()
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:hesscale/optim"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith(".py"):
            src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:hesscale/optim/{name}"],
                                 check=True, capture_output=True, text=True).stdout
            (pkg / name).write_text(src)
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module("hesscale_optim_baseline")


def make_params(name: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name.startswith("ppo"):
        shapes = [(64, 17), (64,), (64, 64), (64,), (6, 64), (6,), (6,)]  # policy + log_std
        shapes += [(64, 17), (64,), (64, 64), (64,), (1, 64), (1,)]  # value function
    else:
        w = NETWORKS[name]
        shapes = [s for i, o in zip(w[:-1], w[1:]) for s in ((o, i), (o,))]
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g) * 0.1)
        p.grad = torch.randn(s, generator=g)
        p.hess_diag = torch.randn(s, generator=g).abs()
        params.append(p)
    return params


def clone_params(params: list[torch.Tensor], graph: bool = False) -> list[torch.Tensor]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone().requires_grad_() * 1.0 if graph else p.grad.clone()  # AdaHessian: a graph
        q.hess_diag = p.hess_diag.clone()
        out.append(q)
    return out


def builders(mods: dict[str, object]) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    """Every arm: the unscaled bases, and each base scaled by the modules in ``mods`` (label → module)."""
    base = {
        "Adam": lambda m, ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        "RMSprop": lambda m, ps: torch.optim.RMSprop(ps, lr=7e-4, alpha=0.99, eps=1e-5),  # A2C's
        "SGD": lambda m, ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
        "AdaHesScale": lambda m, ps: m.AdaHesScale(ps, lr=1e-3),
        "AdaHessian": lambda m, ps: m.AdaHessian(ps, lr=1e-3),
    }
    arms = {name: (lambda ps, f=f: f(after, ps)) for name, f in base.items()}
    for name in ("AdaHesScale", "AdaHessian"):  # their own step changed too
        arms[f"{name} (before)"] = lambda ps, f=base[name]: f(mods["before"], ps)
    for label, m in mods.items():
        kw = {"fused": False} if label == "before" and m is after else {}
        for name, f in base.items():
            arms[f"Scaled {name} ({label})"] = lambda ps, f=f, m=m, kw=kw: m.StepSizeScaling(f(m, ps), **kw)
    return arms


def time_block(opt: torch.optim.Optimizer, steps: int) -> float:
    t0 = time.thread_time()
    for _ in range(steps):
        opt.step()
    return (time.thread_time() - t0) / steps


def bench_network(name: str, arms: dict, reps: int, target_s: float) -> dict:
    base = make_params(name)
    opts = {k: build(clone_params(base, graph="AdaHessian" in k)) for k, build in arms.items()}
    for opt in opts.values():  # warm-up (state allocation, caches)
        time_block(opt, 5)
    per_step = time_block(opts["Adam"], 20)  # steps per block so that one Adam block takes about target_s
    steps = max(5, int(target_s / max(per_step, 1e-7)))
    times: dict[str, list[float]] = {k: [] for k in opts}
    order = list(opts)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            times[k].append(time_block(opts[k], steps))
    adam = times["Adam"]
    ratio = {k: statistics.median(t / a for t, a in zip(times[k], adam)) for k in opts}
    overhead = {}
    for label in ("before", "after"):
        for b in BASES:
            plain = times[f"{b} (before)"] if label == "before" and f"{b} (before)" in times else times[b]
            scaled = times[f"Scaled {b} ({label})"]
            overhead.setdefault(b, {})[label] = statistics.median((s - x) / a for s, x, a in zip(scaled, plain, adam))
    return {
        "network": name,
        "n_params": sum(p.numel() for p in base),
        "n_tensors": len(base),
        "steps_per_block": steps,
        "median_step_us": {k: 1e6 * statistics.median(t) for k, t in times.items()},
        "ratio_to_adam": ratio,
        "scaling_overhead_in_adam_steps": overhead,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["network"] for r in results]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / (2 * len(BASES))
    for j, (b, label) in enumerate((b, lab) for b in BASES for lab in ("before", "after")):
        xs = [i + (j - (2 * len(BASES) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [r["scaling_overhead_in_adam_steps"][b][label] for r in results], width,
               label=f"{b} {label}", color=f"C{BASES.index(b)}", alpha=0.45 if label == "before" else 1.0)
    ax.axhline(0.5, color="k", lw=0.8, ls="--", label="target 0.5 (AdaHesScale, AdaHessian)")
    ax.axhline(0.8, color="k", lw=0.8, ls=":", label="target 0.8 (Adam, RMSprop, SGD)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n({r['n_params']:,} params)" for n, r in zip(names, results)], fontsize=8)
    ax.set_ylabel("(T(scaled X) − T(X)) / T(Adam)")
    ax.set_title("StepSizeScaling overhead in Adam steps, before/after (1 CPU thread, median of interleaved reps)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per arm (>= 20)")
    parser.add_argument("--block-ms", type=float, default=10.0, help="length of one timed block of Adam steps")
    parser.add_argument("--baseline", default=None, help="git revision of hesscale/optim for the 'before' arms "
                        "(default: this tree's snapshot route, fused=False)")
    parser.add_argument("--only", default="", help="only networks whose name contains this (no files)")
    parser.add_argument("--quick", action="store_true", help="smoke run (few repetitions, no files)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reps = 3 if args.quick else args.reps
    before = load_baseline(args.baseline) if args.baseline else after
    arms = builders({"before": before, "after": after})
    results = [bench_network(n, arms, reps, args.block_ms / 1e3) for n in NETWORKS if args.only in n]

    shown = ["AdaHesScale (before)", "AdaHesScale", "AdaHessian (before)", "AdaHessian"]
    print("step time / Adam(foreach=True) step time, median over", reps, "interleaved repetitions, 1 thread")
    print(f"{'network':34} {'params':>9} " + " ".join(f"{m:>21}" for m in shown))
    for r in results:
        print(f"{r['network']:34} {r['n_params']:>9,} " + " ".join(f"{r['ratio_to_adam'][m]:>21.2f}" for m in shown))
    print("\nStepSizeScaling overhead in Adam steps, (T(scaled X) - T(X)) / T(Adam): before -> after")
    print(f"{'network':34} " + " ".join(f"{b:>14}" for b in BASES))
    for r in results:
        o = r["scaling_overhead_in_adam_steps"]
        print(f"{r['network']:34} " + " ".join(f"{o[b]['before']:>6.2f} -> {o[b]['after']:<4.2f}" for b in BASES))
    if args.quick or args.only:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "clock": "time.thread_time (CPU time of the timing thread)",
        "reps": reps,
        "before": f"git {args.baseline}" if args.baseline else "this tree, fused=False",
        "command": "python scripts/bench_optim.py " + " ".join(sys.argv[1:]),
    }
    (RESULTS / "bench_optim.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, RESULTS / "bench_optim.png")
    print(f"\nwrote {RESULTS / 'bench_optim.json'} and {RESULTS / 'bench_optim.png'}")


if __name__ == "__main__":
    main()
