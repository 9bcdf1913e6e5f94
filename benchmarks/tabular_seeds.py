"""The fidelity report's aggregate metrics of fitted models over several sampling seeds.

    python -m benchmarks.tabular_seeds --data adult --seeds 3 \\
        --model base=outputs/tabular/adult_base/model --model dropout=outputs/tabular/adult_do1/model

One report row is one sample of one seed, and on Adult the ML-efficiency AUC or the DCR share of a
single sample moves by about a standard error between seeds, which is the size of the differences a
recipe change makes. This samples ``len(train)`` rows per model and seed (``--first-seed`` onwards;
the model's default sampler, calibrated where it has a calibration), scores each with
:func:`tabular.metrics.evaluate` (the metrics' own classifiers seeded by the sampling seed too), adds
the Gaussian copula with ``--copula``, and prints mean +- standard deviation over the seeds of each
aggregate metric, with the train-on-real figures. ``--out`` writes every seed's figures as JSON.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

METRICS = ("ks_mean", "tv_mean", "ks_mean_holdout", "tv_mean_holdout", "corr_diff", "detection_auc", "mle_gap",
           "dcr_share")


def aggregate(rep: dict, real_score: float | None, key: str) -> dict:
    """The aggregate metrics of one :func:`tabular.metrics.evaluate` result."""
    out = {m: rep.get(m) for m in METRICS[:6]}
    out["mle"] = rep["mle"][key] if "mle" in rep else None
    out["mle_gap"] = real_score - out["mle"] if out["mle"] is not None and real_score is not None else None
    out["dcr_share"] = rep["dcr"]["share_closer_to_train"]
    out["dcr_se"] = rep["dcr"]["share_se"]
    return out


def summarise(rows: list[dict]) -> dict:
    """Mean and standard deviation (ddof 1; 0 for one seed) over seeds of each metric."""
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows if r[k] is not None]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tabular_seeds")
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="a saved TabularDiffusion directory, optionally named (repeatable)")
    p.add_argument("--data", default="adult", help="shipped data set the models were fitted on")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--copula", action="store_true", help="add the Gaussian copula fitted on the training rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.threads < 1:
        p.error(f"--seeds and --threads must be >= 1, got {args.seeds}, {args.threads}")
    from tabular.baseline import GaussianCopula
    from tabular.metrics import evaluate, ml_efficiency

    from .tabular_common import load_data_and_model, write_result

    models = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep:  # unnamed: the directory's name (its parent's for a run's .../model)
            path = item
            name = Path(item).parent.name if Path(item).name == "model" and Path(item).parent.name else Path(item).name
        if name in models:
            p.error(f"--model {item!r}: the name {name!r} is given twice; name them NAME=DIR")
        train, test, spec, models[name] = load_data_and_model(p, args.data, path, args.threads, f"--model {item!r}: ")
    schema = next(iter(models.values())).schema
    key = "auc" if spec.task == "classification" else "r2"
    real = ml_efficiency(train, test, schema, spec.target, spec.task, seed=0)[key]
    result = {"data": args.data, "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
              "real_mle": real, "models": {}, "seconds": {}}
    generators = dict(models)
    if args.copula:
        generators["gaussian_copula"] = GaussianCopula().fit(train[schema.names], schema=schema)
    for name, g in generators.items():
        rows, t0 = [], time.perf_counter()
        for seed in result["seeds"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                synth = g.sample(len(train), seed=seed)
                s = g.schema if hasattr(g, "schema") else schema
                rows.append(aggregate(evaluate(train, test, synth, s, spec.target, spec.task, seed=seed), real, key))
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items() if v is not None),
                  flush=True)
        result["models"][name] = {"per_seed": rows, "summary": summarise(rows)}
        result["seconds"][name] = round(time.perf_counter() - t0, 1)
    print(f"\n{args.seeds} sampling seeds, mean +- sd; train-on-real {key} {real:.4f}")
    print(f"{'':18s}" + "".join(f"{m:>18s}" for m in METRICS))
    for name, r in result["models"].items():
        s = r["summary"]
        print(f"{name:18s}" + "".join(f"{s[m]['mean']:>10.4f} +-{s[m]['sd']:.4f}" if m in s else f"{'--':>18s}"
                                      for m in METRICS))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
