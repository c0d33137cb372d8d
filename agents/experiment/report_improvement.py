"""Probability of improvement of a challenger optimizer over SB3's default one (rliable).

For runs X of the challenger and Y of the baseline on task m (one env, same agent, learning rate
and variant), ``P(X_m > Y_m) = (1 / (n_x n_y)) Σ_i Σ_j [x_i > y_j] + ½ [x_i = y_j]`` (the
Mann-Whitney U statistic over n_x·n_y), averaged over the tasks of a row; 95% CIs come from
rliable's stratified independent bootstrap (runs resampled within each task and arm). A value
above 0.5 whose CI excludes 0.5 is an improvement. Scores are the return averaged over the run
(``auc``) and the final return (``final``), with diverged runs at their env's floor as in the
main table (:func:`agents.experiment.report.collect`).

Rows: one per (env, agent, lr, variant) where both arms have runs, plus ``all`` per agent over
its envs (each env contributes the same number of runs per arm: the first seeds in common).
"""

from __future__ import annotations

import numpy as np

from .report_stats import interval

SCORES = ("auc", "final")
PAIR = ["env", "agent", "lr", "variant"]


def baseline_opt(agent: str) -> str:
    """SB3's default optimizer of ``agent`` by its ``opt=`` name (PPO/SAC: adam, A2C: rmsprop)."""
    from agents.optimizers import SB3_DEFAULT_NAME

    return SB3_DEFAULT_NAME[agent]


def improvement_table(df, challenger: str, reps: int, seed: int):
    """DataFrame with ``env, agent, lr, variant, challenger, baseline, n_challenger, n_baseline``
    and, per score, ``poi_<score>``, ``poi_<score>_lo``, ``poi_<score>_hi`` (empty if no pair)."""
    import pandas as pd

    ok = df[df["final"].notna()]
    rows, per_agent = [], {}
    for key, g in ok.groupby(PAIR, sort=True, dropna=False):
        env, agent = key[0], key[1]
        base = baseline_opt(agent)
        x, y = g[g["opt"] == challenger].sort_values("seed"), g[g["opt"] == base].sort_values("seed")
        if challenger == base or x.empty or y.empty:
            continue
        row = dict(zip(PAIR, key), challenger=challenger, baseline=base, n_challenger=len(x),
                   n_baseline=len(y))
        for score in SCORES:
            row.update(_interval(score, [x[score].to_numpy(float)], [y[score].to_numpy(float)], reps, seed))
        rows.append(row)
        per_agent.setdefault(agent, []).append((x, y))
    for agent, pairs in sorted(per_agent.items()):
        if len(pairs) < 2:
            continue
        nx, ny = min(len(x) for x, _ in pairs), min(len(y) for _, y in pairs)
        row = dict(env="all", agent=agent, lr=np.nan, variant="", challenger=challenger,
                   baseline=baseline_opt(agent), n_challenger=nx, n_baseline=ny)
        for score in SCORES:
            row.update(_interval(score, [x[score].to_numpy(float)[:nx] for x, _ in pairs],
                                 [y[score].to_numpy(float)[:ny] for _, y in pairs], reps, seed))
        rows.append(row)
    return pd.DataFrame(rows)


def _interval(score: str, xs: list[np.ndarray], ys: list[np.ndarray], reps: int, seed: int) -> dict:
    """``poi_<score>`` and its 95% CI for tasks given as per-task run arrays of each arm."""
    from rliable import metrics

    X, Y = np.stack(xs, axis=1), np.stack(ys, axis=1)  # (runs, tasks)
    point, ci = interval((X, Y), metrics.probability_of_improvement, reps, seed)
    lo, hi = np.ravel(ci)
    return {f"poi_{score}": float(point), f"poi_{score}_lo": float(lo), f"poi_{score}_hi": float(hi)}


def improvement_markdown(table) -> str:
    """The table as Markdown (``–`` where a CI needs more than one run)."""
    def cell(r, k):
        v, lo, hi = r[k], r[k + "_lo"], r[k + "_hi"]
        return f"{v:.2f}" if not np.isfinite(lo) else f"{v:.2f} [{lo:.2f}, {hi:.2f}]"

    head = ["env", "agent", "lr", "challenger vs baseline", "runs", "P(improvement), avg over run [95% CI]",
            "P(improvement), final [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        lr = "" if not np.isfinite(r["lr"]) else f"{r['lr']:g}"
        env = str(r["env"]) + (f" [{r['variant']}]" if r["variant"] else "")
        lines.append("| " + " | ".join([env, str(r["agent"]), lr, f"{r['challenger']} vs {r['baseline']}",
                                        f"{r['n_challenger']} vs {r['n_baseline']}", cell(r, "poi_auc"),
                                        cell(r, "poi_final")]) + " |")
    return "\n".join(lines) + "\n"
