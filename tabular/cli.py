"""Command line: CSV in, CSV out.

    python -m tabular.cli fit train.csv --model my_model [--categorical a,b] [--steps 3000]
    python -m tabular.cli sample --model my_model -n 1000 --out synth.csv [--condition sex=Female]
    python -m tabular.cli impute --model my_model --input holes.csv --out filled.csv
    python -m tabular.cli report --real train.csv --synthetic synth.csv --holdout test.csv \
        [--target income --task classification] [--baseline] --out report_dir

Errors in the input (a bad column, an unparseable value) end with one line naming it and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _parse_conditions(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--condition must look like column=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            v = json.loads(v)  # numbers, true/false, quoted strings
        except json.JSONDecodeError:
            pass
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tabular.cli", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit CDTD on a CSV and save the model")
    f.add_argument("csv")
    f.add_argument("--model", required=True, help="output directory of the model")
    f.add_argument("--categorical", default="", help="comma-separated categorical columns (others inferred)")
    f.add_argument("--steps", type=int, default=3000)
    f.add_argument("--batch-size", type=int, default=1024)
    f.add_argument("--denoiser", default="mlp", choices=["mlp", "transformer"])
    f.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("sample", help="sample rows from a saved model")
    s.add_argument("--model", required=True)
    s.add_argument("-n", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--condition", action="append", help="column=value, repeatable")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    i = sub.add_parser("impute", help="fill the missing cells of a CSV")
    i.add_argument("--model", required=True)
    i.add_argument("--input", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report", help="fidelity report of a synthetic CSV")
    r.add_argument("--real", required=True, help="the training CSV the generator saw")
    r.add_argument("--synthetic", required=True, action="append", help="NAME=path.csv or path.csv, repeatable")
    r.add_argument("--holdout", required=True, help="real rows the generator did not see")
    r.add_argument("--target")
    r.add_argument("--task", choices=["classification", "regression"])
    r.add_argument("--categorical", default="")
    r.add_argument("--baseline", action="store_true", help="add a Gaussian copula fitted on --real")
    r.add_argument("--out", required=True)
    for q in (f, s, i, r):
        q.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from .api import TabularDiffusion
    from .data import load_csv

    try:
        if args.cmd == "fit":
            cats = [c for c in args.categorical.split(",") if c] or None
            m = TabularDiffusion(steps=args.steps, batch_size=args.batch_size, denoiser=args.denoiser, seed=args.seed)
            m.fit(load_csv(args.csv), categorical=cats)
            m.save(args.model)
            print(f"saved {args.model} ({m.fit_steps} steps, {m.fit_seconds:.0f} s)")
        elif args.cmd == "sample":
            m = TabularDiffusion.load(args.model)
            df = m.sample(args.n, conditions=_parse_conditions(args.condition), seed=args.seed, steps=args.steps)
            df.to_csv(args.out, index=False)
            print(f"wrote {len(df)} rows to {args.out}")
        elif args.cmd == "impute":
            m = TabularDiffusion.load(args.model)
            df = load_csv(args.input)
            out = m.impute(df, seed=args.seed)
            out.to_csv(args.out, index=False)
            print(f"filled {int(df.isna().to_numpy().sum())} cells; wrote {args.out}")
        else:
            from .baseline import GaussianCopula
            from .metrics import fidelity_report, plot_report
            from .schema import infer_schema

            real, holdout = load_csv(args.real), load_csv(args.holdout)
            cats = [c for c in args.categorical.split(",") if c] or None
            schema = infer_schema(real, cats)
            synth = {}
            for k, item in enumerate(args.synthetic):
                name, _, path = item.rpartition("=")
                synth[name or f"synthetic_{k}"] = load_csv(path)
            if args.baseline:
                synth["gaussian_copula"] = GaussianCopula().fit(real, schema=schema).sample(len(real))
            if args.target and not args.task:
                raise ValueError("--target needs --task classification|regression")
            rep = fidelity_report(real, holdout, synth, schema, args.target, args.task)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(json.dumps(rep, indent=1))
            plot_report(real, synth, schema, rep, out)
            print(json.dumps(rep["ranking"], indent=1))
    except (ValueError, TypeError) as e:
        print(f"tabular: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
