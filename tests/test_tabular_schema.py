"""Schema inference, errors naming columns, the encoder round trip, and the shipped data sets."""

import numpy as np
import pandas as pd
import pytest
from scipy.special import ndtri
from scipy.stats import kstest

from tabular.data import DATASETS, QuantileNormal, TableEncoder, load_adult, load_diamonds, load_german
from tabular.schema import MISSING, Schema, TabularInputError, category_strings, infer_schema


def mixed_frame(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "age": rng.integers(18, 80, n),
        "income": rng.normal(5e4, 1e4, n),
        "city": rng.choice(["a", "b", "c"], n).astype(object),
        "flag": rng.integers(0, 2, n),
        "ok": rng.random(n) < 0.5,
    })


def test_inference_types():
    s = infer_schema(mixed_frame())
    kinds = {c.name: c.kind for c in s.columns}
    assert kinds == {"age": "numerical", "income": "numerical", "city": "categorical", "flag": "categorical",
                     "ok": "categorical"}
    assert s["age"].integer and not s["income"].integer
    assert s["city"].categories == ["a", "b", "c"]
    # declared types win over inference
    s2 = infer_schema(mixed_frame(), categorical=["age"], numerical=["flag"])
    assert s2["age"].kind == "categorical" and s2["flag"].kind == "numerical"



def test_numbers_stored_as_text_warn_and_can_be_declared_numerical():
    import warnings

    df = mixed_frame(n=60)
    df["price"] = [f"{v:.2f}" for v in np.random.default_rng(0).normal(100, 10, 60)]  # strings, 60 distinct
    df["code"] = [str(i % 5) for i in range(60)]  # few distinct codes: a category, no warning
    with pytest.warns(UserWarning, match="'price' holds numbers stored as text .*numerical=\\['price'\\]"):
        s = infer_schema(df)
    assert s["price"].kind == "categorical" and s["code"].kind == "categorical"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        declared = infer_schema(df, numerical=["price"])
        infer_schema(df, categorical=["price"])
    assert declared["price"].kind == "numerical" and not declared["price"].integer
    assert declared["price"].lo == pytest.approx(min(map(float, df["price"])))


def test_constant_and_single_category_columns():
    df = mixed_frame()
    df["const"] = 7
    df["one_cat"] = "x"
    with pytest.warns(UserWarning, match="'const'"):
        s = infer_schema(df)
    assert s["const"].kind == "constant" and s["const"].value == 7
    assert s["one_cat"].kind == "constant" and s["one_cat"].value == "x"
    with pytest.raises(ValueError, match="'const'"):
        infer_schema(df, constant="error")
    with pytest.raises(ValueError, match="'one_cat'"):
        infer_schema(df.drop(columns="const"), constant="error")


def test_unparseable_value_names_column_and_value():
    df = mixed_frame()
    df["weight"] = [str(v) for v in np.arange(len(df))]
    df.loc[17, "weight"] = "12kg"
    with pytest.raises(ValueError, match=r"'weight'.*'12kg'"):
        infer_schema(df)
    # declared numerical: same error; declared categorical: accepted
    with pytest.raises(ValueError, match=r"'weight'.*'12kg'"):
        infer_schema(df, numerical=["weight"])
    assert infer_schema(df, categorical=["weight"])["weight"].kind == "categorical"
    df2 = mixed_frame()
    df2.loc[3, "income"] = np.inf
    with pytest.raises(ValueError, match="'income'.*infinite"):
        infer_schema(df2)


def test_missing_values_are_modelled_not_dropped():
    df = mixed_frame()
    df.loc[[1, 5], "income"] = np.nan
    df.loc[[2], "city"] = None
    s = infer_schema(df)
    assert s["income"].has_missing and s["income"].kind == "numerical"
    assert MISSING in s["city"].categories and s["city"].has_missing
    df["empty"] = np.nan
    with pytest.raises(ValueError, match="'empty'.*entirely missing"):
        infer_schema(df)


