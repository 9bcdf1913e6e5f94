"""Sampling-speed benchmark: rows per second of a fitted (or quickly fitted) CDTD on CPU.

    python -m tabular.bench --model outputs/tabular/adult/model -n 100000 --threads 2
    python -m tabular.bench -n 100000            # fits 200 steps on Adult first (speed only)

Speed does not depend on how well the model is trained, only on its size and the sampler's NFE,
so the quick fit gives the same timing as a fully trained model of the same configuration.

Baseline, side by side in the same process: the Gaussian copula of :mod:`tabular.baseline`, fitted on
Adult's training split with the model's schema, sampling the same number of rows; the last line
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
    p.add_argument("--model", help="saved TabularDiffusion directory (default: fit a quick one on Adult)")
    p.add_argument("-n", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=10_000)
    p.add_argument("--denoiser", default="mlp", choices=["mlp", "transformer"])
    p.add_argument("--hidden", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .api import TabularDiffusion
    from .baseline import GaussianCopula
    from .data import DATASETS, load_adult

    train, _ = load_adult()
    if args.model:
        m = TabularDiffusion.load(args.model)
    else:
        m = TabularDiffusion(steps=200, batch_size=512, denoiser=args.denoiser, hidden=args.hidden, progress=False)
        m.fit(train.sample(5000, random_state=0), categorical=list(DATASETS["adult"].categorical))
    t0, c0 = time.perf_counter(), time.process_time()
    df = m.sample(args.n, seed=0, batch_size=args.batch_size, sampler=args.sampler, steps=args.steps)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    # On a shared box wall time is inflated by other processes; CPU time (all threads) is not.
    res = {"rows": len(df), "seconds": round(dt, 2), "cpu_seconds": round(cpu, 2), "rows_per_second": round(len(df) / dt, 1),
           "sampler": args.sampler or m.fit_config.sampler, "steps": args.steps or m.fit_config.sample_steps,
           "denoiser": m.model_config.denoiser, "threads": args.threads, "loadavg_1m": os.getloadavg()[0]}
    print(json.dumps(res))
    cop = GaussianCopula().fit(train[[c for c in df.columns if c in train.columns]], schema=m.schema)
    t0 = time.perf_counter()
    cop.sample(args.n, seed=0)
    base = time.perf_counter() - t0
    print(json.dumps({"baseline": "gaussian_copula", "rows": args.n, "seconds": round(base, 2)}))
    print(f"CDTD / copula sampling time for {args.n} rows: {dt / base:.1f}x ({dt:.2f} s vs {base:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
