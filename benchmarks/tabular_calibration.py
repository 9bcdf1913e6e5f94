"""Marginals of a fitted CDTD with and without its marginal calibration, against the Gaussian copula.

    python -m benchmarks.tabular_calibration --model outputs/tabular/adult_cal2/model --data adult --seeds 4

For each of ``--seeds`` sampling seeds, one sample of as many rows as the training split from:

- the model uncalibrated;
- the model calibrated (the calibration saved with it, or a new one with ``--recalibrate``);
- the Gaussian copula of :mod:`tabular.baseline`, fitted on the same training rows;
- a multinomial draw from the training table's own category frequencies. This is the least TV any
  sampler of independent rows can expect: the copula's categories are such a draw.

Each is scored with the fidelity report's mean KS and TV, against the training rows and against the
holdout. Prints the means over the seeds, the calibrated model's figures over the copula's, and
writes ``--out`` (JSON) when given. ``--condition COL=VALUE`` adds conditional samples (uncalibrated
and calibrated) scored against the training rows with that value: the calibration is fitted on
unconditional draws, and this shows what it does to conditionals.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def _means(shapes: dict) -> dict:
    """:func:`tabular.metrics.shape_means` keyed ks / tv / ks_holdout / tv_holdout."""
    from tabular.metrics import shape_means

    return {k.replace("_mean", ""): v for k, v in shape_means(shapes).items()}


def fmt(x, width: int = 7) -> str:
    return f"{x:{width}.4f}" if x is not None else f"{'--':>{width}s}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "--"


def multinomial_tv(train, schema, n: int, rng: np.random.Generator) -> float:
    """Mean TV against ``train`` of a multinomial draw of ``n`` rows from each categorical column's
    own frequencies (missing values a category of their own, as the report counts them)."""
    tvs = []
    for c in schema.categorical:
        p = train[c.name].astype(object).where(train[c.name].notna(), "<NaN>").value_counts(normalize=True).to_numpy()
        tvs.append(0.5 * float(np.abs(rng.multinomial(n, p) / n - p).sum()))
    return float(np.mean(tvs)) if tvs else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tabular_calibration")
    p.add_argument("--model", required=True, help="saved TabularDiffusion directory")
    p.add_argument("--data", default="adult", help="shipped data set the model was fitted on")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--recalibrate", action="store_true", help="fit a new calibration (the model's settings) first")
    p.add_argument("--condition", action="append", default=[], metavar="COL=VALUE",
                   help="also compare conditional samples given COL=VALUE with the training rows that have it "
                        "(10,000 rows, seed 3; repeatable)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.threads < 1:
        p.error(f"--seeds and --threads must be >= 1, got {args.seeds}, {args.threads}")
    from tabular.baseline import GaussianCopula
    from tabular.metrics import column_shapes

    from .tabular_common import load_data_and_model, write_result

    train, test, _, m = load_data_and_model(p, args.data, args.model, args.threads)
    result = {"model": args.model, "data": args.data, "rows": len(train), "seeds": args.seeds}
    if args.recalibrate or m.calibration is None:
        t0 = time.perf_counter()
        m.calibrate()
        result["calibration_seconds"] = round(time.perf_counter() - t0, 1)
    result["calibration"] = {k: m.calibration[k] for k in ("sampler", "steps", "rows", "rounds")}
    cop = GaussianCopula().fit(train[m.schema.names], schema=m.schema)
    rng = np.random.default_rng(0)
    runs = {"uncalibrated": [], "calibrated": [], "gaussian_copula": [], "multinomial_tv": []}
    for seed in range(args.seeds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the report's own warnings about tied columns
            for name, df in (("uncalibrated", m.sample(len(train), seed=seed, calibrated=False)),
                             ("calibrated", m.sample(len(train), seed=seed)),
                             ("gaussian_copula", cop.sample(len(train), seed=seed))):
                runs[name].append(_means(column_shapes(train, test, df, m.schema)))
        runs["multinomial_tv"].append(multinomial_tv(train, m.schema, len(train), rng))
        print(f"seed {seed}: " + "; ".join(f"{k} KS {fmt(v[-1]['ks'], 0)} TV {fmt(v[-1]['tv'], 0)}"
                                            for k, v in runs.items() if k != "multinomial_tv"), flush=True)
    summary = {name: {k: None if rs[0][k] is None else float(np.mean([r[k] for r in rs])) for k in rs[0]}
               for name, rs in runs.items() if name != "multinomial_tv"}
    summary["multinomial_tv"] = None if np.isnan(runs["multinomial_tv"][0]) else float(np.mean(runs["multinomial_tv"]))
    result.update(per_seed=runs, mean=summary)
    print(f"{'':16s} {'KS':>7s} {'TV':>7s} {'KS hold':>8s} {'TV hold':>8s}")
    for name in ("uncalibrated", "calibrated", "gaussian_copula"):
        s = summary[name]
        print(f"{name:16s} {fmt(s['ks'])} {fmt(s['tv'])} {fmt(s['ks_holdout'], 8)} {fmt(s['tv_holdout'], 8)}")
    print(f"{'multinomial':16s} {'':7s} {fmt(summary['multinomial_tv'])}   (exact draws from the training frequencies)")
    cal, copula = summary["calibrated"], summary["gaussian_copula"]
    print(f"calibrated / copula: KS {ratio(cal['ks'], copula['ks'])}, TV {ratio(cal['tv'], copula['tv'])}; "
          f"against the holdout KS {ratio(cal['ks_holdout'], copula['ks_holdout'])}, "
          f"TV {ratio(cal['tv_holdout'], copula['tv_holdout'])}")
    result["conditional"] = {}
    for cond in args.condition:
        col, sep, value = cond.partition("=")
        if not sep or col not in m.schema.names or m.schema[col].kind != "categorical":
            p.error(f"--condition {cond!r}: expected CATEGORICAL_COLUMN=VALUE")
        real = train[train[col].astype(str) == value]
        if real.empty:
            p.error(f"--condition {cond!r}: no training row has {col}={value!r}")
        row = {"real_rows": len(real)}
        for name, cal in (("uncalibrated", False), ("calibrated", True)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                df = m.sample(10_000, conditions={col: real[col].iloc[0]}, seed=3, calibrated=cal)
            shapes = column_shapes(real, real, df, m.schema)
            shapes.pop(col)
            row[name] = {k: v for k, v in _means(shapes).items() if not k.endswith("holdout")}
        result["conditional"][cond] = row
        print(f"given {cond} ({len(real)} training rows): KS / TV against them, uncalibrated "
              f"{fmt(row['uncalibrated']['ks'], 0)} / {fmt(row['uncalibrated']['tv'], 0)}, calibrated "
              f"{fmt(row['calibrated']['ks'], 0)} / {fmt(row['calibrated']['tv'], 0)}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
