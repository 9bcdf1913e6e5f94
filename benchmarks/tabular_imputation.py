"""Imputation by a fitted CDTD against the Gaussian copula and simple imputers, on held-out rows.

    python -m benchmarks.tabular_imputation --model outputs/tabular/adult/model --data adult

Takes ``--rows`` rows of the data set's holdout (rows whose categories the model never saw are left
out, and counted), hides each cell independently with probability ``--rate`` (missing completely at
random; cells missing in the data are never scored), and fills them with:

- ``cdtd``: :meth:`TabularDiffusion.impute` (calibrated where the model has a calibration);
- ``cdtd_uncalibrated``: the same with ``calibrated=False``;
- ``gaussian_copula``: :meth:`tabular.baseline.GaussianCopula.impute`, a draw from the copula
  (fitted on the training rows) given the row's observed cells;
- ``hot_deck``: each hidden cell a random training value of its column (ignores the row);
- ``mean_mode``: the training mean / most frequent category (a point imputer).

Each stochastic imputer makes ``--draws`` independent imputations (multiple imputation). Scored on
the hidden cells, per column and averaged over the columns of each kind:

- ``acc`` (categorical): share of hidden cells whose first draw is the true category;
  ``acc_vote``: the same for the most frequent category over the draws;
- ``nrmse`` (numerical): RMSE of the first draw over the column's training standard deviation;
  ``nrmse_median``: the same for the median over the draws. A draw from the true conditional has
  RMSE sqrt(2) times the conditional standard deviation, so a point imputer has the advantage here
  (the training mean's nrmse, about 1, is the best guess that ignores the row);
- ``tv`` / ``ks``: how far the distribution of the first draws is from that of the true hidden
  values (a good conditional sampler is close; the point imputer is far).

Prints a table and the ratios of CDTD to the copula; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd

IMPUTERS = ("cdtd", "cdtd_uncalibrated", "gaussian_copula", "hot_deck", "mean_mode")


def fmt(x, width: int = 8) -> str:
    return f"{x:{width}.4f}" if x is not None else f"{'--':>{width}s}"


def hide_cells(df: pd.DataFrame, columns: list[str], rate: float, rng: np.random.Generator) -> pd.DataFrame:
    """Boolean frame: which of ``columns``' observed cells to hide (each with probability ``rate``)."""
    hide = pd.DataFrame(False, index=df.index, columns=df.columns)
    for c in columns:
        hide[c] = (rng.random(len(df)) < rate) & df[c].notna().to_numpy()
    return hide


def seen_rows(df: pd.DataFrame, schema) -> np.ndarray:
    """Rows of ``df`` whose every categorical value (or missingness) the model saw in training."""
    from tabular.schema import category_strings

    ok = np.ones(len(df), bool)
    for c in schema.categorical:
        ok &= category_strings(df[c.name]).isin(set(c.categories)).to_numpy()
    return ok


def score(truth: pd.DataFrame, draws: list[pd.DataFrame], hide: pd.DataFrame, schema, train: pd.DataFrame) -> dict:
    """Per-column and mean scores of ``draws`` (imputed frames) on the ``hide`` cells of ``truth``."""
    from tabular.metrics import ks_statistic, total_variation
    from tabular.schema import category_strings

    cols, num, cat = {}, [], []
    for c in schema.columns:
        h = hide[c.name].to_numpy() if c.name in hide else np.zeros(len(truth), bool)
        if c.kind == "constant" or not h.any():
            continue
        true = truth[c.name].to_numpy()[h]
        got = [d[c.name].to_numpy()[h] for d in draws]
        if c.kind == "numerical":
            sd = float(pd.to_numeric(train[c.name]).std()) or 1.0
            first = got[0].astype(np.float64)
            med = np.median(np.stack([g.astype(np.float64) for g in got]), 0)
            r = {"cells": int(h.sum()),
                 "nrmse": float(np.sqrt(np.mean((first - true) ** 2)) / sd),
                 "nrmse_median": float(np.sqrt(np.mean((med - true) ** 2)) / sd),
                 "ks": ks_statistic(pd.Series(true), pd.Series(first))}
            num.append(r)
        else:
            strs = [category_strings(pd.Series(g)).to_numpy() for g in got]  # 1 and 1.0 alike
            t = category_strings(pd.Series(true)).to_numpy()
            vote = pd.DataFrame(np.stack(strs, 1)).mode(axis=1)[0].to_numpy()  # ties: the first in sort order
            r = {"cells": int(h.sum()),
                 "acc": float(np.mean(strs[0] == t)),
                 "acc_vote": float(np.mean(vote == t)),
                 "tv": total_variation(pd.Series(t), pd.Series(strs[0]))}
            cat.append(r)
        cols[c.name] = r

    def mean(rows, key):
        return float(np.mean([r[key] for r in rows])) if rows else None

    return {"columns": cols, "acc": mean(cat, "acc"), "acc_vote": mean(cat, "acc_vote"), "tv": mean(cat, "tv"),
            "nrmse": mean(num, "nrmse"), "nrmse_median": mean(num, "nrmse_median"), "ks": mean(num, "ks")}


