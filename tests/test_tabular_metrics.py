"""Fidelity metrics against hand-computed values, the copula baseline, the report and its PNGs."""

import numpy as np
import pandas as pd
import pytest

from tabular.baseline import GaussianCopula
from tabular.data import DATASETS, load_adult
from tabular.metrics import (
    correlation_ratio,
    cramers_v,
    dcr,
    detection_auc,
    fidelity_report,
    ks_statistic,
    ml_efficiency,
    pearson,
    plot_report,
    total_variation,
)
from tabular.schema import infer_schema


@pytest.fixture(scope="module")
def adult():
    train, test = load_adult()
    cats = list(DATASETS["adult"].categorical)
    tr = train.sample(2000, random_state=0).reset_index(drop=True)
    te = test.sample(1000, random_state=0).reset_index(drop=True)
    return tr, te, infer_schema(train, cats)


def test_ks_and_total_variation_by_hand():
    x = np.arange(100.0)
    assert ks_statistic(x, x) == 0.0
    assert ks_statistic(x, x + 1000) == 1.0
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == pytest.approx(0.5)
    assert total_variation(["a", "b"] * 50, ["a"] * 100) == pytest.approx(0.5)
    # p = (.5, .3, .2), q = (.2, .3, .5): 0.5 (0.3 + 0 + 0.3) = 0.3
    p = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    q = ["a"] * 2 + ["b"] * 3 + ["c"] * 5
    assert total_variation(p, q) == pytest.approx(0.3)
    assert total_variation(["a", None], ["a", "a"]) == pytest.approx(0.5)  # missing is a category


def test_pair_associations_by_hand():
    rng = np.random.default_rng(0)
    a = rng.choice(list("xyz"), 3000)
    assert cramers_v(a, a) == pytest.approx(1.0)
    assert cramers_v(a, rng.choice(list("uv"), 3000)) < 0.05
    assert correlation_ratio(a, pd.Series(a).map({"x": 0.0, "y": 1.0, "z": 5.0})) == pytest.approx(1.0)
    assert correlation_ratio(a, rng.normal(size=3000)) < 0.06
    # eta^2 = between / total: groups {0, 2} and {4, 6} -> means 1, 5; between = 4*(4) = 16, total = 20
    assert correlation_ratio(["g", "g", "h", "h"], [0, 2, 4, 6]) == pytest.approx(np.sqrt(16 / 20))
    assert pearson([1, 2, 3], [2, 4, 6.5]) > 0.99 and pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_detection_auc_half_on_same_data_one_on_shifted(adult):
    tr, te, schema = adult
    a, b = tr.iloc[:1000], tr.iloc[1000:]
    assert 0.4 < detection_auc(a, b, schema, seed=0) < 0.6
    shifted = b.copy()
    shifted["age"] = shifted["age"] + 25
    assert detection_auc(a, shifted, schema, seed=0) > 0.95


def test_ml_efficiency_real_and_shuffled(adult):
    tr, te, schema = adult
    real = ml_efficiency(tr, te, schema, "income", "classification")
    assert real["auc"] > 0.85 and 0.4 < real["f1"] < 0.9
    shuffled = tr.copy()
    shuffled["income"] = np.random.default_rng(0).permutation(shuffled["income"].to_numpy())
    assert abs(ml_efficiency(shuffled, te, schema, "income", "classification")["auc"] - 0.5) < 0.1
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x": rng.normal(size=600), "c": rng.choice(["a", "b"], 600)})
    df["y"] = 2 * df["x"] + (df["c"] == "a") + 0.1 * rng.normal(size=600)
    s = infer_schema(df)
    assert ml_efficiency(df.iloc[:400], df.iloc[400:], s, "y", "regression")["r2"] > 0.95


def test_dcr_copies_versus_fresh_rows(adult):
    tr, te, schema = adult
    copies = dcr(tr.iloc[:1000], te, tr.iloc[:500], schema)  # train and holdout of equal size
    assert copies["share_closer_to_train"] > 0.9 and copies["median_dcr_train"] == 0.0
    fresh = dcr(tr, te, te.iloc[:500], schema)
    assert fresh["share_closer_to_train"] < 0.1 and fresh["median_dcr_holdout"] == 0.0
    # rows from the same population as both sets, in neither: 0.5 within its standard error
    same = dcr(tr, te.iloc[:500], te.iloc[500:], schema)
    assert 0.017 < same["share_se"] < 0.0224  # ~0.5 / sqrt(500), less for tied distances
    assert abs(same["share_closer_to_train"] - 0.5) < 3 * same["share_se"]


