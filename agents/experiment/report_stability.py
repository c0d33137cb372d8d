"""Stability over the learning rate: is an optimizer's return flat across the learning rates swept?

For one (env, agent, opt, variant) run at learning rates ``lr_1 < … < lr_K`` (K ≥ 2), with ``A_k``
the IQM over seeds of the return averaged over the run at ``lr_k`` (diverged runs at their env's
floor after diverging, as in the main table, :func:`agents.experiment.report.collect`):

    worst ÷ best = min_k A_k / max_k A_k        stable  ⇔  no run diverged and worst ÷ best ≥ BAR

(issue 11's bar for a default: over [SB3's lr, 100 × SB3's lr], ``BAR = 0.8``). The ratio needs
returns of one sign; where the best ``A_k`` is not positive it is left out (``nan``, shown ``–``).
"""

from __future__ import annotations

import numpy as np

from .report_stats import iqm
from .results import RunStatus

GROUP = ["env", "agent", "opt", "variant"]
BAR = 0.8


def stability_table(df):
    """DataFrame with ``env, agent, opt, variant, lrs, auc_by_lr, seeds_by_lr, diverged,
    worst_over_best, stable`` for every group swept over ≥ 2 learning rates (empty if none);
    ``lrs`` and the ``*_by_lr`` columns are lists in increasing lr."""
    import pandas as pd

    ok = df[df["auc"].notna()]
    rows = []
    for key, g in ok.groupby(GROUP, sort=True, dropna=False):
        by_lr = sorted(g.groupby("lr"), key=lambda kv: kv[0])
        if len(by_lr) < 2:
            continue
        aucs = [float(iqm(gl["auc"].to_numpy(float), None)) for _, gl in by_lr]
        diverged = int((g["status"] == RunStatus.DIVERGED.value).sum())
        best = max(aucs)
        ratio = min(aucs) / best if best > 0 else float("nan")
        rows.append(dict(zip(GROUP, key), lrs=[float(lr) for lr, _ in by_lr], auc_by_lr=aucs,
                         seeds_by_lr=[len(gl) for _, gl in by_lr], diverged=diverged, worst_over_best=ratio,
                         stable=bool(diverged == 0 and np.isfinite(ratio) and ratio >= BAR)))
    return pd.DataFrame(rows)


def stability_markdown(table) -> str:
    """The table as Markdown: per group, the averaged return at each lr (with its seed count)."""
    head = ["env", "agent", "opt", "variant", "avg-over-run IQM at lr (seeds)", "diverged", "worst ÷ best",
            f"stable (no divergence, ≥ {BAR:g})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        per_lr = "; ".join(f"{lr:g}: {a:.1f} ({n})" for lr, a, n in zip(r["lrs"], r["auc_by_lr"], r["seeds_by_lr"]))
        ratio = "–" if not np.isfinite(r["worst_over_best"]) else f"{r['worst_over_best']:.2f}"
        lines.append("| " + " | ".join([str(r["env"]), str(r["agent"]), str(r["opt"]), str(r["variant"] or ""),
                                        per_lr, str(r["diverged"]), ratio,
                                        "–" if ratio == "–" else ("yes" if r["stable"] else "no")]) + " |")
    return "\n".join(lines) + "\n"
