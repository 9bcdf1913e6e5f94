"""Gaussian copula baseline for mixed-type tables, in a few lines of SciPy.

Each column is mapped to a standard normal score: numerical columns through their empirical CDF
(mid-ranks, ties share one score), categorical columns by giving category ``k`` the interval
``[F_{k-1}, F_k)`` of the cumulative frequencies (categories ordered by frequency) and using its
midpoint (the SDV ``GaussianCopula`` encoding, Patki et al. 2016). The scores' correlation matrix
is estimated; sampling draws ``z ~ N(0, R)`` and maps each coordinate back through the inverse
marginal (empirical quantiles for numbers, the interval that contains ``Phi(z)`` for categories).
Missing numerical values are reproduced by their rate, independently of the rest.

Imputation (:meth:`GaussianCopula.impute`) draws the missing scores of a row from the normal
conditional on its observed ones (an observed category stands at its interval's midpoint, as in
the encoding) and maps them back the same way; imputed categories are never the missing one.

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
                self.marginals[col.name] = ("cat", cats, hi, mid)
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
                _, cats, hi, _ = m
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

    def _scores(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Normal scores of ``df``'s cells (the encoding of :meth:`fit`) and which are observed."""
        n = len(df)
        z, obs = np.zeros((n, len(self.columns))), np.zeros((n, len(self.columns)), bool)
        for i, name in enumerate(self.columns):
            m, s = self.marginals[name], df[name]
            if m[0] == "num":
                try:
                    x = pd.to_numeric(s, errors="raise").to_numpy(np.float64)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"column {name!r}: {e}") from None
                o = ~np.isnan(x)
                sx = m[1]
                # mid-rank of each value among the training values, as fit scored them
                rank = (np.searchsorted(sx, x[o], "left") + np.searchsorted(sx, x[o], "right")) / 2
                z[o, i] = ndtri(np.clip(rank / len(sx), 0.5 / len(sx), 1 - 0.5 / len(sx)))
            else:
                o = s.notna().to_numpy()
                mid = m[3]
                unseen = [v for v in pd.unique(s[o]) if v not in mid]
                if unseen:
                    raise ValueError(f"column {name!r}: category {unseen[0]!r} was not seen when the copula was fitted")
                z[o, i] = ndtri(np.clip(s[o].map(mid).to_numpy(np.float64), 1e-9, 1 - 1e-9))
            obs[:, i] = o
        return z, obs

    def impute(self, df: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
        """Fill every missing cell of ``df`` with a draw from the copula given the row's observed cells;
        observed cells are returned unchanged."""
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
        missing_cols = [c for c in self.columns if c not in df.columns]
        if missing_cols:
            raise ValueError(f"column {missing_cols[0]!r} of the fitted copula is missing from the DataFrame")
        rng = np.random.default_rng(seed)
        z, obs = self._scores(df)
        R = self.corr
        patterns, inverse = np.unique(obs, axis=0, return_inverse=True)
        for k, pattern in enumerate(patterns):
            rows = np.flatnonzero(inverse.ravel() == k)
            mis, o = np.flatnonzero(~pattern), np.flatnonzero(pattern)
            if not len(mis):
                continue
            if len(o):
                w = np.linalg.solve(R[np.ix_(o, o)], R[np.ix_(o, mis)])  # (|o|, |m|)
                mean = z[np.ix_(rows, o)] @ w
                cov = R[np.ix_(mis, mis)] - R[np.ix_(mis, o)] @ w
            else:
                mean, cov = np.zeros((len(rows), len(mis))), R[np.ix_(mis, mis)]
            vals, vecs = np.linalg.eigh((cov + cov.T) / 2)
            root = vecs * np.sqrt(np.clip(vals, 0, None))
            z[np.ix_(rows, mis)] = mean + rng.standard_normal((len(rows), len(mis))) @ root.T
        u = ndtr(z)
        out = df.copy()
        for i, name in enumerate(self.columns):
            fill = ~obs[:, i]
            if not fill.any():
                continue
            m = self.marginals[name]
            if m[0] == "num":
                v = np.quantile(m[1], u[fill, i], method="linear")
                if m[3]:
                    v = np.round(v)
            else:
                cats, hi = m[1], m[2]
                p = np.diff(np.concatenate([[0.0], hi]))
                keep = np.array([c is not None for c in cats])  # never impute "missing"
                if not keep.any():
                    raise ValueError(f"column {name!r} has only missing values; nothing to impute")
                cum = np.cumsum(np.where(keep, p, 0.0))
                cum /= cum[-1]
                idx = np.minimum(np.searchsorted(cum, u[fill, i], side="right"), len(cats) - 1)
                v = np.asarray(cats, dtype=object)[idx]
            if out[name].dtype != object and v.dtype == object:
                out[name] = out[name].astype(object)
            out.iloc[np.flatnonzero(fill), out.columns.get_loc(name)] = v  # by position: labels may repeat
        for col in self.schema.columns:
            if col.kind == "constant" and col.name in out.columns:
                out[col.name] = out[col.name].where(out[col.name].notna(), col.value)
        return out
