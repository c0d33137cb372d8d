"""Cost of one optimizer step of hesscale.optim relative to torch.optim.Adam(foreach=True).

Usage: python scripts/bench_optim.py [--reps 25] [--quick]

One torch thread. For each network size, every optimizer gets its own copy of the same
parameters, gradients and ``hess_diag`` (fixed, never cleared), then the optimizers are timed
interleaved in a shuffled order per repetition (a block of steps each), after a warm-up. Time is
the thread's CPU time (``time.thread_time``), so that other processes on a shared machine do not
count against whichever optimizer happened to be running. Reported are medians over repetitions
of the per-repetition ratio to Adam measured in that repetition, and the StepSizeScaling overhead
``(T(scaled X) − T(X)) / T(Adam)``. Writes docs/results/bench_optim.json and
docs/results/bench_optim.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hesscale.optim import AdaHesScale, StepSizeScaling  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"

# name -> layer widths of a tanh MLP (weights and biases are the parameters)
NETWORKS: dict[str, list[int]] = {
    "ppo actor+critic 17-64-64-(6|1)": [],  # SB3's default MuJoCo PPO nets (+ log_std), built below
    "sac actor 17-256-256-12": [17, 256, 256, 12],
    "mlp 64-512x4-100": [64, 512, 512, 512, 512, 100],  # the paper's cost benchmark shape
    "mlp 784-512-512-10": [784, 512, 512, 10],
}


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


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        q.hess_diag = p.hess_diag.clone()
        out.append(q)
    return out


BUILDERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
    "AdaHesScale": lambda ps: AdaHesScale(ps, lr=1e-3),
    "Scaled Adam": lambda ps: StepSizeScaling(torch.optim.Adam(ps, lr=1e-3, foreach=True)),
    "Scaled AdaHesScale": lambda ps: StepSizeScaling(AdaHesScale(ps, lr=1e-3)),
}


def time_block(opt: torch.optim.Optimizer, steps: int) -> float:
    t0 = time.thread_time()
    for _ in range(steps):
        opt.step()
    return (time.thread_time() - t0) / steps


def bench_network(name: str, reps: int, target_s: float) -> dict:
    base = make_params(name)
    opts = {k: build(clone_params(base)) for k, build in BUILDERS.items()}
    for opt in opts.values():  # warm-up (state allocation, caches)
        time_block(opt, 5)
    # steps per block so that one Adam block takes about target_s
    per_step = time_block(opts["Adam"], 20)
    steps = max(5, int(target_s / max(per_step, 1e-7)))
    times: dict[str, list[float]] = {k: [] for k in opts}
    order = list(opts)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            times[k].append(time_block(opts[k], steps))
    ratio = {k: statistics.median(t / a for t, a in zip(times[k], times["Adam"])) for k in opts}
    overhead = {
        "Scaled Adam": statistics.median(
            (s - a) / a for s, a in zip(times["Scaled Adam"], times["Adam"])
        ),
        "Scaled AdaHesScale": statistics.median(
            (s - h) / a for s, h, a in zip(times["Scaled AdaHesScale"], times["AdaHesScale"], times["Adam"])
        ),
    }
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
    methods = list(BUILDERS)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [r["ratio_to_adam"][m] for r in results], width, label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.2, color="tab:orange", lw=0.8, ls="--", label="AdaHesScale target 1.2")
    ax.axhline(2.0, color="tab:green", lw=0.8, ls=":", label="Scaled Adam target 2.0 (≤ 1 Adam step added)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\n({r['n_params']:,} params)" for n, r in zip(names, results)], fontsize=8)
    ax.set_ylabel("step time / Adam(foreach) step time")
    ax.set_title("Optimizer step cost vs Adam (1 CPU thread, thread CPU time, median ratio)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=25, help="timed repetitions per optimizer (>= 20)")
    parser.add_argument("--block-ms", type=float, default=20.0, help="length of one timed block of Adam steps")
    parser.add_argument("--quick", action="store_true", help="smoke run (few repetitions, no files)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reps = 3 if args.quick else args.reps
    results = [bench_network(n, reps, args.block_ms / 1e3) for n in NETWORKS]

    header = f"{'network':34} {'params':>9} " + " ".join(f"{m:>18}" for m in BUILDERS)
    print("step time / Adam(foreach=True) step time, median over", reps, "interleaved repetitions, 1 thread")
    print(header)
    for r in results:
        print(f"{r['network']:34} {r['n_params']:>9,} " + " ".join(f"{r['ratio_to_adam'][m]:>18.2f}" for m in BUILDERS))
    print("\nStepSizeScaling overhead, in Adam steps: (T(scaled X) - T(X)) / T(Adam)")
    for r in results:
        o = r["scaling_overhead_in_adam_steps"]
        print(f"{r['network']:34} wrapping Adam: {o['Scaled Adam']:.2f}   wrapping AdaHesScale: {o['Scaled AdaHesScale']:.2f}")
    if args.quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "clock": "time.thread_time (CPU time of the timing thread)",
        "reps": reps,
        "command": "python scripts/bench_optim.py " + " ".join(sys.argv[1:]),
    }
    (RESULTS / "bench_optim.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, RESULTS / "bench_optim.png")
    print(f"\nwrote {RESULTS / 'bench_optim.json'} and {RESULTS / 'bench_optim.png'}")


if __name__ == "__main__":
    main()
