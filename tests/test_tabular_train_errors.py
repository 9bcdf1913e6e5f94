"""``python -m tabular.train``: bad user data exits with code 2 and one line naming it; any other
ValueError (a bug) keeps its traceback. The Hydra entry point runs in this process (argv patched) so
that the training code can be monkeypatched."""

import sys

import numpy as np
import pandas as pd
import pytest

from tabular.data import TableEncoder, load_csv
from tabular.model import CDTD
from tabular.schema import TabularInputError, infer_schema
from tabular.train import main


def _table(n=100):
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.choice(["x", "y"], n)})


def _run(monkeypatch, tmp_path, *overrides):
    """Run the entry point on ``overrides`` (smoke trainer, Hydra's logging off, run dir in tmp_path)."""
    argv = ["tabular.train", "trainer=smoke", "eval.baseline=false", "sampler.steps=2",
            "hydra/job_logging=disabled", "hydra/hydra_logging=disabled", f"hydra.run.dir={tmp_path / 'run'}",
            *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    main()


def _exit_code(monkeypatch, tmp_path, *overrides) -> int:
    with pytest.raises(SystemExit) as e:
        _run(monkeypatch, tmp_path, *overrides)
    return e.value.code


def _assert_one_line_exit_2(monkeypatch, tmp_path, capsys, overrides, names) -> None:
    """``tabular.train data=csv <overrides>`` exits 2 with one line (no traceback) holding every name."""
    capsys.readouterr()
    assert _exit_code(monkeypatch, tmp_path, "data=csv", *overrides) == 2, overrides
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)


@pytest.fixture
def good_csv(tmp_path):
    path = tmp_path / "good.csv"
    _table().to_csv(path, index=False)
    return path


def test_bad_user_data_exits_2_with_one_line_naming_it(monkeypatch, tmp_path, good_csv, capsys):
    df = _table().astype({"a": object})
    df.loc[::33, "a"] = "oops"  # 4 of 100 rows: a number column with a typo, in both splits
    df.to_csv(tmp_path / "bad.csv", index=False)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b\n1.5,x\n2.5,y,extra\n")
    cases = [((f"data.path={tmp_path / 'bad.csv'}",), ("'a'", "'oops'")),
             ((f"data.path={good_csv}", "data.categorical=[nope]"), ("'nope'",)),
             ((f"data.path={good_csv}", "data.target=nope", "data.task=regression"), ("'nope'",)),
             ((f"data.path={ragged}",), (str(ragged), "cannot be read"))]
    for overrides, names in cases:
        _assert_one_line_exit_2(monkeypatch, tmp_path, capsys, overrides, names)


def test_a_valueerror_from_inside_training_is_not_bad_input(monkeypatch, tmp_path, good_csv, capsys):
    def broken_loss(self, *args, **kwargs):
        raise ValueError("internal bug in the loss")

    monkeypatch.setattr(CDTD, "loss", broken_loss)
    overrides = ("data=csv", f"data.path={good_csv}")
    # Hydra's full error mode re-raises: the ValueError itself comes out, not turned into an exit
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="internal bug in the loss") as e:
        _run(monkeypatch, tmp_path, *overrides)
    assert type(e.value) is ValueError
    # ... and by default Hydra prints the traceback and exits 1, never the 2 of bad input
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    capsys.readouterr()
    assert _exit_code(monkeypatch, tmp_path, *overrides) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal bug in the loss" in err and "config error" not in err


def test_the_boundary_raises_tabular_input_error(tmp_path):
    """The checks of a user's table raise TabularInputError, still a ValueError for API callers."""
    df = _table()
    bad = df.astype({"a": object})
    bad.loc[::33, "a"] = "oops"
    (tmp_path / "empty.csv").write_text("a,b\n")
    calls = [(lambda: infer_schema(bad), "'oops'"),
             (lambda: infer_schema(df, categorical=["nope"]), "'nope'"),
             (lambda: infer_schema(df.rename(columns={"b": "a"})), "'a' occurs more than once"),
             (lambda: load_csv(tmp_path / "empty.csv"), "has no rows"),
             (lambda: load_csv(tmp_path / "none.csv"), "does not exist")]
    enc = TableEncoder.fit(df, infer_schema(df))
    calls += [(lambda: enc.encode(df.assign(b="z")), "category 'z'"),
              (lambda: enc.encode(df.assign(a="oops")), "'oops' is not a number"),
              (lambda: enc.encode(df.assign(c=1)), "column 'c' is not in the fitted schema")]
    for call, msg in calls:
        with pytest.raises(TabularInputError, match=msg) as e:
            call()
        assert isinstance(e.value, ValueError)


