"""Multi-seed report of a sweep directory: learning curves, step-size sensitivity, tables.

``python scripts/report.py <sweep dir> [<sweep dir> ...] [--out DIR] [--reps 2000] [--source auto|eval|tb|train]``

Reads every run below the directories (``result.json`` + ``evaluations.npz``, or the TensorBoard
events through tbparse) and writes into ``<first sweep dir>/report/``. Runs with one or two evaluation
points are warned about; when all are that sparse, the training-episode returns
(``rollout/ep_rew_mean``) are used if denser (:func:`sparse_fallback`).

* ``curves.png`` -- evaluation return vs env steps, IQM over seeds with 95% stratified-bootstrap
  bands (rliable), one panel per (env, agent), one line per optimizer (at its best learning rate
  by area under the curve when the sweep varies it);
* ``sensitivity.png`` -- only when the learning rate varies: return averaged over the run
  (area under the curve / steps), min-max normalised per env, IQM and 95% CI over seeds, against
  the learning rate; cells with diverged runs are marked with a red x and "diverged/runs";
* ``table.md`` and ``table.csv`` -- per (env, agent, opt, lr, variant) cell: runs, finished,
  running, diverged, failed, the seeds in the statistics, IQM / mean of the final return with 95%
  CIs, IQM of the return averaged over the run with its CI;
* ``stability.md`` and ``stability.csv`` -- only when the learning rate varies: per (env, agent, opt,
  variant), the averaged return at each lr and worst ÷ best over the lrs
  (:mod:`agents.experiment.report_stability`);
* ``improvement.md`` and ``improvement.csv`` -- only when the challenger optimizer (``--challenger``,
  default ``hesscale``) and SB3's default optimizer both have runs: the probability of improvement
  of the first over the second per env and over all envs of an agent
  (:mod:`agents.experiment.report_improvement`).

Diverged runs stay in the statistics: after their divergence (and wherever their evaluation
return is not finite) they score the worst return seen in that env, the floor. Failed runs and
runs still running are left out and counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .report_improvement import improvement_markdown, improvement_table
from .report_runs import find_runs, load_curve, sparse_fallback
from .report_stability import stability_markdown, stability_table
from .report_stats import interval, iqm
from .results import DONE, RunStatus

CELL = ["env", "agent", "opt", "lr", "variant"]


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def _label(opt: str, variant: str) -> str:
    return f"{opt} [{variant}]" if variant else opt


def collect(runs: list[dict], source: str, points: int, notes: list[str] | None = None):
    """Per-run curves on a common step grid per (env, agent); final and averaged returns.

    ``notes`` collects the warnings of :func:`sparse_fallback` (``source="auto"``)."""
    import pandas as pd

    rows, curves = [], {}
    for r in runs:
        if r.get("status") not in DONE:
            continue
        c = load_curve(r, source)
        if c is None:
            continue
        curves[r["run_dir"]] = c
    if source == "auto":
        curves, found = sparse_fallback(curves, runs)
        if notes is not None:
            notes.extend(found)
    # floors (worst finite return seen in the env) and grids
    by_env: dict[str, list[float]] = {}
    span: dict[tuple, float] = {}
    start: dict[tuple, float] = {}
    for r in runs:
        c = curves.get(r["run_dir"])
        if c is None:
            continue
        vals = c[1][np.isfinite(c[1])]
        by_env.setdefault(r["env"], []).extend(vals.tolist())
        key = (r["env"], r["agent"])
        end = max(float(c[0][-1]), float(r.get("total_timesteps") or 0))
        span[key] = max(span.get(key, 0.0), end)
        start[key] = min(start.get(key, np.inf), float(c[0][0]))
    floor = {e: (min(v) if v else 0.0) for e, v in by_env.items()}
    grids = {k: np.linspace(min(start[k], v), v, points) for k, v in span.items()}
    for r in runs:
        base = {k: r.get(k) for k in CELL + ["seed", "status", "run_dir"]}
        c = curves.get(r["run_dir"])
        key = (r["env"], r["agent"])
        if c is None and r.get("status") == RunStatus.DIVERGED and key in grids:
            # diverged before its first evaluation: the floor all along
            y = np.full(len(grids[key]), floor[r["env"]])
            rows.append({**base, "final": float(y[-1]), "auc": float(y.mean()), "curve": y})
            continue
        if c is None:
            rows.append({**base, "final": np.nan, "auc": np.nan, "curve": None})
            continue
        steps, vals = c
        f = floor[r["env"]]
        vals = np.where(np.isfinite(vals), vals, f)
        grid = grids[(r["env"], r["agent"])]
        y = np.interp(grid, steps, vals)
        if r.get("status") == RunStatus.DIVERGED:
            div = (r.get("divergence") or {}).get("step")
            cut = float(div) if div is not None else float(steps[-1])
            y = np.where(grid > max(cut, float(steps[-1])) if div is None else grid > cut, f, y)
        rows.append({**base, "final": float(y[-1]), "auc": float(y.mean()), "curve": y})
    return pd.DataFrame(rows), grids, floor


def cell_table(df, reps: int, seed: int):
    import pandas as pd

    out = []
    for key, g in df.groupby(CELL, sort=True, dropna=False):
        ok = g[g["status"].isin([s.value for s in DONE]) & g["final"].notna()]
        row = dict(zip(CELL, key))
        row.update(runs=len(g), finished=int((g["status"] == RunStatus.FINISHED.value).sum()),
                   diverged=int((g["status"] == RunStatus.DIVERGED.value).sum()),
                   failed=int((g["status"] == RunStatus.FAILED.value).sum()),
                   running=int((g["status"] == "running").sum()),
                   seeds=",".join(str(s) for s in sorted(ok["seed"].tolist())))
        if len(ok):
            fin = ok["final"].to_numpy(float)[:, None]
            pt, ci = interval(fin, lambda x: np.array([iqm(x, None), np.mean(x)]), reps, seed)
            row.update(final_iqm=pt[0], final_iqm_lo=ci[0][0], final_iqm_hi=ci[1][0],
                       final_mean=pt[1], final_mean_lo=ci[0][1], final_mean_hi=ci[1][1])
            auc = ok["auc"].to_numpy(float)[:, None]
            pt, ci = interval(auc, lambda x: np.array([iqm(x, None)]), reps, seed)
            row.update(auc_iqm=pt[0], auc_iqm_lo=ci[0][0], auc_iqm_hi=ci[1][0])
        out.append(row)
    return pd.DataFrame(out)


def _markdown(table) -> str:
    def ci(r, k):
        v, lo, hi = r.get(k), r.get(k + "_lo"), r.get(k + "_hi")
        if v is None or not np.isfinite(v):
            return "–"
        if lo is None or not np.isfinite(lo):
            return f"{v:.1f}"
        return f"{v:.1f} [{lo:.1f}, {hi:.1f}]"

    one_variant = table["variant"].nunique() <= 1
    head = ["env", "agent", "opt", "lr"] + ([] if one_variant else ["variant"]) + ["runs", "running", "diverged",
            "failed", "seeds in the statistics", "final IQM [95% CI]", "final mean [95% CI]", "avg-over-run IQM [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if one_variant and len(table) and table["variant"].iloc[0]:
        lines.insert(0, f"All runs: `{table['variant'].iloc[0]}`\n")
    for _, r in table.iterrows():
        r = r.to_dict()
        lines.append("| " + " | ".join([
            str(r["env"]), str(r["agent"]), str(r["opt"]), _fmt_lr(float(r["lr"]))]
            + ([] if one_variant else [str(r["variant"] or "")])
            + [str(r["runs"]), str(r["running"]), str(r["diverged"]), str(r["failed"]), r["seeds"] or "–",
               ci(r, "final_iqm"), ci(r, "final_mean"), ci(r, "auc_iqm")]) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots
def _panels(keys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(keys)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def plot_curves(df, table, grids, out: Path, reps: int, seed: int) -> Path:
    ok = df[df["curve"].notna()]
    keys = sorted(grids)
    plt, fig, axes = _panels(keys)
    for ax, (env, agent) in zip(axes, keys):
        sub = ok[(ok["env"] == env) & (ok["agent"] == agent)]
        multi_lr = sub.groupby(["opt", "variant"])["lr"].nunique().max() > 1 if len(sub) else False
        one_variant = sub["variant"].nunique() <= 1
        for (opt, variant), g in sub.groupby(["opt", "variant"], sort=True):
            variant = "" if one_variant else variant
            if multi_lr:  # the learning rate with the best IQM of the averaged return
                best = g.groupby("lr")["auc"].apply(lambda s: iqm(s.to_numpy(float), None)).idxmax()
                g = g[g["lr"] == best]
            y = np.stack(g["curve"].to_list())[:, None, :]
            T = y.shape[-1]
            pt, ci = interval(y, lambda x: iqm(x.reshape(-1, T), 0), reps, seed)
            lab = _label(opt, variant) + (f" (lr={_fmt_lr(g['lr'].iloc[0])})" if multi_lr else "")
            lab += f", n={len(g)}"
            nd = int((g["status"] == RunStatus.DIVERGED.value).sum())
            if nd:
                lab += f", {nd} diverged"
            x = grids[(env, agent)]
            line, = ax.plot(x, pt, label=lab)
            if np.all(np.isfinite(ci)):
                ax.fill_between(x, ci[0], ci[1], alpha=0.2, color=line.get_color())
        ax.set_title(f"{env} · {agent}")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("evaluation return (IQM, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sensitivity(df, out: Path, reps: int, seed: int) -> Path | None:
    ok = df[df["auc"].notna()].copy()
    if ok.empty or ok.groupby(["env", "agent", "opt", "variant"])["lr"].nunique().max() < 2:
        return None
    lo = ok.groupby("env")["auc"].transform("min")
    hi = ok.groupby("env")["auc"].transform("max")
    ok["norm"] = np.where(hi > lo, (ok["auc"] - lo) / (hi - lo).where(hi > lo, 1.0), 0.5)
    keys = sorted({(e, a) for e, a in zip(ok["env"], ok["agent"])})
    plt, fig, axes = _panels(keys)
    for ax, (env, agent) in zip(axes, keys):
        sub = ok[(ok["env"] == env) & (ok["agent"] == agent)]
        one_variant = sub["variant"].nunique() <= 1
        for (opt, variant), g in sub.groupby(["opt", "variant"], sort=True):
            variant = "" if one_variant else variant
            lrs, pts, los, his, marks = [], [], [], [], []
            for lr, gl in g.groupby("lr", sort=True):
                v = gl["norm"].to_numpy(float)[:, None]
                pt, ci = interval(v, lambda x: np.array([iqm(x, None)]), reps, seed)
                lrs.append(lr)
                pts.append(pt[0])
                los.append(ci[0][0])
                his.append(ci[1][0])
                nd = int((gl["status"] == RunStatus.DIVERGED.value).sum())
                if nd:
                    marks.append((lr, pt[0], f"{nd}/{len(gl)}"))
            line, = ax.plot(lrs, pts, marker="o", label=_label(opt, variant))
            if np.all(np.isfinite(los)):
                ax.fill_between(lrs, los, his, alpha=0.2, color=line.get_color())
            for lr, p, txt in marks:
                ax.scatter([lr], [p], marker="x", color="red", s=60, zorder=5)
                ax.annotate(txt, (lr, p), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color="red")
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{env} · {agent}")
        ax.set_xlabel("learning rate (opt.lr)")
        ax.set_ylabel("return averaged over run\n(min–max normalised, IQM, 95% CI)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="x: diverged runs", title_fontsize=7)
    fig.tight_layout()
    path = out / "sensitivity.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- entry point
def make_report(root: Path | list[Path], out: Path | None = None, reps: int = 2000, source: str = "auto",
                points: int = 100, seed: int = 0, challenger: str = "hesscale") -> dict[str, Any]:
    """Write the report files for the runs below ``root`` (one sweep directory or several, e.g. two
    stages of a study; the report goes to the first one's ``report/`` unless ``out``); returns their
    paths and the table."""
    roots = [Path(r) for r in (root if isinstance(root, (list, tuple)) else [root])]
    runs = []
    for r in roots:
        if not r.is_dir():
            raise FileNotFoundError(f"{r}: no such directory")
        runs += find_runs(r)
    if not runs:
        raise FileNotFoundError(f"{', '.join(map(str, roots))}: no runs found (no result.json below it)")
    out = Path(out) if out is not None else roots[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    df, grids, _ = collect(runs, source, points, notes)
    table = cell_table(df, reps, seed)
    cols = [c for c in table.columns]
    table[cols].to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(_markdown(table))
    paths: dict[str, Any] = {"table_csv": out / "table.csv", "table_md": out / "table.md",
                             "curves": None, "sensitivity": None, "table": table, "runs": len(runs),
                             "warnings": notes, "improvement": None, "stability": None}
    stability = stability_table(df)
    if len(stability):
        stability.to_csv(out / "stability.csv", index=False)
        (out / "stability.md").write_text(stability_markdown(stability))
        paths["stability"] = out / "stability.md"
    improvement = improvement_table(df, challenger, reps, seed)
    if len(improvement):
        improvement.to_csv(out / "improvement.csv", index=False)
        (out / "improvement.md").write_text(improvement_markdown(improvement))
        paths["improvement"] = out / "improvement.md"
    if grids and df["curve"].notna().any():
        paths["curves"] = plot_curves(df, table, grids, out, reps, seed)
    paths["sensitivity"] = plot_sensitivity(df, out, reps, seed)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Learning curves, step-size sensitivity and tables of a sweep.")
    p.add_argument("sweep_dir", type=Path, nargs="+", help="one or more sweep directories, reported together")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <first sweep dir>/report)")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap repetitions (rliable)")
    p.add_argument("--source", choices=["auto", "eval", "tb", "train"], default="auto",
                   help="evaluations.npz (eval), TensorBoard events via tbparse (tb), training-episode "
                        "returns (train), or eval then tb, with train when every run has <= 2 evaluations")
    p.add_argument("--points", type=int, default=100, help="points of the common step grid")
    p.add_argument("--seed", type=int, default=0, help="bootstrap random seed")
    p.add_argument("--challenger", default="hesscale",
                   help="optimizer (opt= name) compared with SB3's default one in improvement.md")
    a = p.parse_args(argv)
    if a.reps < 0 or a.points < 2:
        print("error: --reps must be >= 0 and --points >= 2", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    try:
        r = make_report(a.sweep_dir, a.out, a.reps, a.source, a.points, a.seed, a.challenger)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in r["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    t = r["table"]
    print(f"{r['runs']} runs, {len(t)} cells, {int(t['diverged'].sum())} diverged, "
          f"{int(t['failed'].sum())} failed")
    for k in ("curves", "sensitivity", "table_md", "table_csv", "stability", "improvement"):
        if r[k] is not None:
            print(f"wrote {r[k]}")
    return 0
