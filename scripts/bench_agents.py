#!/usr/bin/env python
"""Speed of the agents' curvature path vs their first-order baseline (ratios, not absolute times).

For each algorithm on HalfCheetah-v5 (SB3's default hyperparameters, one env, one torch thread),
the first-order baseline (SB3's own optimizer and ``train()``) and Scaled AdaHesScale (HesScale
curvature, the paper's headline optimizer; SAC with ``actor_curvature`` "gn" and "exact") learn
from the same seed in one process, in lockstep: each arm learns a chunk (one rollout and its
``train()`` for PPO, 500 steps for A2C, 100 for SAC) in turn, so that this machine's drift falls on
both alike (:func:`paired_runs`). Per repetition it measures each arm's time spent in ``train()``
(the training phase) and its overall env-steps/s in ``learn()``, and reports the ratios curvature /
first-order (training phase: higher = slower; throughput: lower = slower) and their medians.

    python scripts/bench_agents.py                       # ~8 minutes on one core
    python scripts/bench_agents.py --reps 5 --algos ppo  # more repetitions, one algorithm

    python scripts/bench_agents.py --algos ppo_cnn sac_cnn  # NatureCNN on 84×84 fake images
    python scripts/bench_agents.py --algos sac_her          # HER, MultiInputPolicy, 36×36 image goals
    python scripts/bench_agents.py --algos ppo_zoo          # the main job (make train): RL Zoo's tuned PPO

Writes ``docs/results/bench_agents.json`` and ``docs/results/bench_agents.png``. Beside each
training-phase ratio it prints the **floor** ``(T(first-order train) + T(extra matmuls and
convolutions alone)) / T(first-order train)``: the sweep's extra products (per Linear
``D·(W∘W)``, ``Dᵀ(x∘x)``; per Conv the two backward kernels on ``W∘W`` and ``x∘x``) for every
captured call of the curvature run, timed on premade operands in the same process.
Targets (issue 12): training phase PPO and A2C ≤ 1.2×, SAC (``gn``) ≤ 1.3×, the main job's
(``ppo_zoo``: its configs, opt=adam against the shipped opt=hesscale) ≤ 1.1 × its floor; (issue 10) PPO
``CnnPolicy`` ≤ 1.8× (print the floor), SAC with an image critic ≤ 2× per gradient step.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch as th
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import agents  # noqa: E402
from stable_baselines3 import HerReplayBuffer  # noqa: E402
from stable_baselines3.common.envs import BitFlippingEnv, FakeImageEnv  # noqa: E402
import hesscale.sweep  # noqa: E402

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
#: the README's main job (``make train``), filled from the configs in :func:`main` (:func:`main_job`)
ARMS["ppo_zoo"] = {}
ARMS["ppo_cnn"] = ARMS["ppo"]
ARMS["sac_cnn"] = {"first_order": None, "scaled_adahesscale_gn": ARMS["sac"]["scaled_adahesscale_gn"]}
ARMS["sac_her"] = ARMS["sac_cnn"]
CLASSES = {"ppo": agents.PPO, "a2c": agents.A2C, "sac": agents.SAC, "ppo_cnn": agents.PPO, "sac_cnn": agents.SAC,
           "sac_her": agents.SAC, "ppo_zoo": agents.PPO}
POLICIES = {"ppo_cnn": "CnnPolicy", "sac_cnn": "CnnPolicy", "sac_her": "MultiInputPolicy"}
#: extra keyword arguments per algorithm (the CNN arms: small rollouts, NatureCNN is slow on a CPU)
EXTRA = {
    "sac": dict(learning_starts=100),
    "ppo_cnn": dict(n_steps=256, batch_size=64, n_epochs=2),
    "sac_cnn": dict(learning_starts=100, batch_size=64, buffer_size=1000),
    # SB3's own HER test with image observations (tests/test_her.py), where the critic's
    # th.cat([features, actions]) once cost one Hessian-vector product per feature (31x Adam)
    "sac_her": dict(learning_starts=100, batch_size=64, buffer_size=1000, policy_kwargs=dict(net_arch=[64]),
                    replay_buffer_class=HerReplayBuffer),
}


def main_job(opt: str) -> tuple[dict, dict | None]:
    """``(agent kwargs, optimizer spec)`` of the main job (``make train``: ``agent=ppo opt=<opt>
    env=halfcheetah``, RL Zoo's tuned PPO: 256×256 ReLU, n_steps 512, 20 epochs, its learning rate)
    as the configs resolve it; the environment stays unnormalised (no effect on ``train()``)."""
    from agents.experiment.build import agent_kwargs, optimizer_spec, policy_kwargs
    from agents.experiment.compose import compose_config
    from agents.experiment.validation import validate

    c = validate(compose_config(["agent=ppo", f"opt={opt}", "env=halfcheetah"]))
    kwargs = dict(agent_kwargs(c), policy_kwargs=policy_kwargs(c), learning_rate=float(c["opt"]["lr"]))
    return kwargs, optimizer_spec(c)


def _env(algo: str, env_id: str):
    if algo == "sac_her":
        return BitFlippingEnv(n_bits=10, continuous=True, image_obs_space=True)
    if not algo.endswith("_cnn"):
        return env_id
    return FakeImageEnv(action_dim=6, discrete=algo.startswith("ppo"))


class ExtraProducts:
    """Counts, per captured Linear / Conv2d call shape, how often the sweep ran (a patched
    ``capture.backward``), then times those calls' extra products alone."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._backward = hesscale.sweep.capture.backward

    def __enter__(self):
        counts, backward = self.counts, self._backward

        def counting(cap, *args, **kwargs):
            for call in cap._calls:
                if isinstance(call.module, (nn.Linear, nn.Conv2d)):
                    has_input = call.producer is not None or getattr(call, "chain", None) is not None
                    counts[(call.module, tuple(call.x.shape), has_input)] += 1  # the engine keeps no y
            return backward(cap, *args, **kwargs)

        hesscale.sweep.capture.backward = counting
        return self

    def __exit__(self, *exc):
        hesscale.sweep.capture.backward = self._backward

    def seconds(self, reps: int = 15) -> float:
        total = 0.0
        for (module, x_shape, has_input), count in self.counts.items():
            with th.no_grad():
                y_shape = module(th.zeros(x_shape)).shape
            d, x2, w2 = th.rand(y_shape), th.rand(x_shape), module.weight.detach().square()
            if isinstance(module, nn.Linear):
                d2, x22 = d.reshape(-1, d.shape[-1]), x2.reshape(-1, x2.shape[-1])
                ops = [lambda: d2.t().mm(x22)] + ([lambda: d2.mm(w2)] if has_input else [])
            else:
                opts = dict(stride=module.stride, padding=module.padding)
                ops = [lambda: th.nn.grad.conv2d_weight(x2, module.weight.shape, d, **opts)]
                if has_input:
                    ops.append(lambda: th.nn.grad.conv2d_input(x_shape, w2, d, **opts))
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                for op in ops:
                    op()
                times.append(time.perf_counter() - start)
            total += count * statistics.median(times)
        return total


def paired_runs(algo: str, arms: dict, env_id: str, steps: int, seed: int) -> dict[str, dict]:
    """One repetition: every arm's model (same seed) learns ``steps`` env steps in lockstep, each a
    chunk in turn (one rollout and its ``train()`` for PPO, 500 steps for A2C, 100 for SAC; the arm
    going first rotates), so that this machine's drift (±30 % over seconds) falls on all arms alike.
    Per arm: time inside ``train()``, time inside ``learn()``, env-steps/s and the extra products."""
    models, runs = {}, {}
    for arm, optimizer in arms.items():
        kwargs = dict(seed=seed, device="cpu", optimizer=optimizer, **EXTRA.get(algo, {}))
        model = models[arm] = CLASSES[algo](POLICIES.get(algo, "MlpPolicy"), _env(algo, env_id), **kwargs)
        run = runs[arm] = {"train_s": 0.0, "total_s": 0.0, "extra": ExtraProducts()}
        model.train = _timed(model.train, run)
    chunk = _chunk_steps(next(iter(models.values())))
    names = list(arms)
    for turn, done in enumerate(range(0, steps, chunk)):
        for arm in names[turn % len(names):] + names[:turn % len(names)]:
            run = runs[arm]
            start = time.perf_counter()
            with run["extra"]:
                models[arm].learn(min(chunk, steps - done), reset_num_timesteps=done == 0)
            run["total_s"] += time.perf_counter() - start
    results = {}
    for arm, run in runs.items():
        model, extra = models[arm], run.pop("extra")
        assert model.divergence is None, model.divergence
        results[arm] = {**run, "steps_per_s": model.num_timesteps / run["total_s"],
                        "extra_s": extra.seconds() if extra.counts else 0.0}
    return results


def _chunk_steps(model) -> int:
    """Env steps an arm learns per turn: whole rollouts, as many as fit in 500 steps (at least one),
    for on-policy agents; 100 (gradient steps) for off-policy ones."""
    if not hasattr(model, "n_steps"):
        return 100
    rollout = model.n_steps * model.n_envs
    return rollout * max(1, 500 // rollout)


def _timed(train, run: dict):
    def timed_train(*args, **kw):
        start = time.perf_counter()
        train(*args, **kw)
        run["train_s"] += time.perf_counter() - start

    return timed_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--algos", nargs="+", default=["ppo", "a2c", "sac"], choices=list(ARMS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ppo-steps", type=int, default=4096, help="2 rollouts of SB3's n_steps=2048")
    parser.add_argument("--a2c-steps", type=int, default=4000, help="800 updates of SB3's n_steps=5")
    parser.add_argument("--sac-steps", type=int, default=600, help="500 gradient steps after learning_starts=100")
    parser.add_argument("--ppo-cnn-steps", type=int, default=512, help="2 rollouts of n_steps=256 (CnnPolicy)")
    parser.add_argument("--sac-cnn-steps", type=int, default=130, help="30 gradient steps (CnnPolicy, batch 64)")
    parser.add_argument("--sac-her-steps", type=int, default=200, help="100 gradient steps (HER, batch 64)")
    parser.add_argument("--ppo-zoo-steps", type=int, default=1024, help="2 rollouts of the main job's n_steps=512")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "bench_agents.json"))
    args = parser.parse_args()
    th.set_num_threads(1)
    steps = {"ppo": args.ppo_steps, "a2c": args.a2c_steps, "sac": args.sac_steps,
             "ppo_cnn": args.ppo_cnn_steps, "sac_cnn": args.sac_cnn_steps, "sac_her": args.sac_her_steps,
             "ppo_zoo": args.ppo_zoo_steps}
    if "ppo_zoo" in args.algos:
        EXTRA["ppo_zoo"], hesscale_spec = main_job("hesscale")
        ARMS["ppo_zoo"].update(first_order=main_job("adam")[1], hesscale_default=hesscale_spec)

    # warm-up (imports, MuJoCo, allocator) — not measured
    for algo in args.algos:
        paired_runs(algo, ARMS[algo], args.env, {"ppo": 128, "a2c": 50, "sac": 130, "ppo_cnn": 256, "sac_cnn": 102,
                                                  "sac_her": 110, "ppo_zoo": 128}[algo], 0)

    results: dict = {}
    for algo in args.algos:
        runs = {arm: [] for arm in ARMS[algo]}
        for rep in range(args.reps):
            for arm, r in paired_runs(algo, ARMS[algo], args.env, steps[algo], seed=rep).items():
                runs[arm].append(r)
                print(f"{algo} rep {rep} {arm:26s} train {r['train_s']:7.2f}s  total {r['total_s']:7.2f}s  "
                      f"{r['steps_per_s']:7.1f} steps/s", flush=True)
        base = runs["first_order"]
        ratios = {}
        for arm in ARMS[algo]:
            if arm == "first_order":
                continue
            train_ratio = [c["train_s"] / b["train_s"] for c, b in zip(runs[arm], base)]
            speed_ratio = [c["steps_per_s"] / b["steps_per_s"] for c, b in zip(runs[arm], base)]
            floor = [(b["train_s"] + c["extra_s"]) / b["train_s"] for c, b in zip(runs[arm], base)]
            ratios[arm] = {
                "train_phase_ratio": train_ratio,
                "train_phase_ratio_median": statistics.median(train_ratio),
                "train_phase_floor": floor,
                "train_phase_floor_median": statistics.median(floor),
                "overall_steps_per_s_ratio": speed_ratio,
                "overall_steps_per_s_ratio_median": statistics.median(speed_ratio),
            }
        base_fraction = statistics.median(b["train_s"] / b["total_s"] for b in base)
        results[algo] = {"steps_per_run": steps[algo], "first_order_train_fraction": base_fraction, "ratios": ratios}

    print("\nmedian ratios (curvature / first-order), arms in lockstep, one thread:")
    print(f"{'algo':8s} {'arm':26s} {'train phase':>12s} {'floor':>6s} {'overall steps/s':>16s} {'f (FO train share)':>19s}")
    for algo, res in results.items():
        for arm, r in res["ratios"].items():
            print(f"{algo:8s} {arm:26s} {r['train_phase_ratio_median']:11.2f}x {r['train_phase_floor_median']:5.2f}x "
                  f"{r['overall_steps_per_s_ratio_median']:15.2f}x {res['first_order_train_fraction']:18.0%}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "env": args.env,
        "reps": args.reps,
        "threads": th.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": th.__version__,
        "note": "ratios of arms learning in lockstep in one process; train phase = time inside train(); "
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
        ax.set_title(f"{args.env}, median of {args.reps} repetitions (arms in lockstep), 1 thread")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
        print(f"wrote {out.with_suffix('.png')}")
    except Exception as exc:  # noqa: BLE001 - the plot is a convenience
        print(f"(no plot: {exc})")


if __name__ == "__main__":
    main()