def test_bad_arguments_name_the_column():
    df = mixed_frame()
    with pytest.raises(ValueError, match="'nope'"):
        infer_schema(df, categorical=["nope"])
    with pytest.raises(ValueError, match="'age'.*both"):
        infer_schema(df, categorical=["age"], numerical=["age"])
    with pytest.raises(TypeError):
        infer_schema(df.to_numpy())


def test_schema_json_round_trip():
    df = mixed_frame()
    df.loc[[1], "income"] = np.nan
    s = infer_schema(df)
    assert Schema.from_json(s.to_json()) == s


def test_encoder_round_trip_and_unknown_category():
    df = mixed_frame(200)
    df.loc[[3, 9], "income"] = np.nan
    df.loc[[4], "city"] = np.nan
    s = infer_schema(df)
    enc = TableEncoder.fit(df, s)
    x_num, x_cat = enc.encode(df)
    assert x_num.dtype == np.float32 and x_cat.dtype == np.int64
    assert enc.cardinalities == [4, 2, 2, 2]  # city (+missing), flag, ok, income missingness flag
    assert np.isfinite(x_num).all() and abs(x_num[:, 1].mean()) < 0.2  # normal scores
    back = enc.decode(x_num, x_cat)
    assert list(back.columns) == list(df.columns)
    pd.testing.assert_series_equal(back["age"], df["age"], check_dtype=False)
    np.testing.assert_allclose(back["income"], df["income"], rtol=1e-4)
    assert back["income"].isna().tolist() == df["income"].isna().tolist()
    assert back["city"].isna().tolist() == df["city"].isna().tolist()
    assert (back["city"].dropna() == df["city"].dropna()).all()
    assert (back["ok"] == df["ok"]).all() and back["ok"].dtype == bool
    bad = df.copy()
    bad.loc[0, "city"] = "zzz"
    with pytest.raises(ValueError, match="'city'.*'zzz'"):
        enc.encode(bad)


def test_quantile_normal_matches_normal_scores():
    rng = np.random.default_rng(0)
    x = rng.exponential(size=5000)
    q = QuantileNormal.fit(x)
    z = q.forward(x)
    assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.03
    inner = (x > x.min()) & (x < x.max())  # the two extremes sit on the clipped tails
    np.testing.assert_allclose(q.inverse(z)[inner], x[inner], rtol=1e-6, atol=1e-9)
    assert abs(q.inverse(z).max() - x.max()) < 1e-3


def test_dequantised_ties_round_trip_and_are_normal():
    """A tied value owns a range of quantile levels; any draw inside it decodes to the value itself,
    and draws spread uniformly over the ranges are standard normal scores (no point masses), while
    the middle-of-range encoding piles the spike onto one score."""
    rng = np.random.default_rng(1)
    x = np.where(rng.random(20000) < 0.45, 40.0, rng.integers(1, 100, 20000).astype(float))
    q = QuantileNormal.fit(x)
    lo, hi = q.level_range(x)
    spike = x == 40.0
    assert np.allclose(hi[spike] - lo[spike], hi[spike][0] - lo[spike][0])
    assert abs((hi[spike][0] - lo[spike][0]) - spike.mean()) < 2e-3  # its width is its frequency
    u = lo + rng.random(len(x)) * (hi - lo)
    z = ndtri(u)
    np.testing.assert_array_equal(np.round(q.inverse(z)), x)
    assert kstest(z, "norm").statistic < 0.02
    assert kstest(q.forward(x), "norm").statistic > 0.15
    np.testing.assert_allclose(q.forward(x), ndtri(0.5 * (lo + hi)))
    df = pd.DataFrame({"h": x, "c": rng.choice(["a", "b"], len(x))})
    enc = TableEncoder.fit(df, infer_schema(df, categorical=["c"]))
    elo, ehi = enc.level_ranges(pd.DataFrame({"h": [40.0, np.nan], "c": ["a", "a"]}))
    assert elo[0, 0] == lo[spike][0] and ehi[0, 0] == hi[spike][0] and elo[1, 0] == ehi[1, 0] == 0.5


