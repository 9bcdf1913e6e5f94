"""benchmarks.tabular_imputation on a tiny German model: the scoring against hand-made imputations,
and a full run that writes its JSON."""

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
