"""Command line: CSV in, CSV out.

    python -m tabular.cli fit train.csv --model my_model [--categorical a,b] [--steps 3000]
    python -m tabular.cli sample --model my_model -n 1000 --out synth.csv [--condition sex=Female]
    python -m tabular.cli impute --model my_model --input holes.csv --out filled.csv
    python -m tabular.cli report --real train.csv --synthetic synth.csv --holdout test.csv \
        [--target income --task classification] [--baseline] --out report_dir

Errors in the input end with one line naming it and exit code 2: a bad column or an unparseable
value in a CSV (:class:`~tabular.schema.TabularInputError`, the holdout and synthetic CSVs of
``report`` included, checked against the schema of ``--real``), a missing input file or model
directory, and arguments the CLI rejects. Any other exception, a ``ValueError`` from a bug included,
keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .schema import TabularInputError


class UsageError(Exception):
    """An argument the CLI rejects after parsing (a malformed ``--condition``, a missing model
    directory, ...): reported like bad input, one line and exit code 2."""


def _positive_int(text: str, least: int = 1) -> int:
    try:
        v = int(text)
    except ValueError:
        what = "a positive" if least == 1 else "a non-negative"
        raise argparse.ArgumentTypeError(f"expected {what} integer, got {text!r}") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {v}")
    return v


def _nonnegative_int(text: str) -> int:
    return _positive_int(text, least=0)


def _probability(text: str) -> float:
    """A float in [0, 1) (dropout)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def _output_file(path: str, flag: str) -> str:
    """An output file, checked before any work: its directory exists and it is not itself a directory."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path!r}: directory {str(parent)!r} does not exist")
    if Path(path).is_dir():
        raise UsageError(f"{flag} {path!r} is a directory; give the path of the file to write")
    return path


def _output_dir(path: str, flag: str) -> str:
    """An output directory (created when written), checked before any work: not an existing file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path!r} is an existing file; give a directory (it is created if absent)")
    return path


def _load_model(path: str):
    from .api import SavedModelError, TabularDiffusion

    for name in ("model.safetensors", "tabular.json"):
        if not (Path(path) / name).is_file():
            raise UsageError(f"--model {path!r} is not a saved model ({name} is missing)")
    try:
        return TabularDiffusion.load(path)
    except SavedModelError as e:  # e.g. weights and metadata of two different saves
        raise UsageError(f"--model {path!r}: {e}") from None


def _check_conditions(conditions: dict, schema) -> None:
    """The CLI's own check of ``--condition`` columns (values are checked by the encoder)."""
    for name, value in conditions.items():
        if name not in schema.names:
            raise UsageError(f"--condition on unknown column {name!r}; columns are {schema.names}")
        col = schema[name]
        if col.kind == "constant" and value != col.value:
            raise UsageError(f"--condition {name}={value!r}: the column is constant ({col.value!r}) in the "
                             f"training data")


