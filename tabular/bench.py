"""Sampling-speed benchmark: rows per second of a fitted (or quickly fitted) CDTD on CPU.

    python -m tabular.bench --model outputs/tabular/adult/model -n 100000 --threads 2
    python -m tabular.bench -n 100000            # fits 200 steps on Adult first (speed only)
    python -m tabular.bench --model outputs/tabular/german/model --data german -n 100000

Speed does not depend on how well the model is trained, only on its size and the sampler's NFE,
so the quick fit gives the same timing as a fully trained model of the same configuration.

Baseline, side by side in the same process: the Gaussian copula of :mod:`tabular.baseline`, fitted on
the training split of ``--data`` (Adult by default; the model's data set) with the model's schema, sampling the same number of rows; the last line
prints CDTD's time over the copula's.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tabular.bench")
    p.add_argument("--model", help="saved TabularDiffusion directory (default: fit a quick one on --data)")
    p.add_argument("--data", default="adult", help="shipped data set of the quick fit and the copula baseline")
    p.add_argument("-n", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--denoiser", default="mlp", choices=["mlp", "transformer"])
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args(argv)
    for flag, val in (("-n", args.n), ("--threads", args.threads), ("--batch-size", args.batch_size)):
        if val < 1:
            p.error(f"{flag} must be >= 1, got {val}")
    from .api import TabularDiffusion
    from .baseline import GaussianCopula
    from .data import DATASETS, load_dataset

    if args.data not in DATASETS:
        p.error(f"unknown --data {args.data!r}; choose one of {sorted(DATASETS)}")
    torch.set_num_threads(args.threads)
    train, _, spec = load_dataset(args.data)
    if args.model:
        m = TabularDiffusion.load(args.model)
        missing = [c for c in m.schema.names if c not in train.columns]
        if missing:  # the copula baseline is fitted on the model's own data
            p.error(f"the model's columns {missing} are not in --data {args.data!r}; name the model's data set")
    else:
        # a light calibration: speed only needs the calibrated code path, not a precise one
        m = TabularDiffusion(steps=200, batch_size=512, denoiser=args.denoiser, hidden=args.hidden, progress=False,
                             calibration_rows=10_000, calibration_rounds=2)
        m.fit(train.sample(min(5000, len(train)), random_state=0), categorical=list(spec.categorical))
    t0, c0 = time.perf_counter(), time.process_time()
    df = m.sample(args.n, seed=0, batch_size=args.batch_size, sampler=args.sampler, steps=args.steps)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    # On a shared box wall time is inflated by other processes; CPU time (all threads) is not.
    res = {"rows": len(df), "seconds": round(dt, 2), "cpu_seconds": round(cpu, 2), "rows_per_second": round(len(df) / dt, 1),
           "sampler": args.sampler or m.fit_config.sampler, "steps": args.steps or m.fit_config.sample_steps,
           "denoiser": m.model_config.denoiser, "threads": args.threads, "loadavg_1m": os.getloadavg()[0]}
    print(json.dumps(res))
    cop = GaussianCopula().fit(train[m.schema.names], schema=m.schema)
    t0, c0 = time.perf_counter(), time.process_time()
    cop.sample(args.n, seed=0)
    base, base_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"baseline": "gaussian_copula", "rows": args.n, "seconds": round(base, 2),
                      "cpu_seconds": round(base_cpu, 2)}))
    print(f"CDTD / copula sampling time for {args.n} rows: {dt / base:.1f}x ({dt:.2f} s vs {base:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
