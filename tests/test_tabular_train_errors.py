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
        capsys.readouterr()
        assert _exit_code(monkeypatch, tmp_path, "data=csv", *overrides) == 2, overrides
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        for name in names:
            assert name in err, (name, err)


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
