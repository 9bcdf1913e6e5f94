"""Fidelity report of synthetic tables: shapes, pairs, detection, machine-learning efficiency, privacy.

- Column shapes: Kolmogorov-Smirnov statistic (numerical, ``scipy.stats.ks_2samp``) and total
  variation distance ``0.5 sum_k |p_k - q_k|`` (categorical, missing counted as a category), against
  the training table (``ks_mean`` / ``tv_mean``) and against the holdout (``ks_mean_holdout`` /
  ``tv_mean_holdout``). Against the training table a generator that resamples the training marginals
  (the Gaussian copula's empirical inverse CDFs) scores near 0 by construction; against the holdout
  every generator is scored on rows it never saw, and the report's ``holdout_floor`` (the training
  table itself scored against the holdout) is what sampling noise alone gives.
- Pair trends: association matrices of real and synthetic data, Pearson correlation (numerical
  pairs), Cramer's V (categorical pairs), correlation ratio eta (categorical-numerical), and the mean
  absolute difference over pairs.
- Detection: classifier two-sample test (Lopez-Paz & Oquab 2017) with scikit-learn's histogram
  gradient boosting; cross-validated ROC AUC of telling real from synthetic (0.5: indistinguishable).
- Machine-learning efficiency: train on synthetic, test on real (TSTR) against train on real, for a
  classification target (ROC AUC, F1) or a regression target (R2), same gradient-boosting model.
- Privacy: distance to closest record (DCR) of each synthetic row in the training set against the
  holdout set (Zhao et al. 2021 / TabSyn): the share of synthetic rows closer to training than to
  holdout rows (equal-size sets, 0.5 when the generator does not copy its training rows).

:func:`fidelity_report` returns a JSON-ready dict; :func:`plot_report` writes the PNGs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency, ks_2samp
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.metrics import f1_score, r2_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import NearestNeighbors

from .schema import Schema, category_strings

LOWER_IS_BETTER = ("ks_mean", "tv_mean", "ks_mean_holdout", "tv_mean_holdout", "shape_error", "corr_diff",
                   "detection_auc", "mle_gap")


# -- single columns --------------------------------------------------------------------------------


def ks_statistic(a, b) -> float:
    """Two-sample KS statistic of the non-missing values (0 for identical samples)."""
    a = pd.to_numeric(pd.Series(a), errors="coerce").dropna().to_numpy(np.float64)
    b = pd.to_numeric(pd.Series(b), errors="coerce").dropna().to_numpy(np.float64)
    if len(a) == 0 or len(b) == 0:
        return float(len(a) != len(b))
    return float(ks_2samp(a, b).statistic)


def _strings(x) -> pd.Series:
    """Categories spelt as the schema spells them (:func:`tabular.schema.category_strings`): a column
    that is float because it holds NaN and its int twin in another table give '1' alike, not '1.0'
    and '1'; missing is a category of its own."""
    return category_strings(pd.Series(x))


def _freq(x) -> pd.Series:
    return _strings(x).value_counts(normalize=True)


def total_variation(a, b) -> float:
    """``0.5 * sum |p - q|`` over the union of categories (missing is a category)."""
    p, q = _freq(a), _freq(b)
    idx = p.index.union(q.index)
    return float(0.5 * np.abs(p.reindex(idx, fill_value=0).to_numpy() - q.reindex(idx, fill_value=0).to_numpy()).sum())


# -- pairs -----------------------------------------------------------------------------------------


def _codes(x) -> np.ndarray:
    return pd.factorize(_strings(x))[0]


def cramers_v(x, y) -> float:
    """Cramer's V ``sqrt(chi2 / (n (min(r, c) - 1)))`` of two categorical columns (0 if either is constant)."""
    table = pd.crosstab(_codes(x), _codes(y)).to_numpy()
    r, c = table.shape
    if min(r, c) < 2:
        return 0.0
    chi2 = chi2_contingency(table, correction=False)[0]
    return float(np.sqrt(chi2 / (table.sum() * (min(r, c) - 1))))


