"""benchmarks.tabular_imputation (its scores against hand-made imputations, a full run on a tiny German
model) and benchmarks.tabular_seeds (per-seed reports and their summary)."""

import json

import numpy as np
import pytest
import torch

from tabular.api import TabularDiffusion
from tabular.data import load_dataset
from tabular.schema import infer_schema


def test_scores_of_the_truth_and_of_a_point_imputer():
    from benchmarks.tabular_imputation import IMPUTERS, hide_cells, mean_mode_impute, score

    assert IMPUTERS[0] == "cdtd"
    train, test, spec = load_dataset("german")
    schema = infer_schema(train, list(spec.categorical))
    rng = np.random.default_rng(0)
    hide = hide_cells(test, schema.names, 0.3, rng)
    assert 0.25 < hide.to_numpy().mean() < 0.35
    perfect = score(test, [test, test], hide, schema, train)
    assert perfect["acc"] == perfect["acc_vote"] == 1.0
    assert perfect["nrmse"] == perfect["nrmse_median"] == perfect["tv"] == perfect["ks"] == 0.0
    point = mean_mode_impute(test.mask(hide), train, schema)
    assert not point.isna().to_numpy().any()
    r = score(test, [point], hide, schema, train)
    # a point mass is far from the hidden values' distribution; its RMSE is about one training sd
    assert r["ks"] > 0.3 and r["tv"] > 0.2 and 0.7 < r["nrmse"] < 1.3
    col = r["columns"]["duration"]
    true = test["duration"][hide["duration"]].to_numpy()
    assert col["cells"] == len(true)
    assert col["nrmse"] == pytest.approx(np.sqrt(np.mean((train["duration"].mean() - true) ** 2))
                                         / train["duration"].std(), rel=0.02)  # the mean is rounded


def test_imputation_benchmark_on_a_tiny_model(tmp_path, capsys):
    from benchmarks.tabular_imputation import main

    train, _, spec = load_dataset("german")
    torch.manual_seed(0)
    m = TabularDiffusion(steps=150, warmup_steps=10, hidden=64, mlp_layers=2, emb_dim=8, batch_size=128,
                         progress=False, sample_steps=8, calibration_rows=1000, calibration_rounds=2)
    m.fit(train, categorical=list(spec.categorical)).save(tmp_path / "m")
    assert main(["--model", str(tmp_path / "m"), "--data", "german", "--rows", "120", "--draws", "2",
                 "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "120 holdout rows" in out and "gaussian_copula" in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["rows"] == 120 and r["draws"] == 2 and r["calibrated"]
    assert set(r["imputers"]) == {"cdtd", "cdtd_uncalibrated", "gaussian_copula", "hot_deck", "mean_mode"}
    assert 0.1 < r["hidden_cells"] / (120 * len(m.schema.names)) < 0.3
    for name, res in r["imputers"].items():
        assert 0 <= res["acc"] <= 1 and res["nrmse"] > 0, name
    # drawing from the marginal keeps the hidden cells' distribution far better than a point mass
    assert r["imputers"]["hot_deck"]["tv"] < r["imputers"]["mean_mode"]["tv"]
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "m"), "--data", "german", "--rate", "1.5"])


def test_seeds_benchmark_summarises_each_seed(tmp_path, capsys):
    """benchmarks.tabular_seeds: per-seed figures as the fidelity report computes them, their mean and sd."""
    from benchmarks.tabular_seeds import main, summarise

    s = summarise([{"a": 1.0, "b": None}, {"a": 3.0, "b": None}])
    assert s == {"a": {"mean": 2.0, "sd": pytest.approx(np.sqrt(2.0))}}
    train, _, spec = load_dataset("german")
    torch.manual_seed(0)
    m = TabularDiffusion(steps=60, warmup_steps=10, hidden=32, mlp_layers=1, emb_dim=4, batch_size=128,
                         progress=False, sample_steps=4, calibration_rows=0)
    m.fit(train, categorical=list(spec.categorical)).save(tmp_path / "run" / "model")
    assert main(["--data", "german", "--seeds", "2", "--first-seed", "5", "--model", str(tmp_path / "run" / "model"),
                 "--copula", "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["seeds"] == [5, 6] and set(r["models"]) == {"run", "gaussian_copula"}
    rows = r["models"]["run"]["per_seed"]
    assert len(rows) == 2 and rows[0] != rows[1]  # different samples
    for row in rows:
        assert row["mle_gap"] == pytest.approx(r["real_mle"] - row["mle"])
        assert 0 <= row["dcr_share"] <= 1 and 0.4 <= row["detection_auc"] <= 1
    summ = r["models"]["run"]["summary"]["ks_mean"]
    assert summ["mean"] == pytest.approx(np.mean([x["ks_mean"] for x in rows]))
    assert "train-on-real auc" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--data", "german", "--model", f"a={tmp_path / 'run' / 'model'}", "--model", f"a={tmp_path / 'run' / 'model'}"])
