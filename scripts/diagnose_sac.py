#!/usr/bin/env python
"""Why a curvature SAC learns or stalls: per-network numbers from a short training run (issue 11).

    python scripts/diagnose_sac.py --steps 6000 --out docs/results/defaults/diagnose_sac/hesscale.json \
        agent.kwargs.learning_starts=1000
    (any further arguments are config overrides, as for scripts/train.py; default agent=sac
    opt=hesscale env=halfcheetah tuned=none)

The run is built exactly as ``scripts/train.py`` builds it (same config, env, agent). Around every
optimizer step of each network (``actor``, ``critic``) it records, with θ the parameters before
and Δ the step taken:

1. ``alpha``: the trust region's α (``StepSizeScaling.last_scales``; 1 without scaling) and
   ``binds``: whether α < 1 (the share of updates where the trust region shortened the step);
2. ``step_norm`` ‖Δ‖ and ``adam_ratio`` ‖Δ‖ / ‖Δ_Adam‖, where Δ_Adam is the step of a shadow
   ``torch.optim.Adam`` (SB3's SAC Adam: eps 1e-8, same lr) fed the same gradient sequence at the
   same θ; ``adam_cos``: the cosine between Δ and Δ_Adam (1 = Adam's direction);
3. the spread of ĥ over the network's entries: quantiles of |ĥ| (10 / 50 / 90 %) and
   ``h_below_eps``: the share of entries whose ``sqrt(v)`` (AdaHesScale's denominator) is below its
   eps, i.e. where the step is lr·m/eps rather than curvature-scaled;
4. SAC's entropy coefficient α_ent (``ent_coef``) at each window's end.

Each quantity is summarised per window of ``--window`` updates (medians; ``binds`` as a share);
the JSON holds the windows, the overall summary and the command. The actor's curvature route
(``opt.actor_curvature``) is not compared here: with SB3's ReLU critics ``gn`` equals ``exact`` up
to rounding (``tests/agents/test_agents_curvature.py::test_sac_gn_equals_exact_for_relu_critics``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_OVERRIDES = ["agent=sac", "opt=hesscale", "env=halfcheetah", "tuned=none"]


def _flat(tensors) -> "torch.Tensor":  # noqa: F821
    import torch

    return torch.cat([t.reshape(-1) for t in tensors])


class StepProbe:
    """Wraps ``update.optimizer.step`` of one network; keeps one record per step."""

    def __init__(self, update, lr: float) -> None:
        import torch

        self.update = update
        self.params = [p for g in update.optimizer.param_groups for p in g["params"]]
        self.shadow = [p.detach().clone().requires_grad_(True) for p in self.params]
        self.adam = torch.optim.Adam(self.shadow, lr=lr)  # SB3's SAC optimizer (torch's eps=1e-8)
        opt = update.optimizer
        inner = getattr(opt, "optimizer", opt)  # the AdaHesScale inside StepSizeScaling
        self.eps = float(inner.param_groups[0].get("eps", 0.0))
        self.inner = inner
        self.records: list[dict] = []
        self._step = opt.step
        opt.step = self.step

    def step(self, *args, **kwargs):
        import torch

        theta = [p.detach().clone() for p in self.params]
        grads = [p.grad.detach().clone() for p in self.params]
        hess = [getattr(p, "hess_diag", None) for p in self.params]
        out = self._step(*args, **kwargs)
        with torch.no_grad():
            delta = _flat([p.detach() - t for p, t in zip(self.params, theta)])
            for s, t, g in zip(self.shadow, theta, grads):
                s.copy_(t)
                s.grad = g
        self.adam.step()
        with torch.no_grad():
            d_adam = _flat([s.detach() - t for s, t in zip(self.shadow, theta)])
            scales = getattr(self.update.optimizer, "last_scales", None) or {}
            alpha = float(next(iter(scales.values()))) if scales else 1.0
            rec = {"alpha": alpha, "binds": alpha < 1.0, "step_norm": float(delta.norm()),
                   "adam_ratio": float(delta.norm() / d_adam.norm().clamp_min(1e-30)),
                   "adam_cos": float(torch.dot(delta, d_adam) / (delta.norm() * d_adam.norm()).clamp_min(1e-30))}
            if all(h is not None for h in hess):
                h = _flat(hess).abs()
                q = torch.quantile(h[torch.randperm(h.numel())[:100_000]] if h.numel() > 100_000 else h,
                                   torch.tensor([0.1, 0.5, 0.9]))
                rec.update(h_q10=float(q[0]), h_q50=float(q[1]), h_q90=float(q[2]))
                vs = [self.inner.state[p].get("exp_avg_sq") for p in self.params]
                if self.eps and all(v is not None for v in vs):
                    step = int(self.inner.state[self.params[0]]["step"])
                    bc2 = 1.0 - self.inner.param_groups[0]["betas"][1] ** step
                    rec["h_below_eps"] = float(((_flat(vs) / bc2).sqrt() < self.eps).float().mean())
        self.records.append(rec)
        return out


def _summary(records: list[dict]) -> dict:
    keys = [k for k in records[0] if k != "binds"]
    out = {k: float(np.median([r[k] for r in records if k in r])) for k in keys}
    out["binds_share"] = float(np.mean([r["binds"] for r in records]))
    out["n_updates"] = len(records)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6000, help="env steps")
    ap.add_argument("--window", type=int, default=1000, help="updates per summary window")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args, overrides = ap.parse_known_args(argv)

    import torch
    from stable_baselines3.common.callbacks import BaseCallback

    from agents.experiment.build import build_model
    from agents.experiment.compose import compose_config
    from agents.experiment.envs import make_train_env
    from agents.experiment.validation import validate

    c = validate(compose_config([*DEFAULT_OVERRIDES, *overrides]))
    torch.set_num_threads(c["threads"])
    env = make_train_env(c)
    model = build_model(c, env)
    probes = {name: StepProbe(u, float(c["opt"]["lr"])) for name, u in model._updates.items()}
    ent = []

    class Ent(BaseCallback):
        def _on_step(self) -> bool:
            if model.log_ent_coef is not None and self.num_timesteps % 100 == 0:
                ent.append((self.num_timesteps, float(model.log_ent_coef.detach().exp())))
            return True

    t0 = time.perf_counter()
    model.learn(args.steps, callback=Ent())
    result = {"command": " ".join(["python scripts/diagnose_sac.py", *(argv or sys.argv[1:])]),
              "config": {"opt": c["opt"], "agent_kwargs": c["agent"]["kwargs"], "env": c["env"]["id"],
                         "seed": c["seed"]},
              "env_steps": args.steps, "wall_s": time.perf_counter() - t0, "divergence": model.divergence,
              "ent_coef": ent[-1][1] if ent else None, "networks": {}}
    for name, probe in probes.items():
        recs = probe.records
        windows = [dict(_summary(recs[i:i + args.window]), first_update=i,
                        ent_coef=next((e for s, e in ent if s >= c["agent"]["kwargs"].get("learning_starts", 100)
                                       + i + args.window), ent[-1][1] if ent else None))
                   for i in range(0, len(recs), args.window)]
        result["networks"][name] = {"overall": _summary(recs), "windows": windows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name, net in result["networks"].items():
        print(name, {k: round(v, 6) if isinstance(v, float) else v for k, v in net["overall"].items()})
    env.close()
    return result


if __name__ == "__main__":
    main()
