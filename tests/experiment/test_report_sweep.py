"""The multi-seed report on a synthetic sweep: curves, step-size sensitivity, tables, TB reading."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from agents.experiment.report import find_runs, load_curve, main, make_report
from agents.experiment.results import eval_summary

LRS = (1e-4, 1e-3, 1e-2)
OPTS = ("adam", "hesscale")
SEEDS = (0, 1, 2)
STEPS = np.arange(100, 1001, 100)


def _run(root: Path, env: str, opt: str, lr: float, seed: int, status: str = "finished",
         div_step: int | None = None, evals: bool = True) -> Path:
    d = root / env / "ppo" / f"{opt}_lr{lr}" / f"seed{seed}"
    d.mkdir(parents=True)
    rng = np.random.default_rng(zlib.crc32(f"{env}{opt}{lr}{seed}".encode()))
    slope = (2.0 if opt == "hesscale" else 1.0) * (1.0 - abs(np.log10(lr) + 3) / 3)
    steps = STEPS if div_step is None else STEPS[STEPS <= div_step]
    if evals and len(steps):
        res = slope * steps[:, None] / 100 + rng.normal(0, 0.5, (len(steps), 3))
        np.savez(d / "evaluations.npz", timesteps=steps, results=res, ep_lengths=np.ones_like(res))
    r = {"status": status, "env": env, "env_id": env, "agent": "ppo", "opt": opt, "lr": lr, "seed": seed,
         "variant": "", "total_timesteps": 1000,
         "divergence": {"step": div_step, "reason": "nan loss"} if status == "diverged" else None}
    (d / "result.json").write_text(json.dumps(r))
    return d


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for env in ("pendulum", "hopper"):
        for opt in OPTS:
            for lr in LRS:
                for seed in SEEDS:
                    if (opt, lr, seed) == ("adam", 1e-2, 0):
                        _run(root, env, opt, lr, seed, "diverged", div_step=400)
                    elif (opt, lr, seed) == ("adam", 1e-2, 1):
                        _run(root, env, opt, lr, seed, "diverged", div_step=50, evals=False)
                    elif (opt, lr, seed) == ("hesscale", 1e-4, 2):
                        _run(root, env, opt, lr, seed, "failed", evals=False)
                    else:
                        _run(root, env, opt, lr, seed)
    (root / ".submitit").mkdir()  # ignored
    return root


def test_a_running_run_is_counted_but_left_out_of_the_statistics(sweep: Path):
    _run(sweep, "pendulum", "adam", 1e-3, 3, "running", evals=False)
    md = Path(make_report(sweep, reps=30, points=20)["table_md"]).read_text()
    assert "| pendulum | ppo | adam | 0.001 | 4 | 1 | 0 | 0 | 0,1,2 |" in md


def test_report_writes_pngs_and_tables(sweep: Path):
    out = make_report(sweep, reps=30, points=20)
    assert out["runs"] == 2 * 2 * 3 * 3
    for k in ("curves", "sensitivity", "table_md", "table_csv"):
        assert Path(out[k]).is_file() and Path(out[k]).stat().st_size > 0, k
    assert Path(out["curves"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    t = out["table"]
    assert len(t) == 2 * 2 * 3
    cell = t[(t.env == "hopper") & (t.opt == "adam") & (t.lr == 1e-2)].iloc[0]
    assert (cell.runs, cell.diverged, cell.failed, cell.finished) == (3, 2, 0, 1)
    failed = t[(t.env == "hopper") & (t.opt == "hesscale") & (t.lr == 1e-4)].iloc[0]
    assert failed.failed == 1 and failed.seeds == "0,1"
    good = t[(t.env == "hopper") & (t.opt == "hesscale") & (t.lr == 1e-3)].iloc[0]
    assert good.final_iqm_lo <= good.final_iqm <= good.final_iqm_hi
    assert good.final_mean_lo <= good.final_mean <= good.final_mean_hi
    # diverged runs score the env's floor after diverging: the cell is the worst at lr=1e-2
    assert cell.auc_iqm < t[(t.env == "hopper") & (t.opt == "hesscale") & (t.lr == 1e-2)].iloc[0].auc_iqm
    md = Path(out["table_md"]).read_text()
    assert "final IQM [95% CI]" in md and md.count("\n| pendulum") == 6
    # a row says which seeds its statistics hold and how many runs are still running
    assert "| hopper | ppo | hesscale | 0.0001 | 3 | 0 | 0 | 1 | 0,1 |" in md
    csv = Path(out["table_csv"]).read_text().splitlines()
    assert csv[0].startswith("env,agent,opt,lr,variant,runs,finished,diverged,failed")
    assert len(csv) == 13


def test_no_sensitivity_plot_without_lr_variation(tmp_path: Path):
    for opt in OPTS:
        for seed in SEEDS:
            _run(tmp_path, "pendulum", opt, 1e-3, seed)
    out = make_report(tmp_path, reps=10, points=10)
    assert out["sensitivity"] is None and Path(out["curves"]).is_file()


def test_cli_report_and_errors(sweep: Path, tmp_path: Path, capsys):
    assert main([str(sweep), "--reps", "10", "--points", "10", "--out", str(tmp_path / "rep")]) == 0
    txt = capsys.readouterr().out
    assert "36 runs" in txt and "4 diverged" in txt and "2 failed" in txt
    assert (tmp_path / "rep" / "sensitivity.png").is_file()
    assert main([str(tmp_path / "nothing-here")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no runs found" in capsys.readouterr().err


def test_tensorboard_source(tmp_path: Path):
    from torch.utils.tensorboard import SummaryWriter

    d = _run(tmp_path, "pendulum", "adam", 1e-3, 0, evals=False)
    w = SummaryWriter(str(d / "tb"))
    for s in (100, 200, 300):
        w.add_scalar("rollout/ep_rew_mean", -s, s)
        w.add_scalar("eval/mean_reward", s / 10, s)
    w.close()
    steps, vals = load_curve(find_runs(tmp_path)[0], "tb")
    assert steps.tolist() == [100, 200, 300] and vals.tolist() == [10, 20, 30]
    steps, vals = load_curve(find_runs(tmp_path)[0], "auto")  # no evaluations.npz: TB
    assert vals.tolist() == [10, 20, 30]
    out = make_report(tmp_path, reps=0, source="tb", points=5)
    assert out["table"].iloc[0].final_iqm == pytest.approx(30)


def test_eval_summary_auc(tmp_path: Path):
    np.savez(tmp_path / "evaluations.npz", timesteps=np.array([0, 10, 20]),
             results=np.array([[0.0, 0.0], [10.0, 10.0], [10.0, 30.0]]), ep_lengths=np.ones((3, 2)))
    s = eval_summary(tmp_path)
    assert s["final_return"] == 20 and s["n_evaluations"] == 3
    assert s["auc_return"] == pytest.approx((5 * 10 + 15 * 10) / 20)


def test_stability_over_learning_rates_and_two_sweep_dirs(sweep: Path, tmp_path: Path):
    """stability.md: per (env, agent, opt, variant) the averaged return at each lr equals the main
    table's IQM of that cell, worst ÷ best is their min over max, and a group is stable only without
    divergence and at ≥ 0.8; two sweep directories (two stages of a study) report as one."""
    import shutil

    from agents.experiment.report_stability import stability_table

    out = make_report(sweep, reps=10, points=20)
    table, md = out["table"], Path(out["stability"]).read_text()
    df_table = stability_table(_collected(sweep))
    assert len(df_table) == 2 * 2  # (env, opt); one agent, one variant
    for _, r in df_table.iterrows():
        cells = table[(table.env == r.env) & (table.opt == r.opt)].sort_values("lr")
        assert r.lrs == list(cells.lr) == list(LRS)
        assert np.allclose(r.auc_by_lr, cells.auc_iqm)
        assert r.worst_over_best == pytest.approx(min(cells.auc_iqm) / max(cells.auc_iqm))
        assert r.diverged == cells.diverged.sum()
        assert r.stable == (r.diverged == 0 and r.worst_over_best >= 0.8)
    adam = df_table[(df_table.env == "hopper") & (df_table.opt == "adam")].iloc[0]
    assert adam.diverged == 2 and not adam.stable
    assert "worst ÷ best" in md and md.count("\n| hopper") == 2
    flat = tmp_path / "flat"  # lr 1e-3 and 2e-3: slopes 1 and 0.9, so about 0.9 of the best
    for lr in (1e-3, 2e-3):
        for seed in SEEDS:
            _run(flat, "hopper", "hesscale", lr, seed)
    (r,) = stability_table(_collected(flat)).itertuples()
    assert 0.8 <= r.worst_over_best < 1 and r.stable
    # the same runs split over two directories
    a, b = tmp_path / "stage1", tmp_path / "stage3"
    for run in find_runs(sweep):
        rel = Path(run["run_dir"]).relative_to(sweep)
        shutil.copytree(run["run_dir"], (a if run["lr"] == LRS[0] else b) / rel)
    split = make_report([a, b], reps=10, points=20)
    assert Path(split["stability"]).parent == a / "report"
    assert Path(split["stability"]).read_text() == md
    assert main([str(a), str(b), "--reps", "10", "--points", "20", "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "stability.md").read_text() == md


def _collected(root: Path):
    from agents.experiment.report import collect

    return collect(find_runs(root), "auto", 20)[0]
