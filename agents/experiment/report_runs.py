"""Reading a sweep's runs for the report: ``result.json`` of each run and its curve.

A curve is ``(steps, mean return)``: the evaluations (``evaluations.npz``), the TensorBoard events
(``eval/mean_reward``, else ``rollout/ep_rew_mean``) or the training-episode returns
(``rollout/ep_rew_mean`` from ``progress.csv``). :func:`sparse_fallback` warns about runs with one or
two evaluation points and switches to the training-episode returns when every run is that sparse.
"""

from __future__ import annotations

import json
from pathlib import Path

from .results import read_evaluations

TRAIN_TAG = "rollout/ep_rew_mean"
TB_TAGS = ("eval/mean_reward", TRAIN_TAG)
SPARSE = 2  # evaluation points at or below which a curve is a warning

def find_runs(root: Path) -> list[dict]:
    """Every run (``result.json``) below ``root``, with its directory in ``run_dir``."""
    runs = []
    for p in sorted(Path(root).rglob("result.json")):
        if any(part.startswith(".") for part in p.relative_to(root).parts[:-1]):
            continue
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not all(k in r for k in ("env", "agent", "opt", "lr", "seed")):
            continue  # e.g. a config error before anything was built
        r["run_dir"] = str(p.parent)
        r.setdefault("variant", "")
        runs.append(r)
    return runs


def _curve_eval(run_dir: Path):
    evaluations = read_evaluations(run_dir)
    if evaluations is None:
        return None
    steps, results = evaluations
    return steps, results.mean(axis=1)


def _curve_tb(run_dir: Path, tags: tuple[str, ...] = TB_TAGS):
    tb = run_dir / "tb"
    if not tb.is_dir():
        return None
    from tbparse import SummaryReader

    df = SummaryReader(str(tb)).scalars
    if df is None or len(df) == 0:
        return None
    for tag in tags:
        sub = df[df["tag"] == tag].sort_values("step").drop_duplicates("step", keep="last")
        if len(sub):
            return sub["step"].to_numpy(float), sub["value"].to_numpy(float)
    return None


def _curve_train(run_dir: Path):
    """(steps, mean training-episode return): SB3's ``rollout/ep_rew_mean`` from ``progress.csv``,
    else from the TensorBoard events."""
    csv = run_dir / "tb" / "progress.csv"
    if csv.is_file():
        import pandas as pd

        try:
            df = pd.read_csv(csv)
        except (OSError, ValueError):
            df = None
        if df is not None and {"time/total_timesteps", TRAIN_TAG} <= set(df.columns):
            df = df[["time/total_timesteps", TRAIN_TAG]].dropna()
            if len(df):
                return df.iloc[:, 0].to_numpy(float), df.iloc[:, 1].to_numpy(float)
    return _curve_tb(run_dir, tags=(TRAIN_TAG,))


def load_curve(run: dict, source: str = "auto"):
    """(steps, mean return) of one run; ``source`` eval, tb, train or auto (eval, then tb)."""
    d = Path(run["run_dir"])
    if source == "eval":
        return _curve_eval(d)
    if source == "tb":
        return _curve_tb(d)
    if source == "train":
        return _curve_train(d)
    return _curve_eval(d) or _curve_tb(d)


def sparse_fallback(curves: dict, runs: list[dict]) -> tuple[dict, list[str]]:
    """With ``--source auto``: warn about runs with at most ``SPARSE`` evaluation points; when every
    run is that sparse and its training-episode returns are denser, use those instead (for all
    runs, so that they stay comparable). Returns the curves to use and the warnings."""
    sparse = [d for d, c in curves.items() if len(c[0]) <= SPARSE]
    if not sparse:
        return curves, []
    notes = [f"{len(sparse)} of {len(curves)} runs have only 1-{SPARSE} evaluation points "
             f"(e.g. {sparse[0]}): their curves are a line between at most {SPARSE} points; "
             "lower eval.freq for denser ones"]
    if len(sparse) < len(curves):
        return curves, notes
    train = {r["run_dir"]: _curve_train(Path(r["run_dir"])) for r in runs if r["run_dir"] in curves}
    if all(t is not None and len(t[0]) > len(curves[d][0]) for d, t in train.items()):
        notes.append(f"using the training-episode returns ({TRAIN_TAG}, progress.csv/TensorBoard) "
                     "for curves and final returns instead (--source eval keeps the evaluations)")
        return train, notes
    return curves, notes