def test_copula_reproduces_a_gaussian_correlation():
    rng = np.random.default_rng(0)
    z = rng.multivariate_normal([0, 0], [[1, 0.7], [0.7, 1]], size=5000)
    df = pd.DataFrame({"a": np.exp(z[:, 0]), "b": 3 * z[:, 1] + 1, "c": rng.choice(["p", "q", "r"], 5000)})
    s = GaussianCopula().fit(df).sample(5000, seed=1)
    # Gaussian dependence in normal scores: a monotone transform of a keeps rho
    from scipy.stats import norm, rankdata

    zs = norm.ppf((rankdata(s["a"]) - 0.5) / len(s))
    assert np.corrcoef(zs, s["b"])[0, 1] == pytest.approx(0.7, abs=0.04)
    assert ks_statistic(df["a"], s["a"]) < 0.03 and total_variation(df["c"], s["c"]) < 0.03
    assert set(s["c"]) <= {"p", "q", "r"}


def test_copula_imputes_from_the_gaussian_conditional():
    """Given a, b's normal score is drawn from N(rho z_a, 1 - rho^2); observed cells stay; a missing
    category is never imputed; an unseen category is refused by name."""
    rng = np.random.default_rng(0)
    n, rho = 20000, 0.7
    z = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=n)
    c = np.where(rng.random(n) < 0.1, None, rng.choice(["p", "q"], n)).astype(object)
    df = pd.DataFrame({"a": np.exp(z[:, 0]), "b": 3 * z[:, 1] + 1, "c": c})
    cop = GaussianCopula().fit(df, categorical=["c"])
    q = pd.DataFrame({"a": np.full(4000, np.exp(1.0)), "b": np.nan, "c": [None] * 2000 + ["q"] * 2000})
    out = cop.impute(q, seed=3)
    zb = (out["b"].to_numpy() - 1) / 3
    assert zb.mean() == pytest.approx(rho * 1.0, abs=0.04)
    assert zb.std() == pytest.approx(np.sqrt(1 - rho**2), abs=0.03)
    assert (out["a"] == q["a"]).all() and (out["c"][2000:] == "q").all()
    assert set(out["c"][:2000]) == {"p", "q"}  # never the missing category
    # a row with nothing observed: the marginal
    empty = cop.impute(pd.DataFrame({"a": [np.nan] * 4000, "b": np.nan, "c": None}), seed=4)
    assert ks_statistic(df["a"], empty["a"]) < 0.04
    assert ks_statistic(df["b"], empty["b"]) < 0.04
    with pytest.raises(ValueError, match="'c'.*'zz'"):
        cop.impute(pd.DataFrame({"a": [1.0], "b": [np.nan], "c": ["zz"]}))
    with pytest.raises(ValueError, match="'b'"):
        cop.impute(pd.DataFrame({"a": [1.0], "c": ["p"]}))
    with pytest.raises(ValueError, match="column 'a'.*lots"):
        cop.impute(pd.DataFrame({"a": ["lots"], "b": [np.nan], "c": ["p"]}))
    with pytest.raises(TypeError, match="DataFrame.*list"):
        cop.impute([[1.0, np.nan, "p"]])


