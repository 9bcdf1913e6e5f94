"""Column schema of a table: which columns are numerical, categorical or constant, inferred or given.

A :class:`Schema` is what a fitted model remembers about the user's DataFrame (column order,
types, categories, integer columns, where values may be missing) and is saved as JSON next to
the weights. :func:`infer_schema` is the boundary where a user's table is checked: every
problem raises :class:`TabularInputError` (a ``ValueError``) naming the column (and the offending
value where there is one).

Missing values are never dropped: a missing category becomes its own category ``MISSING``
(CDTD treats categories as unordered tokens, so this is exact), and a numerical column with
NaN gets a missingness flag that the model learns as one more binary categorical feature
(see :mod:`tabular.model`).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

MISSING = "<missing>"  # the category that stands for a missing categorical value
KINDS = ("numerical", "categorical", "constant")


class TabularInputError(ValueError):
    """A user's table, CSV file or column declaration is unusable; the message names the column or value.

    Raised only where user input is checked (:func:`infer_schema`, :meth:`Schema.check_frame`,
    :class:`tabular.data.TableEncoder`, :func:`tabular.data.load_csv`), so that an entry point can
    report it as bad input (``python -m tabular.train`` exits with code 2 and one line) while any
    other ``ValueError``, a bug included, keeps its traceback. A ``ValueError``, so callers that catch
    ``ValueError`` are unaffected.
    """


@dataclass
class Column:
    """One column: ``kind`` numerical | categorical | constant.

    numerical: ``integer`` (round on output), ``has_missing`` (NaN seen in training), ``lo``/``hi``
    (observed range, used to clip the inverse transform). categorical: ``categories`` (strings,
    ``MISSING`` included when NaN was seen), ``dtype`` of the original values (``str``, ``int``,
    ``float`` or ``bool``) to restore on output. constant: ``value`` (a JSON scalar, or None for a
    column that is entirely missing is refused).
    """

    name: str
    kind: str
    integer: bool = False
    has_missing: bool = False
    lo: float | None = None
    hi: float | None = None
    categories: list[str] = field(default_factory=list)
    dtype: str = "str"
    value: object = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")


@dataclass
class Schema:
    columns: list[Column]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def numerical(self) -> list[Column]:
        return [c for c in self.columns if c.kind == "numerical"]

    @property
    def categorical(self) -> list[Column]:
        return [c for c in self.columns if c.kind == "categorical"]

    def __getitem__(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"no column {name!r} in the schema; columns are {self.names}")

    def to_json(self) -> str:
        return json.dumps({"columns": [asdict(c) for c in self.columns]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Schema:
        data = json.loads(text)
        return cls([Column(**c) for c in data["columns"]])

    def check_frame(self, df: pd.DataFrame, *, allow_subset: bool = False) -> None:
        """Raise :class:`TabularInputError` naming the first column of ``df`` that this schema does not know or lacks."""
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
        unknown = [c for c in df.columns if c not in self.names]
        if unknown:
            raise TabularInputError(f"column {unknown[0]!r} is not in the fitted schema; columns are {self.names}")
        if not allow_subset:
            missing = [c for c in self.names if c not in df.columns]
            if missing:
                raise TabularInputError(f"column {missing[0]!r} of the fitted schema is missing from the DataFrame")


def _parse_numeric(name: str, s: pd.Series) -> pd.Series:
    """``s`` as float64; NaN stays NaN, an unparseable entry raises :class:`TabularInputError` naming it."""
    if pd.api.types.is_bool_dtype(s):
        raise TabularInputError(f"column {name!r} holds booleans; declare it categorical")
    out = pd.to_numeric(s, errors="coerce").astype("float64")
    bad = out.isna() & s.notna()
    if bad.any():
        row = s.index[bad][0]
        row = row.item() if isinstance(row, np.generic) else row  # row 4, not row np.int64(4)
        raise TabularInputError(f"column {name!r}: value {s[bad].iloc[0]!r} (row {row!r}) is not a number")
    if np.isinf(out.to_numpy()).any():
        raise TabularInputError(f"column {name!r} holds an infinite value; replace it with a number or NaN")
    return out


def _category_dtype(s: pd.Series) -> str:
    """The type a categorical column's values are given back in. An object column is typed by its
    values: ``read_csv`` of a True/False or integer column with blanks gives object dtype, and its
    samples should still be bools or ints, as the observed cells ``impute`` keeps are."""
    v = s.dropna()
    if pd.api.types.is_bool_dtype(v):
        return "bool"
    if pd.api.types.is_integer_dtype(v):
        return "int"
    if pd.api.types.is_float_dtype(v):
        return "float"
    kind = pd.api.types.infer_dtype(v, skipna=True)
    if kind == "boolean":
        return "bool"
    if kind == "integer":
        return "int"
    if kind in ("floating", "mixed-integer-float"):
        return "float"
    return "str"


def _int_category(v: str) -> int:
    """An int category's string back to the int, exactly (``int(float(v))`` rounds above 2**53);
    '3.0' (an older spelling) still reads as 3."""
    try:
        return int(v)
    except ValueError:
        return int(float(v))


def _category_string(v) -> str:
    # An integer column that gained NaN turns float (1 -> 1.0): write integral floats as integers so
    # that the same category has one spelling whatever the column's dtype.
    if isinstance(v, float | np.floating) and float(v).is_integer():
        return str(int(v))
    return str(v)


def category_strings(s: pd.Series) -> pd.Series:
    """Categorical values as strings, NaN as :data:`MISSING`, integral floats as integers ('1', not '1.0')."""
    return s.astype(object).where(s.notna(), MISSING).map(_category_string)


def _looks_numeric(s: pd.Series) -> tuple[bool, object]:
    """An object column whose non-missing entries are mostly numbers: (True, first bad value)."""
    v = s.dropna()
    if v.empty:
        return False, None
    parsed = pd.to_numeric(v, errors="coerce")
    ok = parsed.notna()
    if ok.mean() >= 0.95 and not ok.all():
        return True, v[~ok].iloc[0]
    return False, None


def _check_values(name: str, s: pd.Series) -> None:
    """Refuse what no column kind can model: dates and durations (a category per date would come
    back as text, and as numbers they would lose their type), and values such as lists that are not
    scalars; the error names the column (and the value)."""
    time_kinds = ("datetime64", "datetime", "date", "timedelta64", "timedelta", "time", "period")
    if pd.api.types.is_datetime64_any_dtype(s) or pd.api.types.is_timedelta64_dtype(s) \
            or isinstance(s.dtype, pd.PeriodDtype) or (s.dtype == object and pd.api.types.infer_dtype(s, skipna=True) in time_kinds):
        raise TabularInputError(f"column {name!r} holds dates, times or durations ({s.dtype}), which cannot be "
                                f"modelled: convert it to a number (e.g. days since a reference date, or seconds), "
                                f"or to text to model it as categories")
    if s.dtype == object:
        for v in s:
            if not (v is None or pd.api.types.is_scalar(v)):
                raise TabularInputError(f"column {name!r}: value {v!r} is a {type(v).__name__}, not a single value; "
                                        f"only numbers, text and booleans can be modelled")


NUMERIC_TEXT_WARN = 20  # an object column of more distinct numbers than this gets a warning


def infer_schema(
    df: pd.DataFrame,
    categorical: list[str] | None = None,
    numerical: list[str] | None = None,
    *,
    max_categories: int = 1000,
    binary_as_categorical: bool = True,
    constant: str = "keep",
) -> Schema:
    """Types of the columns of ``df``: the given lists win, the rest is inferred.

    Inference: bool, object, string and category dtypes are categorical; numeric dtypes are
    numerical, except columns with at most two distinct values (``binary_as_categorical``). An
    object column whose entries are numbers except for a few (>= 95% parse) raises, naming the
    unparseable value: it is almost always a data error, not a category. A column with one
    distinct value (NaN counts as a value) is a constant: kept and reproduced (``constant='keep'``,
    with a warning) or refused (``constant='error'``). An entirely missing column is refused.
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
    if df.shape[1] == 0:
        raise TabularInputError("the DataFrame has no columns")
    if len(df) < 2:
        raise TabularInputError(f"the DataFrame has {len(df)} rows; at least 2 are needed")
    if constant not in ("keep", "error"):
        raise ValueError(f"constant must be 'keep' or 'error', got {constant!r}")
    names = [str(c) for c in df.columns]
    dup = [n for n in names if names.count(n) > 1]
    if dup:
        raise TabularInputError(f"column name {dup[0]!r} occurs more than once")
    if any(not isinstance(c, str) for c in df.columns):
        bad = next(c for c in df.columns if not isinstance(c, str))
        raise TypeError(f"column names must be strings, got {bad!r}")
    categorical = list(categorical or [])
    numerical = list(numerical or [])
    for group, label in ((categorical, "categorical"), (numerical, "numerical")):
        for c in group:
            if c not in df.columns:
                raise TabularInputError(f"{label} column {c!r} is not in the DataFrame; columns are {names}")
    both = set(categorical) & set(numerical)
    if both:
        raise TabularInputError(f"column {sorted(both)[0]!r} is declared both categorical and numerical")

    cols = []
    for name in df.columns:
        s = df[name]
        _check_values(name, s)
        if s.isna().all():
            raise TabularInputError(f"column {name!r} is entirely missing; drop it or fill it")
        if name in categorical:
            kind = "categorical"
        elif name in numerical:
            kind = "numerical"
        elif pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
            numeric_like, bad = _looks_numeric(s) if s.dtype == object else (False, None)
            if numeric_like:
                raise TabularInputError(f"column {name!r}: value {bad!r} is not a number although the column "
                                 f"otherwise holds numbers; fix it, or declare the column categorical")
            kind = "categorical"
            if s.dtype == object and name not in categorical:
                v = s.dropna()
                k = v.nunique()
                if k > NUMERIC_TEXT_WARN and pd.to_numeric(v, errors="coerce").notna().all():
                    warnings.warn(f"column {name!r} holds numbers stored as text ({k} distinct values): it is "
                                  f"modelled as categorical; pass numerical=[{name!r}] to model it as a number, or "
                                  f"categorical=[{name!r}] to keep it a category without this warning", stacklevel=2)
        else:
            kind = "categorical" if (binary_as_categorical and s.nunique(dropna=True) <= 2) else "numerical"

        n_distinct = s.nunique(dropna=False)
        if n_distinct == 1:
            if constant == "error":
                raise TabularInputError(f"column {name!r} is constant (every value is {s.iloc[0]!r}); drop it")
            warnings.warn(f"column {name!r} is constant ({s.iloc[0]!r}): it is reproduced, not modelled",
                          stacklevel=2)
            v = s.iloc[0]
            v = v.item() if hasattr(v, "item") else v
            cols.append(Column(name, "constant", value=v, dtype=_category_dtype(s)))
            continue

        if kind == "numerical":
            x = _parse_numeric(name, s)
            obs = x.dropna()
            if obs.nunique() == 1:
                # one number plus NaN: the information is the missingness pattern alone.
                kind = "categorical"
            else:
                integer = bool(np.all(np.mod(obs.to_numpy(), 1.0) == 0.0))
                cols.append(Column(name, "numerical", integer=integer, has_missing=bool(x.isna().any()),
                                   lo=float(obs.min()), hi=float(obs.max())))
                continue
        strings = category_strings(s)
        cats = sorted(strings.unique().tolist())
        if len(cats) > max_categories:
            raise TabularInputError(f"column {name!r} has {len(cats)} distinct values (> max_categories={max_categories}); "
                             f"an identifier or free text cannot be modelled as a category")
        cols.append(Column(name, "categorical", has_missing=MISSING in cats, categories=cats,
                           dtype=_category_dtype(s)))
    return Schema(cols)


