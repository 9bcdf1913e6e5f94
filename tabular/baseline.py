"""Gaussian copula baseline for mixed-type tables, in a few lines of SciPy.

Each column is mapped to a standard normal score: numerical columns through their empirical CDF
(mid-ranks, ties share one score), categorical columns by giving category ``k`` the interval
``[F_{k-1}, F_k)`` of the cumulative frequencies (categories ordered by frequency) and using its
midpoint (the SDV ``GaussianCopula`` encoding, Patki et al. 2016). The scores' correlation matrix
is estimated; sampling draws ``z ~ N(0, R)`` and maps each coordinate back through the inverse
marginal (empirical quantiles for numbers, the interval that contains ``Phi(z)`` for categories).
Missing numerical values are reproduced by their rate, independently of the rest.

What the copula cannot represent (non-Gaussian dependence, interactions) is what a user sees the
diffusion model buy in the side-by-side report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri
from scipy.stats import rankdata

from .schema import Schema, constant_series, infer_schema


class GaussianCopula:
    """``GaussianCopula().fit(df, categorical=[...]).sample(n, seed=0)``."""

    def fit(self, df: pd.DataFrame, categorical: list[str] | None = None, schema: Schema | None = None):
        self.schema = schema or infer_schema(df, categorical)
        n = len(df)
        z, self.marginals = [], {}
        for col in self.schema.columns:
            s = df[col.name]
            if col.kind == "numerical":
                x = pd.to_numeric(s).to_numpy(np.float64)
                obs = ~np.isnan(x)
                u = np.full(n, 0.5)
                u[obs] = (rankdata(x[obs]) - 0.5) / obs.sum()
                self.marginals[col.name] = ("num", np.sort(x[obs]), 1.0 - obs.mean(), col.integer)
                z.append(ndtri(u))
            elif col.kind == "categorical":
                vals = s.astype(object).where(s.notna(), None)
                freq = vals.value_counts(dropna=False, normalize=True)
                cats, p = list(freq.index), freq.to_numpy()
                hi = np.cumsum(p)
                lo = hi - p
                mid = dict(zip(cats, (lo + hi) / 2, strict=True))
                self.marginals[col.name] = ("cat", cats, hi)
                z.append(ndtri(np.clip(vals.map(mid).to_numpy(np.float64), 1e-9, 1 - 1e-9)))
        self.columns = [c.name for c in self.schema.columns if c.kind != "constant"]
        zz = np.stack(z, 1) if z else np.zeros((n, 0))
        self.corr = np.corrcoef(zz, rowvar=False) if zz.shape[1] > 1 else np.eye(zz.shape[1])
        self.corr = np.nan_to_num(self.corr) + 1e-9 * np.eye(len(self.columns))
        return self

    def sample(self, n: int, seed: int = 0) -> pd.DataFrame:
        rng = np.random.default_rng(seed)
        k = len(self.columns)
        z = rng.multivariate_normal(np.zeros(k), self.corr, size=n, method="eigh") if k else np.zeros((n, 0))
        u = ndtr(z)
        out = {}
        for i, name in enumerate(self.columns):
            m = self.marginals[name]
            if m[0] == "num":
                _, sorted_x, miss_rate, integer = m
                v = np.quantile(sorted_x, u[:, i], method="linear")
                if integer:
                    v = np.round(v)
                if miss_rate > 0:
                    v = np.where(rng.random(n) < miss_rate, np.nan, v)
                out[name] = v
            else:
                _, cats, hi = m
                idx = np.minimum(np.searchsorted(hi, u[:, i], side="right"), len(cats) - 1)
                out[name] = np.asarray(cats, dtype=object)[idx]
        for col in self.schema.columns:
            if col.kind == "constant":
                out[col.name] = constant_series(col, n).to_numpy()
        df = pd.DataFrame({c: out[c] for c in self.schema.names})
        for col in self.schema.numerical:
            if col.integer and not df[col.name].isna().any():
                df[col.name] = df[col.name].astype("int64")
        return df