def test_report_json_and_pngs(adult, tmp_path):
    tr, te, schema = adult
    tr, te = tr.iloc[:400], te.iloc[:400]
    synth = {"copula": GaussianCopula().fit(tr, schema=schema).sample(400, seed=0), "copy": tr}
    rep = fidelity_report(tr, te, synth, schema, "income", "classification")
    assert set(rep["models"]) == {"copula", "copy"}
    for r in rep["models"].values():
        assert {"ks_mean", "tv_mean", "corr_diff", "detection_auc", "mle", "mle_gap", "dcr"} <= set(r)
    # an exact copy of training rows has perfect shapes but is flagged by the privacy metric
    assert rep["models"]["copy"]["shape_error"] < rep["models"]["copula"]["shape_error"]
    assert rep["ranking"]["dcr_share_distance_from_0.5"] == "copula"
    # Marginals against the holdout: the copy of the training rows scores exactly the floor (the training
    # rows against the holdout, by hand here), and the holdout itself as "synthetic" scores 0 there.
    num = [c.name for c in schema.columns if c.kind == "numerical"]
    cat = [c.name for c in schema.columns if c.kind == "categorical"]
    ks_floor = np.mean([ks_statistic(te[c], tr[c]) for c in num])
    tv_floor = np.mean([total_variation(te[c], tr[c]) for c in cat])
    assert rep["holdout_floor"] == {"ks_mean": pytest.approx(ks_floor), "tv_mean": pytest.approx(tv_floor)}
    assert ks_floor > 0.01 and tv_floor > 0.01  # 400 rows each: visible sampling noise
    copy = rep["models"]["copy"]
    assert copy["ks_mean"] == 0 and copy["tv_mean"] == 0
    assert copy["ks_mean_holdout"] == pytest.approx(ks_floor) and copy["tv_mean_holdout"] == pytest.approx(tv_floor)
    cop = rep["models"]["copula"]
    assert cop["ks_mean_holdout"] == pytest.approx(np.mean([cop["columns"][c]["ks_holdout"] for c in num]))
    assert all(cop["columns"][c]["ks_holdout"] == ks_statistic(te[c], synth["copula"][c]) for c in num)
    assert {"ks_mean_holdout", "tv_mean_holdout"} <= set(rep["ranking"])
    held = fidelity_report(tr, te, {"holdout": te}, schema)
    assert held["models"]["holdout"]["ks_mean_holdout"] == 0 and held["models"]["holdout"]["tv_mean_holdout"] == 0
    paths = plot_report(tr, synth, schema, rep, tmp_path)
    assert all(p.stat().st_size > 10_000 for p in paths)


def _graded(n, rng, float_with_nan):
    """An integer-coded category that is float in one table (it holds NaN) and int in the other, as
    two CSVs read separately give it; the label is an int, float with NaN in the first table too."""
    x = rng.normal(size=n)
    grade = np.where(x > 0, 1, 2).astype(float if float_with_nan else int)
    label = (x + rng.normal(scale=0.5, size=n) > 0).astype(float if float_with_nan else int)
    if float_with_nan:
        grade[:10] = np.nan
        label[10:15] = np.nan
    return pd.DataFrame({"x": x, "grade": grade, "label": label})


def test_metrics_spell_categories_as_the_schema_does():
    rng = np.random.default_rng(0)
    train, holdout = _graded(2000, rng, True), _graded(500, rng, False)
    schema = infer_schema(train, ["grade", "label"])
    # 1.0 in one table and 1 in the other are one category: TV is the frequency difference only
    p = [(train["grade"] == v).mean() for v in (1, 2)] + [train["grade"].isna().mean()]
    q = [(holdout["grade"] == v).mean() for v in (1, 2)] + [0.0]
    assert total_variation(train["grade"], holdout["grade"]) == pytest.approx(
        0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True)), abs=1e-12)
    rep = fidelity_report(train, holdout, {"copy": train.copy()}, schema, "label", "classification")
    assert rep["models"]["copy"]["columns"]["grade"]["tv_holdout"] < 0.05
    assert rep["holdout_floor"]["tv_mean"] < 0.05
    # train-on-real scores the float labels against the int ones (was AUC 0.5, F1 0 when '1.0' != '1')
    assert rep["real"]["mle"]["auc"] > 0.85 and rep["real"]["mle"]["f1"] > 0.7


def test_exact_copy_rate_looks_in_the_whole_training_table(adult):
    tr, te, schema = adult  # 2,000 training rows, 1,000 holdout rows: the share uses 1,000 of each
    out = dcr(tr, te, tr.iloc[1000:1500], schema)
    assert out["exact_copy_rate"] == 1.0  # every synthetic row is a training row, sampled or not
    assert dcr(tr, te, te.iloc[:300], schema)["exact_copy_rate"] == pytest.approx(
        float(te.iloc[:300].merge(tr.drop_duplicates(), how="left", indicator=True)["_merge"].eq("both").mean()))


def test_copula_imputes_with_repeated_index_labels():
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=300), "c": rng.choice(["x", "y"], 300)})
    cop = GaussianCopula().fit(df)
    holes = pd.DataFrame({"a": [0.1, np.nan, 0.3], "c": ["x", "x", None]}, index=[7, 7, 8])
    out = cop.impute(holes, seed=0)
    assert out.index.tolist() == [7, 7, 8] and out.notna().all().all()
    assert out["a"].iloc[0] == 0.1 and out["a"].iloc[2] == 0.3 and out["c"].iloc[:2].tolist() == ["x", "x"]