def restore_categories(col: Column, values: np.ndarray) -> pd.Series:
    """Category strings back to the user's dtype (int, float, bool or str); ``MISSING`` -> NaN."""
    s = pd.Series(values, dtype=object)
    miss = s == MISSING
    if col.dtype == "int":
        out = s.where(~miss, None).map(lambda v: None if v is None else _int_category(v))
        return out.astype("Int64") if miss.any() else out.astype("int64")
    if col.dtype == "float":
        return s.where(~miss, "nan").astype("float64")
    if col.dtype == "bool":
        out = s.map(lambda v: None if v == MISSING else v == "True")
        return out.astype("boolean") if miss.any() else out.astype(bool)
    return s.where(~miss, np.nan)


def constant_series(col: Column, n: int) -> pd.Series:
    v = col.value
    if isinstance(v, float) and math.isnan(v):
        return pd.Series(np.full(n, np.nan))
    return pd.Series([v] * n)


def _is_number(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def infer_task(schema: Schema, target: str | None, task: str | None = None) -> str | None:
    """``task`` if given, else the task the target's column type implies: ``"classification"`` for a
    categorical target, ``"regression"`` for a numerical one (None without a target). A target that is
    not a column or is constant is refused by :func:`check_holdout`, which should follow."""
    if task is not None or target is None or target not in schema.names:
        return task
    kind = schema[target].kind
    return {"categorical": "classification", "numerical": "regression"}.get(kind)


def check_holdout(schema: Schema, df: pd.DataFrame, target: str | None = None, task: str | None = None, *,
                  where: str = "holdout") -> dict:
    """Check a table that is scored against a fitted ``schema`` but never trained on (the holdout of the
    fidelity report: ML-efficiency test set, DCR holdout, detection) and say what in it training never saw.

    Raises :class:`TabularInputError` naming ``where``, the column and the value for what cannot be a
    value of the column: a column the schema does not know or lacks, a numerical entry that is not a
    number (a typo would otherwise become NaN silently), an infinity, a non-number in a categorical
    column whose training values are all numbers (int/float dtype or numeric strings), a non-boolean in
    a boolean column, a category that differs from a training category only in case or surrounding
    spaces ('male' for 'Male'), and a ``target`` class that training never had (``task`` classification:
    train-on-synthetic models can never predict it; Adult's raw test labels '>50K.' are that case). A
    ``target`` that is not a column, constant, categorical with ``task`` regression or numerical with
    ``task`` classification is refused too.

    Any other unseen category is normal in real data (Adult's rare native countries, a subsampled
    training table) and is handled by :mod:`tabular.metrics`: gradient boosting sends a category unseen
    in its training data down the missing-value branch, and in DCR's one-hot space it matches no
    training category. It is counted, not refused. Returns ``{"rows", "unseen_categories": {column:
    {value: count}}, "missing_not_in_train": {numerical column: count}}`` (empty dicts when nothing is
    new) and warns once when either is non-empty. ``df`` is not modified.
    """
    try:
        schema.check_frame(df)
    except TabularInputError as e:
        raise TabularInputError(f"{where}: {e}") from None
    if target is not None:
        if target not in schema.names:
            raise TabularInputError(f"target {target!r} is not a column; columns are {schema.names}")
        kind = schema[target].kind
        if kind == "constant":
            raise TabularInputError(f"target {target!r} is constant in the training data: there is nothing to predict")
        if task == "regression" and kind != "numerical":
            raise TabularInputError(f"target {target!r} is {kind} but the task is regression; "
                                    f"use task classification or a numerical target")
        if task == "classification" and kind == "numerical":
            # Generated numbers are continuous: their classes would be any value, and the holdout's
            # classes could not be checked against training's. A label column is a categorical column.
            raise TabularInputError(f"target {target!r} is numerical but the task is classification; fit it "
                                    f"as a category (categorical=[..., {target!r}]) or use task regression")
    unseen, new_missing = {}, {}
    for col in schema.columns:
        s = df[col.name]
        if col.kind == "numerical":
            try:
                x = _parse_numeric(col.name, s)
            except TabularInputError as e:
                raise TabularInputError(f"{where}: {e}") from None
            n_miss = int(x.isna().sum())
            if n_miss and not col.has_missing:  # NaN-aware metrics handle it; worth knowing
                new_missing[col.name] = n_miss
        elif col.kind == "categorical":
            strings = category_strings(s)
            new = strings[~strings.isin(col.categories)]
            if new.empty:
                continue
            counts = new.value_counts()
            known = [c for c in col.categories if c != MISSING]
            for value in counts.index:
                if value == MISSING:
                    continue
                if col.dtype in ("int", "float") or (col.dtype == "str" and known and all(map(_is_number, known))):
                    if not _is_number(value):
                        raise TabularInputError(f"{where}: column {col.name!r}: value {value!r} is not a number "
                                                f"although every training value of the column is")
                if col.dtype == "bool" and value not in ("True", "False"):
                    raise TabularInputError(f"{where}: column {col.name!r}: value {value!r} is not a boolean "
                                            f"although the column holds True/False")
                twin = [c for c in known if c.strip().casefold() == value.strip().casefold()]
                if twin:
                    raise TabularInputError(f"{where}: column {col.name!r}: value {value!r} is not a training "
                                            f"category; did you mean {twin[0]!r}? (differs only in case or spaces)")
            if col.name == target and task == "classification":
                value = counts.index[0]
                what = "missing labels" if value == MISSING else f"class {value!r}"
                raise TabularInputError(f"{where}: target {col.name!r}: {what} ({int(counts.iloc[0])} rows) never "
                                        f"occurs in training (classes: {col.categories[:10]})")
            unseen[col.name] = {str(k): int(v) for k, v in counts.items()}
    if unseen or new_missing:
        parts = [f"{c!r}: {list(v)[:5]}{'...' if len(v) > 5 else ''}" for c, v in unseen.items()]
        parts += [f"{c!r}: {n} missing" for c, n in new_missing.items()]
        warnings.warn(f"{where}: values never seen in training (scored as unseen, not refused): "
                      + "; ".join(parts), stacklevel=2)
    return {"rows": int(len(df)), "unseen_categories": unseen, "missing_not_in_train": new_missing}