def mean_mode_impute(df: pd.DataFrame, train: pd.DataFrame, schema) -> pd.DataFrame:
    out = df.copy()
    for c in schema.columns:
        if c.kind == "numerical":
            v = pd.to_numeric(train[c.name]).mean()
            out[c.name] = out[c.name].fillna(round(v) if c.integer else v)
        else:
            s = train[c.name].dropna()
            if not s.empty:
                out[c.name] = out[c.name].astype(object).where(out[c.name].notna(), s.mode().iloc[0])
    return out


def hot_deck_impute(df: pd.DataFrame, train: pd.DataFrame, schema, rng: np.random.Generator) -> pd.DataFrame:
    out = df.copy()
    for c in schema.columns:
        miss = out[c.name].isna().to_numpy()
        pool = train[c.name].dropna().to_numpy()
        if miss.any() and len(pool):
            if out[c.name].dtype != object and pool.dtype == object:
                out[c.name] = out[c.name].astype(object)
            out.loc[out.index[miss], c.name] = rng.choice(pool, int(miss.sum()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tabular_imputation")
    p.add_argument("--model", required=True, help="saved TabularDiffusion directory")
    p.add_argument("--data", default="adult", help="shipped data set the model was fitted on")
    p.add_argument("--rows", type=int, default=5000, help="holdout rows to impute")
    p.add_argument("--rate", type=float, default=0.2, help="probability that a cell is hidden")
    p.add_argument("--draws", type=int, default=3, help="imputations per stochastic imputer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.rows < 1 or args.draws < 1 or args.threads < 1:
        p.error(f"--rows, --draws and --threads must be >= 1, got {args.rows}, {args.draws}, {args.threads}")
    if not 0.0 < args.rate < 1.0:
        p.error(f"--rate must be in (0, 1), got {args.rate}")
    from tabular.baseline import GaussianCopula

    from .tabular_common import load_data_and_model, write_result

    train, test, _, m = load_data_and_model(p, args.data, args.model, args.threads)
    names = m.schema.names
    ok = seen_rows(test[names], m.schema)
    truth = test[names][ok].reset_index(drop=True)
    rng = np.random.default_rng(args.seed)
    if len(truth) > args.rows:
        truth = truth.iloc[np.sort(rng.choice(len(truth), args.rows, replace=False))].reset_index(drop=True)
    scored = [c.name for c in m.schema.columns if c.kind != "constant"]
    hide = hide_cells(truth, scored, args.rate, rng)
    holes = truth.mask(hide)
    cop = GaussianCopula().fit(train[names], schema=m.schema)
    result = {"model": args.model, "data": args.data, "rows": len(truth), "rows_unseen_left_out": int((~ok).sum()),
              "rate": args.rate, "draws": args.draws, "hidden_cells": int(hide.to_numpy().sum()),
              "calibrated": m.calibration is not None, "imputers": {}, "seconds": {}}
    print(f"{len(truth)} holdout rows ({result['rows_unseen_left_out']} with categories unseen in training left "
          f"out), {result['hidden_cells']} hidden cells, {args.draws} draws", flush=True)
    for name in IMPUTERS:
        t0 = time.perf_counter()
        draws = []
        for d in range(1 if name == "mean_mode" else args.draws):
            seed = args.seed + 1 + d
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "cdtd":
                    draws.append(m.impute(holes, seed=seed))
                elif name == "cdtd_uncalibrated":
                    draws.append(m.impute(holes, seed=seed, calibrated=False))
                elif name == "gaussian_copula":
                    draws.append(cop.impute(holes, seed=seed))
                elif name == "hot_deck":
                    draws.append(hot_deck_impute(holes, train, m.schema, np.random.default_rng(seed)))
                else:
                    draws.append(mean_mode_impute(holes, train, m.schema))
        result["seconds"][name] = round(time.perf_counter() - t0, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's KS switching to its asymptotic p-value on ties
            result["imputers"][name] = score(truth, draws, hide, m.schema, train)
    keys = ("acc", "acc_vote", "tv", "nrmse", "nrmse_median", "ks")
    print(f"{'':18s} " + " ".join(f"{k:>12s}" for k in keys) + f" {'seconds':>8s}")
    for name, r in result["imputers"].items():
        print(f"{name:18s} " + " ".join(fmt(r[k], 12) for k in keys) + f" {result['seconds'][name]:8.1f}")
    print("higher is better for acc / acc_vote, lower for the rest; mean_mode is a point imputer "
          "(its nrmse is the best guess that ignores the row; its tv / ks show it is not a distribution)")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
