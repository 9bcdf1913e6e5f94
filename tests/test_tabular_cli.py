"""The CLI (CSV in, CSV out), the Hydra entry point's run and its config validation."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from tabular.api import TabularDiffusion
from tabular.cli import main as cli
from tabular.model import CDTDConfig
from tabular.train import REPO_CONFIGS, TabularDataConfig, TabularEvalConfig, TabularSamplerConfig, run


@pytest.fixture(scope="module")
def csv(tmp_path_factory):
    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.choice(["x", "y"], n), "n": rng.integers(0, 9, n)})
    df.loc[rng.random(n) < 0.1, "a"] = np.nan
    path = tmp_path_factory.mktemp("csv") / "t.csv"
    df.to_csv(path, index=False)
    return path, df


def test_cli_fit_sample_impute_report(csv, tmp_path, capsys):
    path, df = csv
    model = tmp_path / "m"
    assert cli(["fit", str(path), "--model", str(model), "--steps", "20", "--batch-size", "64", "--calibration-rows", "1000"]) == 0
    out = tmp_path / "s.csv"
    assert cli(["sample", "--model", str(model), "-n", "50", "--out", str(out), "--condition", "b=y",
                "--steps", "5"]) == 0
    s = pd.read_csv(out)
    assert list(s.columns) == ["a", "b", "n"] and len(s) == 50 and (s["b"] == "y").all()
    assert TabularDiffusion.load(model).calibration["rows"] == 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated for these steps first: no 'uncalibrated' warning
        assert cli(["sample", "--model", str(model), "-n", "50", "--out", str(tmp_path / "r.csv"), "--steps", "5",
                    "--recalibrate"]) == 0
    with pytest.warns(UserWarning, match="uncalibrated"):
        cli(["sample", "--model", str(model), "-n", "5", "--out", str(tmp_path / "u.csv"), "--steps", "5"])
    holes = df.iloc[:20].copy()
    holes.loc[:5, "b"] = None
    holes.to_csv(tmp_path / "h.csv", index=False)
    assert cli(["impute", "--model", str(model), "--input", str(tmp_path / "h.csv"), "--out",
                str(tmp_path / "f.csv")]) == 0
    filled = pd.read_csv(tmp_path / "f.csv")
    assert filled["b"].notna().all() and (filled["n"] == holes["n"]).all()
    assert cli(["report", "--real", str(path), "--holdout", str(path), "--synthetic", f"cdtd={out}",
                "--baseline", "--out", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert set(rep["models"]) == {"cdtd", "gaussian_copula"}
    # bad input: one line naming the column, exit code 2
    bad = df.copy().astype({"a": object})
    bad.loc[3, "a"] = "oops"
    bad.loc[4:, "a"] = bad.loc[4:, "a"].astype(str)
    bad.to_csv(tmp_path / "bad.csv", index=False)
    capsys.readouterr()
    assert cli(["fit", str(tmp_path / "bad.csv"), "--model", str(tmp_path / "m2"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "'a'" in err and "'oops'" in err


@pytest.mark.slow
def test_run_writes_csv_report_and_pngs(tmp_path):
    data = TabularDataConfig(name="german", max_train_rows=300)
    rep = run(CDTDConfig(hidden=32, mlp_layers=1, emb_dim=4), data, TabularSamplerConfig(steps=5, n_samples=300, calibration_rows=1000),
              TabularEvalConfig(), {"steps": 20, "batch_size": 64, "warmup_steps": 2, "progress": False}, tmp_path)
    for name in ("synthetic.csv", "copula.csv", "report.json", "marginals.png", "correlation_diff.png",
                 "model/model.safetensors", "model/tabular.json"):
        assert (tmp_path / name).is_file(), name
    assert set(rep["models"]) == {"cdtd", "gaussian_copula"} and rep["timing"]["sample_rows"] == 300
    assert len(pd.read_csv(tmp_path / "synthetic.csv")) == 300


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="data.name"):
        TabularDataConfig(name="nope").validate()
    with pytest.raises(ValueError, match="data.path"):
        TabularDataConfig(name="csv", path="/no/such.csv").validate()
    with pytest.raises(ValueError, match="data.task='regression' needs data.target"):
        TabularDataConfig(name="csv", path=__file__, task="regression").validate()
    with pytest.raises(ValueError, match="'adult' has its own .*'income'"):
        TabularDataConfig(name="adult", target="age").validate()
    with pytest.raises(ValueError, match="sampler.name"):
        TabularSamplerConfig(name="nope").validate()
    for name in ("time_limit_s", "cpu_time_limit_s"):
        with pytest.raises(ValueError, match=f"eval.{name}"):
            TabularEvalConfig(**{name: 0}).validate()
    assert (REPO_CONFIGS / "config.yaml").is_file()


@pytest.mark.slow
def test_hydra_entry_point_rejects_a_bad_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tabular.train", "data.name=nope", f"hydra.run.dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "data.name" in r.stderr


def test_bench_times_the_model_and_the_copula_side_by_side(tmp_path, capsys):
    from tabular.api import TabularDiffusion
    from tabular.bench import main as bench
    from tabular.data import load_dataset

    train, _, spec = load_dataset("german")
    m = TabularDiffusion(steps=5, warmup_steps=1, hidden=32, mlp_layers=1, emb_dim=4, batch_size=64, progress=False, calibration_rows=500,
                         sample_steps=3).fit(train.iloc[:200], categorical=list(spec.categorical))
    m.save(tmp_path / "m")
    capsys.readouterr()
    assert bench(["--model", str(tmp_path / "m"), "--data", "german", "-n", "50", "--batch-size", "20"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    res, base = json.loads(lines[0]), json.loads(lines[1])
    assert res["rows"] == 50 and res["steps"] == 3 and base["baseline"] == "gaussian_copula" and base["rows"] == 50
    assert lines[2].startswith("CDTD / copula sampling time for 50 rows")
    # the copula is fitted on the model's own data: a model of German credit against Adult is named
    with pytest.raises(SystemExit) as e:
        bench(["--model", str(tmp_path / "m"), "-n", "50"])
    assert e.value.code == 2 and "'adult'" in capsys.readouterr().err
    for bad, msg in ((["-n", "0"], "-n must be >= 1, got 0"), (["--data", "nope"], "'nope'")):
        with pytest.raises(SystemExit):
            bench(bad)
        assert msg in capsys.readouterr().err


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.filterwarnings("ignore:.*never seen in training")  # new.csv's 'z', before a later error
def test_cli_report_checks_holdout_and_synthetic_against_the_schema(csv, tmp_path, capsys):
    path, df = csv
    real, hold = df.iloc[:200], df.iloc[200:].reset_index(drop=True)
    real.to_csv(tmp_path / "real.csv", index=False)
    typo = hold.astype({"a": object})
    typo.loc[7, "a"] = "1,5"  # a decimal comma: pandas would turn it into NaN without a word
    typo.to_csv(tmp_path / "typo.csv", index=False)
    hold.drop(columns="n").to_csv(tmp_path / "short.csv", index=False)
    new = hold.copy()
    new.loc[:3, "b"] = "z"  # a category only the holdout has: counted in the report, not refused
    new.to_csv(tmp_path / "new.csv", index=False)
    base = ["report", "--real", str(tmp_path / "real.csv"), "--out", str(tmp_path / "rep")]
    cases = [(["--holdout", str(tmp_path / "typo.csv"), "--synthetic", str(tmp_path / "real.csv")],
              ("holdout", "typo.csv", "'a'", "'1,5'")),
             (["--holdout", str(tmp_path / "short.csv"), "--synthetic", str(tmp_path / "real.csv")],
              ("holdout", "'n'", "missing")),
             (["--holdout", str(tmp_path / "new.csv"), "--synthetic", f"s={tmp_path / 'short.csv'}"],
              ("synthetic", "short.csv", "'n'")),
             (["--holdout", str(tmp_path / "new.csv"), "--synthetic", str(tmp_path / "real.csv"), "--target", "b",
               "--task", "classification"], ("target 'b'", "'z'")),
             (["--holdout", str(tmp_path / "new.csv"), "--synthetic", str(tmp_path / "real.csv"), "--target", "nope",
               "--task", "regression"], ("'nope'",)),
             (["--holdout", str(tmp_path / "new.csv"), "--synthetic", str(tmp_path / "real.csv"), "--task",
               "regression"], ("--task regression needs --target",)),
             (["--holdout", str(tmp_path / "none.csv"), "--synthetic", str(tmp_path / "real.csv")],
              ("none.csv", "does not exist"))]
    for extra, names in cases:
        capsys.readouterr()
        assert cli(base + extra) == 2, extra
        err = _err(capsys)
        for name in names:
            assert name in err, (name, err)
    assert not (tmp_path / "rep").exists()
    with pytest.warns(UserWarning, match="'b': \\['z'\\]"):
        assert cli(base + ["--holdout", str(tmp_path / "new.csv"), "--synthetic", f"copy={tmp_path / 'real.csv'}",
                           "--target", "n", "--task", "regression"]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["holdout_check"]["unseen_categories"] == {"b": {"z": 4}}
    for target, task in (("b", "classification"), ("n", "regression")):  # no --task: the target's type decides
        assert cli(base[:-1] + [str(tmp_path / f"rep_{target}"), "--holdout", str(tmp_path / "real.csv"),
                                "--synthetic", str(tmp_path / "real.csv"), "--target", target]) == 0
        assert json.loads((tmp_path / f"rep_{target}" / "report.json").read_text())["task"] == task
    assert rep["synthetic_check"]["copy"]["unseen_categories"] == {}
    assert np.isfinite(rep["models"]["copy"]["mle"]["r2"])


def test_cli_argument_errors_exit_2_naming_them(csv, tmp_path, capsys):
    path, df = csv
    model = tmp_path / "m"
    assert cli(["fit", str(path), "--model", str(model), "--steps", "2", "--batch-size", "64", "--calibration-rows", "500"]) == 0
    sample = ["sample", "--model", str(model), "-n", "5", "--steps", "2"]
    cases = [(["sample", "--model", str(tmp_path / "nope"), "-n", "5", "--out", str(tmp_path / "s.csv")],
              ("--model", "nope", "is not a saved model")),
             (sample + ["--out", str(tmp_path / "s.csv"), "--condition", "b"], ("column=value", "'b'")),
             (sample + ["--out", str(tmp_path / "s.csv"), "--condition", "nope=1"], ("unknown column 'nope'",)),
             (sample + ["--out", str(tmp_path / "s.csv"), "--condition", "b=w"], ("'b'", "'w'")),
             (sample + ["--out", str(tmp_path / "no" / "s.csv")], ("--out", "does not exist")),
             (sample + ["--out", str(tmp_path)], ("--out", "is a directory")),
             (sample + ["--out", str(tmp_path / "s.csv"), "--condition", "n=2.5"], ("'n'", "2.5", "not an integer")),
             (sample + ["--out", str(tmp_path / "s.csv"), "--condition", "a=Infinity"], ("'a'", "infinite")),
             (["impute", "--model", str(model), "--input", str(tmp_path / "none.csv"), "--out",
               str(tmp_path / "f.csv")], ("none.csv", "does not exist"))]
    for argv, names in cases:
        capsys.readouterr()
        assert cli(argv) == 2, argv
        err = _err(capsys)
        for name in names:
            assert name in err, (name, err)
    for argv in (sample[:4] + ["0", "--out", str(tmp_path / "s.csv")], sample + ["--out", "x.csv", "--threads", "0"]):
        with pytest.raises(SystemExit) as e:  # argparse's own exit for a value it rejects
            cli(argv)
        assert e.value.code == 2 and "must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(sample[:4] + ["ten", "--out", str(tmp_path / "s.csv")])
    assert e.value.code == 2 and "expected a positive integer, got 'ten'" in capsys.readouterr().err
    for bad, msg in (("1.5", "must be in [0, 1), got 1.5"), ("lots", "expected a number in [0, 1), got 'lots'")):
        with pytest.raises(SystemExit) as e:
            cli(["fit", str(path), "--model", str(tmp_path / "d"), "--dropout", bad])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert cli(["fit", str(path), "--model", str(tmp_path / "d"), "--steps", "2", "--batch-size", "64",
                "--calibration-rows", "500", "--dropout", "0.2"]) == 0
    assert TabularDiffusion.load(tmp_path / "d").model.cfg.dropout == 0.2


def test_cli_keeps_the_traceback_of_an_internal_valueerror(csv, tmp_path, monkeypatch):
    """A ValueError from inside (a bug) is not bad input: it leaves main() as itself, so that
    ``python -m tabular.cli`` prints its traceback and exits 1, never 2."""
    import tabular.metrics
    from tabular.api import TabularDiffusion

    path, _ = csv

    def broken(*args, **kwargs):
        raise ValueError("internal bug")

    monkeypatch.setattr(TabularDiffusion, "_train", broken)
    with pytest.raises(ValueError, match="internal bug") as e:
        cli(["fit", str(path), "--model", str(tmp_path / "m"), "--steps", "2"])
    assert type(e.value) is ValueError
    monkeypatch.setattr(tabular.metrics, "fidelity_report", broken)
    with pytest.raises(ValueError, match="internal bug"):
        cli(["report", "--real", str(path), "--holdout", str(path), "--synthetic", str(path), "--out",
             str(tmp_path / "rep")])
    # and as a process: the traceback, exit code 1
    code = ("import sys, tabular.metrics as m\n"
            "def broken(*a, **k):\n    raise ValueError('internal bug')\n"
            "m.fidelity_report = broken\n"
            "from tabular.cli import main\n"
            f"sys.exit(main(['report', '--real', {str(path)!r}, '--holdout', {str(path)!r}, '--synthetic', "
            f"{str(path)!r}, '--out', {str(tmp_path / 'rep')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "internal bug" in r.stderr


def test_cli_report_takes_a_synthetic_path_with_an_equals_sign(csv, tmp_path):
    path, df = csv
    run = tmp_path / "runs" / "lr=0.001"  # a hydra-style run folder
    run.mkdir(parents=True)
    df.iloc[:200].to_csv(tmp_path / "real.csv", index=False)
    df.iloc[200:].to_csv(tmp_path / "hold.csv", index=False)
    df.iloc[:150].to_csv(run / "synth.csv", index=False)
    base = ["report", "--real", str(tmp_path / "real.csv"), "--holdout", str(tmp_path / "hold.csv")]
    for item, name in [(str(run / "synth.csv"), "synthetic_0"), (f"cdtd={run / 'synth.csv'}", "cdtd")]:
        out = tmp_path / f"rep_{name}"
        assert cli(base + ["--synthetic", item, "--out", str(out)]) == 0, item
        assert list(json.loads((out / "report.json").read_text())["models"]) == [name]


def test_cli_outputs_are_checked_before_the_work(csv, tmp_path, capsys, monkeypatch):
    """An output that cannot be written is named at once, not after a whole fit or report."""
    import tabular.metrics

    path, _ = csv
    taken = tmp_path / "taken"
    taken.write_text("a file the user keeps\n")

    def never(*args, **kwargs):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(TabularDiffusion, "_train", never)
    monkeypatch.setattr(tabular.metrics, "fidelity_report", never)
    for argv, names in ((["fit", str(path), "--model", str(taken), "--steps", "2"], ("--model", "existing file")),
                        (["report", "--real", str(path), "--holdout", str(path), "--synthetic", str(path), "--out",
                          str(taken)], ("--out", "existing file"))):
        capsys.readouterr()
        assert cli(argv) == 2, argv
        err = _err(capsys)
        for name in names:
            assert name in err and str(taken) in err, (name, err)
    assert taken.read_text() == "a file the user keeps\n"


def test_cli_writes_atomically_and_refuses_a_model_of_two_saves(csv, tmp_path, capsys, monkeypatch):
    """impute --out equal to --input: a write killed before its rename leaves the input as it was."""
    import os
    import shutil

    path, df = csv
    model = tmp_path / "m"
    assert cli(["fit", str(path), "--model", str(model), "--steps", "2", "--batch-size", "64",
                "--calibration-rows", "0"]) == 0
    holes = df.iloc[:20].copy()
    holes.loc[:5, "b"] = None
    data = tmp_path / "data.csv"
    holes.to_csv(data, index=False)
    before = data.read_bytes()
    real_replace = os.replace

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies with the new table written but not renamed

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        cli(["impute", "--model", str(model), "--input", str(data), "--out", str(data)])
    with pytest.raises(KeyboardInterrupt):
        cli(["sample", "--model", str(model), "-n", "5", "--out", str(data)])
    monkeypatch.setattr(os, "replace", real_replace)
    assert data.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["data.csv", "m"]
    assert cli(["impute", "--model", str(model), "--input", str(data), "--out", str(data)]) == 0
    assert pd.read_csv(data)["b"].notna().all()
    # weights of another save beside this tabular.json: named, exit 2
    other = tmp_path / "other"
    assert cli(["fit", str(path), "--model", str(other), "--steps", "2", "--batch-size", "64", "--seed", "1",
                "--calibration-rows", "0"]) == 0
    shutil.copy(other / "model.safetensors", model / "model.safetensors")
    capsys.readouterr()
    assert cli(["sample", "--model", str(model), "-n", "5", "--out", str(tmp_path / "s.csv")]) == 2
    assert "different saves" in _err(capsys)