# -- the holdout of the fidelity report ------------------------------------------------------------


def _holdout_rows(n=100, test_fraction=0.2, seed=0):
    """Row numbers of a CSV that tabular.data.split_frame puts in the holdout (the same permutation)."""
    return np.random.default_rng(seed).permutation(n)[: int(round(n * test_fraction))]


def test_a_typo_only_in_the_holdout_exits_2_naming_it(monkeypatch, tmp_path, capsys):
    rows = _holdout_rows()
    df = _table().astype({"a": object})
    df.loc[rows[0], "a"] = "oops"  # a number column with a typo in one holdout row, none in training
    df.to_csv(tmp_path / "typo.csv", index=False)
    label = _table()
    label.loc[rows[1], "b"] = "z"  # a class of the target that training never has
    label.to_csv(tmp_path / "label.csv", index=False)
    cases = [((f"data.path={tmp_path / 'typo.csv'}",), ("holdout", "'a'", "'oops'")),
             ((f"data.path={tmp_path / 'label.csv'}", "data.target=b", "data.task=classification"),
              ("holdout", "'b'", "'z'")),
             ((f"data.path={tmp_path / 'label.csv'}", "data.target=b", "data.task=regression"),
              ("'b'", "regression")),
             # no data.task: a categorical target means classification, so its unseen class is named too
             ((f"data.path={tmp_path / 'label.csv'}", "data.target=b"), ("holdout", "'b'", "'z'"))]
    for overrides, names in cases:
        _assert_one_line_exit_2(monkeypatch, tmp_path, capsys, overrides, names)
        assert not (tmp_path / "run" / "model").exists()  # refused before any training


def test_an_unseen_holdout_category_is_reported_not_refused(monkeypatch, tmp_path):
    import json

    rows = _holdout_rows()
    df = _table()
    df.loc[rows[:3], "b"] = "z"  # only in the holdout: normal in real data, scored as an unseen category
    df.to_csv(tmp_path / "new.csv", index=False)
    with pytest.warns(UserWarning, match="holdout: values never seen in training.*'b': \\['z'\\]"):
        _run(monkeypatch, tmp_path, "data=csv", f"data.path={tmp_path / 'new.csv'}")
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["holdout_check"] == {"rows": 20, "unseen_categories": {"b": {"z": 3}}, "missing_not_in_train": {}}
    assert rep["rows"]["test"] == 20 and np.isfinite(rep["models"]["cdtd"]["dcr"]["share_closer_to_train"])