def _parse_conditions(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--condition must look like column=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            v = json.loads(v)  # numbers, true/false, quoted strings
        except json.JSONDecodeError:
            pass
        out[k] = v
    return out


def _synthetic_item(item: str, k: int) -> tuple[str, str]:
    """``--synthetic NAME=path.csv`` or ``path.csv`` as (name, path). An existing file is a path even
    when it holds '=' (hydra run folders such as ``runs/lr=0.001/synth.csv``); otherwise the name is
    what comes before the first '=', so a path with '=' can still be given a name."""
    if Path(item).is_file() or "=" not in item:
        return f"synthetic_{k}", item
    name, _, path = item.partition("=")
    return name or f"synthetic_{k}", path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tabular.cli", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit CDTD on a CSV and save the model")
    f.add_argument("csv")
    f.add_argument("--model", required=True, help="output directory of the model")
    f.add_argument("--categorical", default="", help="comma-separated categorical columns (others inferred)")
    f.add_argument("--steps", type=_positive_int, default=3000)
    f.add_argument("--batch-size", type=_positive_int, default=1024)
    f.add_argument("--denoiser", default="mlp", choices=["mlp", "transformer"])
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--dropout", type=_probability, default=0.0,
                   help="dropout in the denoiser while training (a regulariser against memorising rows)")
    f.add_argument("--calibration-rows", type=_nonnegative_int, default=None,
                   help="draws per round of the marginal calibration after fitting (default: 4x the rows, 10,000-30,000; 0: none)")
    s = sub.add_parser("sample", help="sample rows from a saved model")
    s.add_argument("--model", required=True)
    s.add_argument("-n", type=_positive_int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--condition", action="append", help="column=value, repeatable")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default: the model's)")
    s.add_argument("--recalibrate", action="store_true",
                   help="fit the marginal calibration for --steps first (the saved one is for the model's steps)")
    i = sub.add_parser("impute", help="fill the missing cells of a CSV")
    i.add_argument("--model", required=True)
    i.add_argument("--input", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report", help="fidelity report of a synthetic CSV")
    r.add_argument("--real", required=True, help="the training CSV the generator saw")
    r.add_argument("--synthetic", required=True, action="append", help="NAME=path.csv or path.csv (a path that exists is taken whole, even with '=' in it), repeatable")
    r.add_argument("--holdout", required=True, help="real rows the generator did not see")
    r.add_argument("--target")
    r.add_argument("--task", choices=["classification", "regression"],
                   help="with --target (default: classification for a categorical target, regression for a numerical one)")
    r.add_argument("--categorical", default="")
    r.add_argument("--baseline", action="store_true", help="add a Gaussian copula fitted on --real")
    r.add_argument("--out", required=True)
    for q in (f, s, i, r):
        q.add_argument("--threads", type=_positive_int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from core.engine.checkpoint import atomic_write

    from .api import TabularDiffusion
    from .data import load_csv, write_csv

    try:
        if args.cmd == "fit":
            model_dir = _output_dir(args.model, "--model")  # checked now, not after the whole fit
            cats = [c for c in args.categorical.split(",") if c] or None
            m = TabularDiffusion(steps=args.steps, batch_size=args.batch_size, denoiser=args.denoiser, seed=args.seed,
                                 dropout=args.dropout, calibration_rows=args.calibration_rows)
            m.fit(load_csv(args.csv), categorical=cats)
            m.save(model_dir)
            print(f"saved {model_dir} ({m.fit_steps} steps, {m.fit_seconds:.0f} s)")
        elif args.cmd == "sample":
            conditions = _parse_conditions(args.condition)
            out = _output_file(args.out, "--out")
            m = _load_model(args.model)
            _check_conditions(conditions, m.schema)
            if args.recalibrate:
                m.calibrate(steps=args.steps)
            df = m.sample(args.n, conditions=conditions, seed=args.seed, steps=args.steps)
            write_csv(df, out)  # atomic: a killed write leaves the old file or the new one
            print(f"wrote {len(df)} rows to {out}")
        elif args.cmd == "impute":
            out = _output_file(args.out, "--out")
            m = _load_model(args.model)
            df = load_csv(args.input)
            filled = m.impute(df, seed=args.seed)
            write_csv(filled, out)  # atomic: --out may be --input, which a torn write would destroy
            print(f"filled {int(df.isna().to_numpy().sum())} cells; wrote {out}")
        else:
            from .baseline import GaussianCopula
            from .metrics import fidelity_report, plot_report
            from .schema import check_holdout, infer_schema, infer_task

            out = Path(_output_dir(args.out, "--out"))
            if args.task and not args.target:  # would be ignored: no ML-efficiency score at all
                raise UsageError(f"--task {args.task} needs --target COLUMN")
            real, holdout = load_csv(args.real), load_csv(args.holdout)
            cats = [c for c in args.categorical.split(",") if c] or None
            schema = infer_schema(real, cats)
            args.task = infer_task(schema, args.target, args.task)  # without --task: from the target's type
            # the holdout and the synthetic tables are scored against --real's schema: a typo or a
            # missing column is named here, not turned into NaN or a KeyError inside the metrics
            checks = {"holdout_check": check_holdout(schema, holdout, args.target, args.task,
                                                     where=f"holdout {args.holdout!r}"),
                      "synthetic_check": {}}
            synth = {}
            for k, item in enumerate(args.synthetic):
                name, path = _synthetic_item(item, k)
                synth[name] = load_csv(path)
                checks["synthetic_check"][name] = check_holdout(schema, synth[name], where=f"synthetic {path!r}")
            if args.baseline:
                synth["gaussian_copula"] = GaussianCopula().fit(real, schema=schema).sample(len(real))
            rep = fidelity_report(real, holdout, synth, schema, args.target, args.task) | checks
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "report.json", lambda f: f.write(json.dumps(rep, indent=1).encode()))
            plot_report(real, synth, schema, rep, out)
            print(json.dumps(rep["ranking"], indent=1))
    except (TabularInputError, UsageError) as e:
        # bad input only: any other exception (a ValueError from a bug included) keeps its traceback
        print(f"tabular: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