def correlation_ratio(cat, num) -> float:
    """eta = sqrt(between-group variance / total variance) of a numerical column grouped by a categorical one."""
    y = pd.to_numeric(pd.Series(num), errors="coerce").to_numpy(np.float64)
    g = _codes(cat)
    keep = ~np.isnan(y)
    y, g = y[keep], g[keep]
    if len(y) < 2 or y.var() == 0:
        return 0.0
    counts = np.bincount(g)
    means = np.bincount(g, weights=y) / np.maximum(counts, 1)
    between = (counts * (means - y.mean()) ** 2).sum()
    return float(np.sqrt(between / ((y - y.mean()) ** 2).sum()))


def pearson(a, b) -> float:
    a = pd.to_numeric(pd.Series(a), errors="coerce").to_numpy(np.float64)
    b = pd.to_numeric(pd.Series(b), errors="coerce").to_numpy(np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def association_matrix(df: pd.DataFrame, schema: Schema) -> tuple[list[str], np.ndarray]:
    """Symmetric matrix of Pearson / Cramer's V / correlation ratio over the modelled columns."""
    cols = [c for c in schema.columns if c.kind != "constant"]
    k = len(cols)
    m = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            a, b = cols[i], cols[j]
            x, y = df[a.name], df[b.name]
            if a.kind == "numerical" and b.kind == "numerical":
                v = pearson(x, y)
            elif a.kind == "categorical" and b.kind == "categorical":
                v = cramers_v(x, y)
            elif a.kind == "categorical":
                v = correlation_ratio(x, y)
            else:
                v = correlation_ratio(y, x)
            m[i, j] = m[j, i] = v
    return [c.name for c in cols], m


# -- models ----------------------------------------------------------------------------------------


def _design(frames: list[pd.DataFrame], schema: Schema, drop: tuple[str, ...] = ()) -> tuple[list[np.ndarray], list[bool]]:
    """Numeric design matrices for gradient boosting: numbers as float (NaN kept), categories as
    shared integer codes over all frames (so train/test codes agree)."""
    cols = [c for c in schema.columns if c.kind != "constant" and c.name not in drop]
    outs = [[] for _ in frames]
    is_cat = []
    for c in cols:
        if c.kind == "numerical":
            for o, f in zip(outs, frames, strict=True):
                o.append(pd.to_numeric(f[c.name], errors="coerce").to_numpy(np.float64))
            is_cat.append(False)
        else:
            strings = [_strings(f[c.name]) for f in frames]
            cats = sorted(set().union(*[set(s.unique()) for s in strings]))
            lookup = {v: i for i, v in enumerate(cats)}
            for o, s in zip(outs, strings, strict=True):
                o.append(s.map(lookup).to_numpy(np.float64))
            is_cat.append(len(cats) <= 250)  # HGB's native categories need < max_bins values
    return [np.stack(o, 1) for o in outs], is_cat


def detection_auc(real: pd.DataFrame, synth: pd.DataFrame, schema: Schema, *, seed: int = 0, max_rows: int = 10_000,
                  folds: int = 3) -> float:
    """Cross-validated ROC AUC of a gradient-boosting classifier telling real from synthetic rows
    (equal numbers of each, at most ``max_rows``)."""
    rng = np.random.default_rng(seed)
    m = min(len(real), len(synth), max_rows)
    r = real.iloc[rng.choice(len(real), m, replace=False)]
    s = synth.iloc[rng.choice(len(synth), m, replace=False)]
    (xr, xs), is_cat = _design([r, s], schema)
    x = np.concatenate([xr, xs])
    y = np.r_[np.zeros(m), np.ones(m)]
    aucs = []
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        clf = HistGradientBoostingClassifier(categorical_features=np.array(is_cat), random_state=seed)
        clf.fit(x[tr], y[tr])
        aucs.append(roc_auc_score(y[te], clf.predict_proba(x[te])[:, 1]))
    return float(np.mean(aucs))


def ml_efficiency(train: pd.DataFrame, test: pd.DataFrame, schema: Schema, target: str, task: str,
                  *, seed: int = 0) -> dict:
    """Fit gradient boosting on ``train`` to predict ``target``; score on ``test``.

    classification: ROC AUC (one-vs-rest macro for > 2 classes) and F1 (binary: the rarer class of
    ``test`` is positive; else macro). regression: R2.
    """
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
    (xtr, xte), is_cat = _design([train, test], schema, drop=(target,))
    if task == "regression":
        ytr = pd.to_numeric(train[target]).to_numpy(np.float64)
        yte = pd.to_numeric(test[target]).to_numpy(np.float64)
        keep = ~np.isnan(ytr)
        reg = HistGradientBoostingRegressor(categorical_features=np.array(is_cat), random_state=seed)
        reg.fit(xtr[keep], ytr[keep])
        ok = ~np.isnan(yte)
        return {"r2": float(r2_score(yte[ok], reg.predict(xte[ok])))}
    ytr, yte = _strings(train[target]).to_numpy(), _strings(test[target]).to_numpy()
    classes = sorted(set(yte))
    if len(set(ytr)) < 2:
        return {"auc": 0.5, "f1": 0.0}
    clf = HistGradientBoostingClassifier(categorical_features=np.array(is_cat), random_state=seed)
    clf.fit(xtr, ytr)
    proba = clf.predict_proba(xte)
    pred = clf.predict(xte)
    if len(classes) == 2:
        pos = min(classes, key=lambda c: (yte == c).sum())
        col = list(clf.classes_).index(pos) if pos in clf.classes_ else None
        auc = roc_auc_score(yte == pos, proba[:, col]) if col is not None else 0.5
        f1 = f1_score(yte == pos, pred == pos)
    else:
        full = np.zeros((len(yte), len(classes)))
        for i, c in enumerate(classes):
            if c in clf.classes_:
                full[:, i] = proba[:, list(clf.classes_).index(c)]
        full = full / np.clip(full.sum(1, keepdims=True), 1e-12, None)
        auc = roc_auc_score(yte, full, multi_class="ovr", labels=classes)
        f1 = f1_score(yte, pred, average="macro")
    return {"auc": float(auc), "f1": float(f1)}


def _dcr_space(frames: list[pd.DataFrame], ref: pd.DataFrame, schema: Schema) -> list[np.ndarray]:
    """Numbers min-max scaled by ``ref`` (missing -> -1), categories one-hot."""
    outs = [[] for _ in frames]
    for c in schema.columns:
        if c.kind == "numerical":
            r = pd.to_numeric(ref[c.name], errors="coerce")
            lo, span = float(r.min()), float(r.max() - r.min()) or 1.0
            for o, f in zip(outs, frames, strict=True):
                o.append(((pd.to_numeric(f[c.name], errors="coerce") - lo) / span).fillna(-1.0).to_numpy()[:, None])
        elif c.kind == "categorical":
            cats = sorted(_strings(ref[c.name]).unique())
            for o, f in zip(outs, frames, strict=True):
                s = _strings(f[c.name])
                o.append((s.to_numpy()[:, None] == np.asarray(cats)[None, :]).astype(np.float64))
    return [np.concatenate(o, 1) for o in outs]


def dcr(train: pd.DataFrame, holdout: pd.DataFrame, synth: pd.DataFrame, schema: Schema, *, seed: int = 0,
        max_rows: int = 5000) -> dict:
    """Distance to closest record (L2 in min-max / one-hot space) of synthetic rows in equal-size
    train and holdout sets: ``share_closer_to_train`` (0.5 ideal) with its standard error
    ``share_se`` (about 0.007 for 5,000 rows), median DCR to each, and the share of synthetic rows
    that are exact copies of a training row (looked for in the whole training table, not in the
    equal-size subsample the share uses)."""
    rng = np.random.default_rng(seed)
    m = min(len(train), len(holdout))
    tr = train.iloc[rng.choice(len(train), m, replace=False)]
    ho = holdout.iloc[rng.choice(len(holdout), m, replace=False)]
    sy = synth.iloc[rng.choice(len(synth), min(len(synth), max_rows), replace=False)]
    xall, xtr, xho, xsy = _dcr_space([train, tr, ho, sy], train, schema)
    d_tr = NearestNeighbors(n_neighbors=1).fit(xtr).kneighbors(xsy)[0][:, 0]
    d_ho = NearestNeighbors(n_neighbors=1).fit(xho).kneighbors(xsy)[0][:, 0]
    # exact copies by bytes: a nearest-neighbour distance of a copy comes out near 0, not always 0,
    # and a distinct row can lie closer than any tolerance (one unit of a wide numerical column)
    seen = {row.tobytes() for row in np.ascontiguousarray(xall)}
    copies = np.array([row.tobytes() in seen for row in np.ascontiguousarray(xsy)], dtype=np.float64)
    closer = np.where(d_tr == d_ho, 0.5, (d_tr < d_ho).astype(np.float64))
    return {"share_closer_to_train": float(closer.mean()),
            "share_se": float(closer.std(ddof=1) / np.sqrt(len(closer))) if len(closer) > 1 else float("nan"),
            "median_dcr_train": float(np.median(d_tr)),
            "median_dcr_holdout": float(np.median(d_ho)), "exact_copy_rate": float(copies.mean()) if len(copies) else 0.0}


# -- the report ------------------------------------------------------------------------------------


def column_shapes(train: pd.DataFrame, test: pd.DataFrame, synth: pd.DataFrame, schema: Schema) -> dict:
    """Per column: KS (numerical) or TV (categorical) of ``synth`` against ``train`` and against ``test``."""
    shapes = {}
    for c in schema.columns:
        if c.kind == "numerical":
            shapes[c.name] = {"ks": ks_statistic(train[c.name], synth[c.name]),
                              "ks_holdout": ks_statistic(test[c.name], synth[c.name])}
        elif c.kind == "categorical":
            shapes[c.name] = {"tv": total_variation(train[c.name], synth[c.name]),
                              "tv_holdout": total_variation(test[c.name], synth[c.name])}
    return shapes


def shape_means(shapes: dict) -> dict:
    """Means over the columns of :func:`column_shapes`: ``ks_mean``, ``tv_mean``, ``ks_mean_holdout``,
    ``tv_mean_holdout`` (None where the table has no column of that kind)."""
    def mean(key):
        vals = [v[key] for v in shapes.values() if key in v]
        return float(np.mean(vals)) if vals else None

    return {"ks_mean": mean("ks"), "tv_mean": mean("tv"), "ks_mean_holdout": mean("ks_holdout"),
            "tv_mean_holdout": mean("tv_holdout")}


def evaluate(train: pd.DataFrame, test: pd.DataFrame, synth: pd.DataFrame, schema: Schema,
             target: str | None = None, task: str | None = None, *, seed: int = 0) -> dict:
    """All metrics of one synthetic table against the real training table (and test set)."""
    shapes = column_shapes(train, test, synth, schema)
    ks = [v["ks"] for v in shapes.values() if "ks" in v]
    tv = [v["tv"] for v in shapes.values() if "tv" in v]
    names, a_real = association_matrix(train, schema)
    _, a_syn = association_matrix(synth, schema)
    diff = np.abs(a_real - a_syn)
    iu = np.triu_indices(len(names), 1)
    out = {"columns": shapes, **shape_means(shapes),
           "shape_error": float(np.mean(ks + tv)),
           "corr_diff": float(diff[iu].mean()) if len(iu[0]) else 0.0,
           "corr_diff_matrix": {"columns": names, "values": diff.round(4).tolist()},
           "detection_auc": detection_auc(train, synth, schema, seed=seed),
           "dcr": dcr(train, test, synth, schema, seed=seed)}
    if target is not None:
        out["mle"] = ml_efficiency(synth, test, schema, target, task, seed=seed)
    return out


def fidelity_report(train: pd.DataFrame, test: pd.DataFrame, synthetic: dict[str, pd.DataFrame], schema: Schema,
                    target: str | None = None, task: str | None = None, *, seed: int = 0) -> dict:
    """Side-by-side report of several synthetic tables (e.g. ``{"cdtd": ..., "gaussian_copula": ...}``).

    ``train`` is what the generators saw, ``test`` a holdout of the same distribution (TSTR test
    set, DCR holdout, marginals against unseen rows). Adds ``holdout_floor``: the mean KS / TV of the
    training rows themselves against the holdout, the sampling noise a generator of ``len(train)`` rows
    that reproduced the true marginals exactly would still show. Adds ``real`` (train-on-real scores), per model ``mle_gap`` (real minus
    synthetic AUC, or R2) and ``ranking``: for each aggregate metric, the best model.
    """
    rep = {"rows": {"train": len(train), "test": len(test), **{k: len(v) for k, v in synthetic.items()}},
           "target": target, "task": task, "models": {}}
    floor = column_shapes(train, test, train, schema)  # the training rows themselves against the holdout
    ks_f = [v["ks_holdout"] for v in floor.values() if "ks_holdout" in v]
    tv_f = [v["tv_holdout"] for v in floor.values() if "tv_holdout" in v]
    rep["holdout_floor"] = {"ks_mean": float(np.mean(ks_f)) if ks_f else None,
                            "tv_mean": float(np.mean(tv_f)) if tv_f else None}
    if target is not None:
        rep["real"] = {"mle": ml_efficiency(train, test, schema, target, task, seed=seed)}
        rep["real"]["detection_auc_holdout"] = detection_auc(train, test, schema, seed=seed)
    key = "auc" if task == "classification" else "r2"
    for name, df in synthetic.items():
        r = evaluate(train, test, df, schema, target, task, seed=seed)
        if target is not None:
            r["mle_gap"] = rep["real"]["mle"][key] - r["mle"][key]
        rep["models"][name] = r
    ranking = {}
    for metric in LOWER_IS_BETTER:
        vals = {n: r.get(metric) for n, r in rep["models"].items() if r.get(metric) is not None}
        if vals:
            ranking[metric] = min(vals, key=vals.get)
    vals = {n: abs(r["dcr"]["share_closer_to_train"] - 0.5) for n, r in rep["models"].items()}
    ranking["dcr_share_distance_from_0.5"] = min(vals, key=vals.get)
    rep["ranking"] = ranking
    return rep


def plot_report(train: pd.DataFrame, synthetic: dict[str, pd.DataFrame], schema: Schema, report: dict,
                out_dir, *, max_columns: int = 16) -> list:
    """Write ``marginals.png`` (real vs each model per column) and ``correlation_diff.png`` (|A_real - A_synth|)."""
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = [c for c in schema.columns if c.kind != "constant"][:max_columns]
    ncol = 4
    nrow = int(np.ceil(len(cols) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3 * nrow), squeeze=False)
    series = {"real": train, **synthetic}
    for ax, c in zip(axes.flat, cols, strict=False):
        if c.kind == "numerical":
            allv = pd.to_numeric(train[c.name], errors="coerce").dropna()
            lo, hi = np.quantile(allv, [0.005, 0.995])
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
            for name, df in series.items():
                ax.hist(pd.to_numeric(df[c.name], errors="coerce").dropna().clip(lo, hi), bins=bins, density=True,
                        histtype="step", label=name)
        else:
            top = _freq(train[c.name]).index[:10]
            w = 0.8 / len(series)
            for k, (name, df) in enumerate(series.items()):
                f = _freq(df[c.name]).reindex(top, fill_value=0)
                ax.bar(np.arange(len(top)) + k * w, f.to_numpy(), width=w, label=name)
            ax.set_xticks(np.arange(len(top)) + 0.4 - w / 2)
            ax.set_xticklabels([str(t)[:12] for t in top], rotation=60, fontsize=6)
        ax.set_title(c.name, fontsize=9)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    p1 = out_dir / "marginals.png"
    fig.savefig(p1, dpi=90)
    plt.close(fig)

    models = list(report["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5.5), squeeze=False)
    for ax, name in zip(axes.flat, models, strict=True):
        cm = report["models"][name]["corr_diff_matrix"]
        im = ax.imshow(np.asarray(cm["values"]), vmin=0, vmax=0.5, cmap="magma_r")
        ax.set_xticks(range(len(cm["columns"])))
        ax.set_yticks(range(len(cm["columns"])))
        ax.set_xticklabels(cm["columns"], rotation=90, fontsize=7)
        ax.set_yticklabels(cm["columns"], fontsize=7)
        ax.set_title(f"{name}: |assoc real - synth|, mean {report['models'][name]['corr_diff']:.3f}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    p2 = out_dir / "correlation_diff.png"
    fig.savefig(p2, dpi=90)
    plt.close(fig)
    return [p1, p2]