def test_check_holdout_names_what_cannot_be_a_value_of_the_column():
    from tabular.schema import check_holdout

    rng = np.random.default_rng(1)
    n = 60
    train = pd.DataFrame({"a": rng.normal(size=n), "b": rng.choice(["x", "y"], n), "k": rng.integers(1, 4, n),
                          "t": rng.random(n) < 0.5, "y": rng.choice(["good", "bad"], n)})
    schema = infer_schema(train, categorical=["k"])
    hold = train.iloc[:10].reset_index(drop=True)

    def edit(col, value, row=4):
        h = hold.astype({col: object})
        h.loc[row, col] = value
        return h

    bad = [(edit("a", "oops"), {}, r"holdout: column 'a': value 'oops' \(row 4\) is not a number"),
           (edit("a", np.inf), {}, "holdout: column 'a' holds an infinite value"),
           (edit("b", "X "), {}, r"holdout: column 'b': value 'X ' is not a training category; did you mean 'x'"),
           (edit("k", "two"), {}, "holdout: column 'k': value 'two' is not a number"),
           (edit("t", "yes"), {}, "holdout: column 't': value 'yes' is not a boolean"),
           (edit("y", "maybe"), {"target": "y", "task": "classification"}, "target 'y': class 'maybe'"),
           (edit("y", None), {"target": "y", "task": "classification"}, "target 'y': missing labels"),
           (hold, {"target": "y", "task": "regression"}, "target 'y' is categorical but the task is regression"),
           (hold, {"target": "a", "task": "classification"},
            r"target 'a' is numerical but the task is classification; fit it as a category \(categorical="),
           (hold, {"target": "nope", "task": "classification"}, "target 'nope' is not a column"),
           (hold.drop(columns="b"), {}, "holdout: column 'b' of the fitted schema is missing"),
           (hold.assign(c=1), {}, "holdout: column 'c' is not in the fitted schema")]
    for h, kw, msg in bad:
        with pytest.raises(TabularInputError, match=msg):
            check_holdout(schema, h, **kw)

    # categories never seen in training (and NaN where training had none) are counted, not refused;
    # the holdout itself is left as it was
    h = hold.astype({"b": object, "k": object})
    h.loc[[1, 2], "b"] = "w"
    h.loc[3, "k"] = 7
    h.loc[5, "a"] = np.nan
    h.loc[6, "y"] = None  # a missing value in a column that is not the target: an unseen category too
    before = h.copy()
    with pytest.warns(UserWarning, match="never seen in training"):
        got = check_holdout(schema, h, where="test set")
    assert got == {"rows": 10, "unseen_categories": {"b": {"w": 2}, "k": {"7": 1}, "y": {"<missing>": 1}},
                   "missing_not_in_train": {"a": 1}}
    pd.testing.assert_frame_equal(h, before)


def test_shipped_holdouts_pass_and_a_subsample_reports_unseen_countries():
    """Adult's test file, German credit's and diamonds' 80/20 splits fit their training schemas; a
    300-row Adult subsample misses rare native countries that its holdout has: counted, not refused."""
    import warnings

    from tabular.schema import check_holdout
    from tabular.train import TabularDataConfig, load_tables

    for name in ("adult", "german", "diamonds"):
        train, test, target, task, cats = load_tables(TabularDataConfig(name=name))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing new in these holdouts
            got = check_holdout(infer_schema(train, cats), test, target, task)
        assert got == {"rows": len(test), "unseen_categories": {}, "missing_not_in_train": {}}, name
    train, test, target, task, cats = load_tables(TabularDataConfig(name="adult", max_train_rows=300))
    with pytest.warns(UserWarning, match="native_country"):
        got = check_holdout(infer_schema(train, cats), test, target, task)
    countries = set(train["native_country"].dropna())
    expected = test["native_country"].dropna()
    expected = expected[~expected.isin(countries)].value_counts().to_dict()
    assert expected and got["unseen_categories"]["native_country"] == expected


def test_trainer_keys_cdtd_does_not_use_are_refused_at_start(monkeypatch, tmp_path, good_csv, capsys):
    """A TrainerConfig key the compact CDTD loop ignores, set to anything but its default, exits 2 naming
    key and value and the keys it honours, before any data is read; the honoured keys still run."""
    cases = [(("trainer.grad_accum=2", "trainer.optimizer=sgd", "trainer.schedule=cosine", "trainer.precision=bf16"),
              ("trainer.grad_accum=2", "trainer.optimizer='sgd'", "trainer.schedule='cosine'",
               "trainer.precision='bf16'", "honours only", "trainer.lr")),
             (("trainer.compile=true",), ("trainer.compile=True",)),
             (("trainer.betas=[0.9,0.99]",), ("trainer.betas=[0.9, 0.99]", "(0.9, 0.99)")),
             (("trainer.ema_decays=[0.9,0.99]",), ("trainer.ema_decays=[0.9, 0.99]", "one EMA"))]
    for overrides, names in cases:
        _assert_one_line_exit_2(monkeypatch, tmp_path, capsys, (f"data.path={good_csv}", *overrides), names)
        assert not (tmp_path / "run" / "model").exists()
