#!/usr/bin/env python
"""Speed of the agents' curvature path vs their first-order baseline (ratios, not absolute times).

For each algorithm on HalfCheetah-v5 (SB3's default hyperparameters, one env, one torch thread),
runs of the first-order baseline (SB3's own optimizer and ``train()``) and of Scaled AdaHesScale
(HesScale curvature, the paper's headline optimizer; SAC with ``actor_curvature`` "gn" and
"exact") alternate in one process, from the same seed. Per run it measures the time spent in
``train()`` (the training phase) and the overall env-steps/s of ``learn()``; it reports, per
repetition, the ratios curvature / first-order (training phase: higher = slower; throughput:
lower = slower) and their medians.

    python scripts/bench_agents.py                       # ~8 minutes on one core
    python scripts/bench_agents.py --reps 5 --algos ppo  # more repetitions, one algorithm

Writes ``docs/results/bench_agents.json`` and ``docs/results/bench_agents.png``.
Targets (issue 4): PPO and A2C training phase ≤ 2.0× and overall ≥ 0.7×; SAC overall ≥ 0.5×
with the cheaper actor curvature ("gn"); the exact route's cost is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch as th

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import agents  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCALED = {"name": "adahesscale", "kwargs": {"eps": 1e-5}, "scaling": {"enabled": True}}
ARMS = {
    "ppo": {"first_order": None, "scaled_adahesscale": SCALED},
    "a2c": {"first_order": None, "scaled_adahesscale": SCALED},
    "sac": {
        "first_order": None,
        "scaled_adahesscale_gn": {**SCALED, "actor_curvature": "gn"},
        "scaled_adahesscale_exact": {**SCALED, "actor_curvature": "exact"},
    },
}
CLASSES = {"ppo": agents.PPO, "a2c": agents.A2C, "sac": agents.SAC}


def one_run(algo: str, optimizer, env_id: str, steps: int, seed: int) -> dict:
    kwargs = dict(seed=seed, device="cpu", optimizer=optimizer)
    if algo == "sac":
        kwargs["learning_starts"] = 100
    model = CLASSES[algo]("MlpPolicy", env_id, **kwargs)
    train_time = [0.0]
    inner = model.train

    def timed_train(*args, **kw):
        start = time.perf_counter()
        inner(*args, **kw)
        train_time[0] += time.perf_counter() - start

    model.train = timed_train
    start = time.perf_counter()
    model.learn(steps)
    total = time.perf_counter() - start
    assert model.divergence is None, model.divergence
    return {"train_s": train_time[0], "total_s": total, "steps_per_s": model.num_timesteps / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--algos", nargs="+", default=["ppo", "a2c", "sac"], choices=list(ARMS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ppo-steps", type=int, default=4096, help="2 rollouts of SB3's n_steps=2048")
    parser.add_argument("--a2c-steps", type=int, default=4000, help="800 updates of SB3's n_steps=5")
    parser.add_argument("--sac-steps", type=int, default=600, help="500 gradient steps after learning_starts=100")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "bench_agents.json"))
    args = parser.parse_args()
    th.set_num_threads(1)
    steps = {"ppo": args.ppo_steps, "a2c": args.a2c_steps, "sac": args.sac_steps}

    # warm-up (imports, MuJoCo, allocator) — not measured
    for algo in args.algos:
        for opt in ARMS[algo].values():
            one_run(algo, opt, args.env, {"ppo": 128, "a2c": 50, "sac": 130}[algo], 0)

    results: dict = {}
    for algo in args.algos:
        runs = {arm: [] for arm in ARMS[algo]}
        for rep in range(args.reps):
            order = list(ARMS[algo].items())
            if rep % 2:  # alternate the order too
                order = order[::-1]
            for arm, opt in order:
                runs[arm].append(one_run(algo, opt, args.env, steps[algo], seed=rep))
                r = runs[arm][-1]
                print(f"{algo} rep {rep} {arm:26s} train {r['train_s']:7.2f}s  total {r['total_s']:7.2f}s  "
                      f"{r['steps_per_s']:7.1f} steps/s", flush=True)
        base = runs["first_order"]
        ratios = {}
        for arm in ARMS[algo]:
            if arm == "first_order":
                continue
            train_ratio = [c["train_s"] / b["train_s"] for c, b in zip(runs[arm], base)]
            speed_ratio = [c["steps_per_s"] / b["steps_per_s"] for c, b in zip(runs[arm], base)]
            ratios[arm] = {
                "train_phase_ratio": train_ratio,
                "train_phase_ratio_median": statistics.median(train_ratio),
                "overall_steps_per_s_ratio": speed_ratio,
                "overall_steps_per_s_ratio_median": statistics.median(speed_ratio),
            }
        base_fraction = statistics.median(b["train_s"] / b["total_s"] for b in base)
        results[algo] = {"steps_per_run": steps[algo], "first_order_train_fraction": base_fraction, "ratios": ratios}

    print("\nmedian ratios (curvature / first-order), alternating runs, one thread:")
    print(f"{'algo':5s} {'arm':26s} {'train phase':>12s} {'overall steps/s':>16s}")
    for algo, res in results.items():
        for arm, r in res["ratios"].items():
            print(f"{algo:5s} {arm:26s} {r['train_phase_ratio_median']:11.2f}x {r['overall_steps_per_s_ratio_median']:15.2f}x")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "env": args.env,
        "reps": args.reps,
        "threads": th.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": th.__version__,
        "note": "ratios of runs alternating in one process; train phase = time inside train(); "
        "first_order = SB3's own optimizer (Adam; A2C RMSprop) and train()",
        "results": results,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels, train, overall = [], [], []
        for algo, res in results.items():
            for arm, r in res["ratios"].items():
                labels.append(f"{algo}\n{arm.replace('scaled_adahesscale', 'scaled AHS')}")
                train.append(r["train_phase_ratio_median"])
                overall.append(r["overall_steps_per_s_ratio_median"])
        fig, ax = plt.subplots(figsize=(1.8 * len(labels) + 2, 3.5))
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], train, width=0.4, label="train phase time ratio")
        ax.bar([x + 0.2 for x in xs], overall, width=0.4, label="overall steps/s ratio")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("curvature / first-order")
        ax.set_title(f"{args.env}, median of {args.reps} alternating runs, 1 thread")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        print(f"wrote {out.with_suffix('.png')}")
    except Exception as exc:  # noqa: BLE001 - the plot is a convenience
        print(f"(no plot: {exc})")


if __name__ == "__main__":
    main()