def test_shipped_data_sets():
    train, test = load_adult()
    assert train.shape == (32561, 15) and test.shape == (16281, 15)
    assert set(train["income"]) == set(test["income"]) == {"<=50K", ">50K"}
    assert train["workclass"].isna().sum() > 0  # '?' kept as missing, not dropped
    german = load_german()
    assert german.shape == (1000, 21) and not german["status"].str.startswith("A1").any()
    assert set(german["credit"]) == {"good", "bad"}
    assert load_diamonds().shape == (53940, 10)
    for spec in DATASETS.values():
        assert spec.target in spec.categorical or spec.task == "regression"


def test_category_strings_spell_a_value_the_same_whatever_the_dtype():
    # an integer column that gained NaN turns float: 1 and 1.0 must stay one category, '1'
    as_int = category_strings(pd.Series([1, 2, 3]))
    as_float = category_strings(pd.Series([1.0, 2.0, np.nan]))
    assert as_int.tolist() == ["1", "2", "3"]
    assert as_float.tolist() == ["1", "2", MISSING]
    assert category_strings(pd.Series(np.array([1.5, 2.0], dtype=np.float32))).tolist() == ["1.5", "2"]
    assert category_strings(pd.Series(["a", None, "1.0"])).tolist() == ["a", MISSING, "1.0"]  # strings as given


def test_object_columns_of_bools_and_ints_keep_their_type():
    import io

    from tabular.schema import restore_categories

    # read_csv of a True/False column with blanks gives object dtype holding bools (and NaN)
    df = pd.read_csv(io.StringIO("flag,big\nTrue,1234567890123456789\n,5\nFalse,1234567890123456789\nTrue,7\n"))
    assert df["flag"].dtype == object
    df["code"] = pd.Series([3, 5, 3, 7], dtype=object)  # ints in an object column
    schema = infer_schema(df, categorical=["flag", "code", "big"])
    assert (schema["flag"].dtype, schema["code"].dtype, schema["big"].dtype) == ("bool", "int", "int")
    flag = restore_categories(schema["flag"], category_strings(df["flag"]).to_numpy())
    assert flag.iloc[0] is np.True_ or flag.iloc[0] is True
    assert flag.iloc[2] == False and pd.isna(flag.iloc[1])  # noqa: E712
    big = restore_categories(schema["big"], category_strings(df["big"]).to_numpy())
    assert big.tolist() == [1234567890123456789, 5, 1234567890123456789, 7]  # exact above 2**53
    code = restore_categories(schema["code"], np.array(["3", "7", "3.0"], dtype=object))  # '3.0': older spelling
    assert code.tolist() == [3, 7, 3]


def test_dates_durations_and_lists_are_refused_naming_the_column():
    import datetime

    base = mixed_frame(5)
    cases = [(pd.date_range("2020-01-01", periods=5), "holds dates, times or durations"),
             (pd.date_range("2020-01-01", periods=5, tz="UTC"), "holds dates, times or durations"),
             (pd.to_timedelta(range(5), unit="D"), "holds dates, times or durations"),
             ([datetime.date(2020, 1, d) for d in range(1, 6)], "holds dates, times or durations"),
             ([[1], [2], None, [3], [1]], r"value \[1\] is a list, not a single value")]
    for values, msg in cases:
        df = base.assign(when=values)
        for kwargs in ({}, {"categorical": ["when"]}, {"numerical": ["when"]}):
            with pytest.raises(TabularInputError, match=f"column 'when'.*{msg}|column 'when': {msg}"):
                infer_schema(df, **kwargs)
    with pytest.raises(TabularInputError, match="convert it to a number"):
        infer_schema(base.assign(when=pd.date_range("2020-01-01", periods=5)))
