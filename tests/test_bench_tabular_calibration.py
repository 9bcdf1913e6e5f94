"""benchmarks.tabular_calibration on a tiny German model: runs, writes its JSON, and shows the calibration
bringing the categories' TV down towards the multinomial floor."""

import json

import pytest
import torch

from tabular.api import TabularDiffusion
from tabular.data import load_dataset


def test_calibration_benchmark_on_a_tiny_model(tmp_path, capsys):
    from benchmarks.tabular_calibration import main

    train, _, spec = load_dataset("german")
    torch.manual_seed(0)
    m = TabularDiffusion(steps=150, warmup_steps=10, hidden=64, mlp_layers=2, emb_dim=8, batch_size=128,
                         progress=False, sample_steps=8, calibration_rows=2000, calibration_rounds=6)
    m.fit(train, categorical=list(spec.categorical)).save(tmp_path / "m")
    assert main(["--model", str(tmp_path / "m"), "--data", "german", "--seeds", "2", "--out",
                 str(tmp_path / "r.json"), "--condition", "housing=own"]) == 0
    out = capsys.readouterr().out
    assert "calibrated / copula: KS" in out and "multinomial" in out
    r = json.loads((tmp_path / "r.json").read_text())
    mean = r["mean"]
    assert set(mean) == {"uncalibrated", "calibrated", "gaussian_copula", "multinomial_tv"}
    assert len(r["per_seed"]["calibrated"]) == 2 and r["calibration"]["rows"] == 2000
    assert mean["calibrated"]["tv"] < mean["uncalibrated"]["tv"]
    assert mean["calibrated"]["ks"] < mean["uncalibrated"]["ks"]
    assert 0 < mean["multinomial_tv"] < mean["calibrated"]["tv"]  # 800 rows: the floor is well above 0
    cond = r["conditional"]["housing=own"]
    assert cond["real_rows"] == int((train["housing"] == "own").sum()) > 0
    assert set(cond["calibrated"]) == {"ks", "tv"} and "given housing=own" in out
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "m"), "--data", "german", "--seeds", "1", "--condition", "housing=nowhere"])
