"""Hydra entry point of the tabular domain: fit CDTD, sample, fit the copula baseline, write the report.

    python -m tabular.train data=adult
    python -m tabular.train data=german trainer.steps=2000 sampler.steps=30
    python -m tabular.train data=csv data.path=my.csv data.target=label data.task=classification
    python -m tabular.train model=transformer trainer=smoke

Config groups (``configs/tabular/``): ``model`` (:class:`tabular.model.CDTDConfig`), ``data``
(:class:`TabularDataConfig`), ``sampler`` (:class:`TabularSamplerConfig`), ``eval``
(:class:`TabularEvalConfig`), ``trainer`` (core ``TrainerConfig``; CDTD's compact loop uses the keys of
:data:`HONOURED_TRAINER_KEYS`, and any other key set to a value other than its default is refused
by :func:`check_trainer`). All are validated before any data is read.

Checkpoints: every ``trainer.ckpt_every`` steps (and at the end) ``checkpoints/ckpt_<step>.pt`` in the run
directory, the newest ``trainer.keep_last`` kept; ``trainer.resume`` (``auto``: the newest there, if any)
continues an interrupted fit bit for bit when run again in the same directory
(``hydra.run.dir=...``); ``trainer.stop_at=N`` stops after step N with a checkpoint and writes nothing
else. A checkpoint of another fit (other data, model or training settings) exits 4 naming the difference.

Exit codes: 2 for a bad config or bad data (a :class:`~tabular.schema.TabularInputError`: an unreadable
CSV, a column or value that cannot be used, in the training table or in the holdout, which is checked
against the schema before training by :func:`~tabular.schema.check_holdout`), one line naming it; 3
non-finite loss (core engine); 4 a checkpoint that cannot be resumed (``CheckpointError``), one line naming
it; any other exception, a ``ValueError`` from a bug included, keeps its traceback.

The run directory gets ``model/`` (safetensors + schema JSON), ``synthetic.csv`` (CDTD),
``copula.csv`` (baseline), ``report.json`` (:func:`tabular.metrics.fidelity_report` plus timings and
``holdout_check``: the holdout's categories and missing values never seen in training, counted)
and ``marginals.png`` / ``correlation_diff.png``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from core.engine.checkpoint import atomic_write
from core.engine.config import ConfigError, TrainerConfig, register_schema
from core.engine.run import hydra_entry, prepare

from .api import TabularDiffusion
from .baseline import GaussianCopula
from .data import DATASETS, load_csv, load_dataset, split_frame, write_csv
from .metrics import fidelity_report, plot_report
from .model import CDTDConfig, check_sampler
from .schema import TabularInputError, check_holdout, infer_schema, infer_task

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tabular"


@dataclass
class TabularDataConfig:
    name: str = "adult"  # adult | german | diamonds | csv
    path: str | None = None  # name=csv
    target: str | None = None  # name=csv: column for ML efficiency (None: no ML efficiency)
    task: str | None = None  # classification | regression (name=csv with a target); null: from the target's type
    categorical: list[str] = field(default_factory=list)  # name=csv: declared categorical columns
    test_fraction: float = 0.2  # name=csv (and german/diamonds use 0.2)
    split_seed: int = 0
    max_train_rows: int | None = None  # subsample the training table (quick runs)

    def validate(self) -> None:
        names = sorted(DATASETS) + ["csv"]
        if self.name not in names:
            raise ValueError(f"data.name must be one of {names}, got {self.name!r}")
        if self.name == "csv":
            if not self.path or not Path(self.path).is_file():
                raise ValueError(f"data.path must be an existing CSV file for data.name=csv, got {self.path!r}")
            if self.task not in (None, "classification", "regression"):
                raise ValueError(f"data.task must be 'classification' or 'regression' (or null: from the target's "
                                 f"type), got {self.task!r}")
            if self.task is not None and self.target is None:
                raise ValueError(f"data.task={self.task!r} needs data.target (the column to predict)")
        elif self.target is not None or self.task is not None or self.categorical:
            spec = DATASETS[self.name]
            raise ValueError(f"data.target / data.task / data.categorical are for data.name=csv; {self.name!r} "
                             f"has its own (target {spec.target!r}, task {spec.task!r}), got "
                             f"{self.target!r} / {self.task!r} / {list(self.categorical)!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.max_train_rows is not None and self.max_train_rows < 10:
            raise ValueError(f"data.max_train_rows must be >= 10 or null, got {self.max_train_rows!r}")


@dataclass
class TabularSamplerConfig:
    name: str = "euler"
    steps: int = 25
    n_samples: int | None = None
    seed: int = 0
    batch_size: int = 10000
    calibration_rows: int | None = None  # draws per calibration round (TabularDiffusion.calibrate); null: auto, 0: none
    calibration_rounds: int = 8

    def validate(self) -> None:
        check_sampler(self.name, "sampler.name")
        if (self.calibration_rows is not None and self.calibration_rows < 0) or self.calibration_rounds < 1:
            raise ValueError(f"sampler.calibration_rows must be >= 0 and sampler.calibration_rounds >= 1, got "
                             f"{self.calibration_rows}, {self.calibration_rounds}")
        if self.steps < 1 or self.batch_size < 1 or (self.n_samples is not None and self.n_samples < 1):
            raise ValueError(f"sampler.steps, sampler.batch_size and sampler.n_samples must be >= 1, got "
                             f"{self.steps}, {self.batch_size}, {self.n_samples}")


@dataclass
class TabularEvalConfig:
    baseline: bool = True
    threads: int = 1
    time_limit_s: float | None = None
    cpu_time_limit_s: float | None = None
    report_seed: int = 0

    def validate(self) -> None:
        if self.threads < 1:
            raise ValueError(f"eval.threads must be >= 1, got {self.threads!r}")
        for name in ("time_limit_s", "cpu_time_limit_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"eval.{name} must be > 0 or null, got {v!r}")


register_schema("model", "tabular_model_schema", CDTDConfig)
register_schema("data", "tabular_data_schema", TabularDataConfig)
register_schema("sampler", "tabular_sampler_schema", TabularSamplerConfig)
register_schema("eval", "tabular_eval_schema", TabularEvalConfig)


def load_tables(cfg: TabularDataConfig) -> tuple[pd.DataFrame, pd.DataFrame, str | None, str | None, list[str] | None]:
    """(train, test, target, task, categorical) of a data config."""
    if cfg.name == "csv":
        train, test = split_frame(load_csv(cfg.path), cfg.test_fraction, cfg.split_seed)
        target, task, cats = cfg.target, cfg.task, (list(cfg.categorical) or None)
        if target is not None and target not in train.columns:
            raise TabularInputError(f"data.target {target!r} is not a column of {cfg.path}")
    else:
        train, test, spec = load_dataset(cfg.name, cfg.split_seed)
        target, task, cats = spec.target, spec.task, list(spec.categorical)
    if cfg.max_train_rows is not None and len(train) > cfg.max_train_rows:
        train = train.sample(cfg.max_train_rows, random_state=cfg.split_seed).reset_index(drop=True)
    return train, test, target, task, cats


# The core TrainerConfig keys CDTD's compact loop (tabular.api) honours. Every other key must keep its
# TrainerConfig default: a value set for it would otherwise be ignored silently (see check_trainer).
HONOURED_TRAINER_KEYS = ("seed", "steps", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip",
                         "ema_decays", "device", "progress", "out_dir", "resume", "ckpt_every", "keep_last",
                         "stop_at")
# Why some ignored keys cannot be honoured, said in the error (the others are simply not implemented)
_FIXED = {"optimizer": "CDTD trains with AdamW", "betas": "CDTD's AdamW uses betas (0.9, 0.99)",
          "schedule": "CDTD's schedule is linear warm-up then linear decay to 0",
          "ema_warmup": "CDTD's EMA always warms up"}


def check_trainer(t: TrainerConfig) -> None:
    """Refuse, naming key and value, each trainer key CDTD's loop does not use that was set to something
    other than its TrainerConfig default, and an ``ema_decays`` of more than one decay (CDTD keeps one EMA)."""
    default = TrainerConfig()
    ignored = [f.name for f in dataclasses.fields(TrainerConfig) if f.name not in HONOURED_TRAINER_KEYS]
    bad = [k for k in ignored if _plain(getattr(t, k)) != _plain(getattr(default, k))]
    if bad:
        parts = [f"trainer.{k}={_plain(getattr(t, k))!r}" + (f" ({_FIXED[k]})" if k in _FIXED else "") for k in bad]
        raise ConfigError(f"{', '.join(parts)}: not used by the tabular (CDTD) trainer, which honours only "
                          f"{', '.join('trainer.' + k for k in HONOURED_TRAINER_KEYS)}; remove the override")
    if len(t.ema_decays) > 1:
        raise ConfigError(f"trainer.ema_decays={list(t.ema_decays)!r}: the tabular (CDTD) trainer keeps one EMA; "
                          f"give one decay, or [] for none")


def _plain(v):
    return list(v) if isinstance(v, list | tuple) else v


def run(model_cfg: CDTDConfig, data_cfg: TabularDataConfig, sampler_cfg: TabularSamplerConfig,
        eval_cfg: TabularEvalConfig, fit_kwargs: dict, out_dir: Path, checkpoint: dict | None = None) -> dict:
    """Fit, sample, baseline, report; everything written into ``out_dir``. Returns the report.

    ``checkpoint``: the checkpoint arguments of :meth:`TabularDiffusion.fit` (``ckpt_every``,
    ``keep_last``, ``resume``, ``stop_at``); the checkpoints go to ``out_dir/checkpoints``. A fit
    stopped by ``stop_at`` writes nothing else and returns ``{"stopped_at": step, "checkpoint_dir": ...}``."""
    torch.set_num_threads(eval_cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test, target, task, cats = load_tables(data_cfg)
    # The holdout (ML-efficiency test set, DCR holdout) is checked against the schema the model will
    # fit before any training: a typo only in holdout rows is named now, not after the fit (or never,
    # as a silent NaN). The schema is inferred as model.fit infers it (its warnings are fit's to give).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = infer_schema(train, cats)
    task = infer_task(schema, target, task)  # a csv's categorical target: classification; numerical: regression
    holdout_check = check_holdout(schema, test, target, task)
    n = sampler_cfg.n_samples or len(train)
    model = TabularDiffusion(**asdict(model_cfg), **fit_kwargs, time_limit_s=eval_cfg.time_limit_s,
                             cpu_time_limit_s=eval_cfg.cpu_time_limit_s,
                             sampler=sampler_cfg.name, sample_steps=sampler_cfg.steps,
                             calibration_rows=sampler_cfg.calibration_rows,
                             calibration_rounds=sampler_cfg.calibration_rounds)
    ckpt_dir = out_dir / "checkpoints"
    model.fit(train, categorical=cats, **({"checkpoint_dir": ckpt_dir, **checkpoint} if checkpoint is not None else {}))
    if model.stopped_at is not None:
        return {"stopped_at": model.stopped_at, "checkpoint_dir": str(ckpt_dir)}
    model.save(out_dir / "model")
    t0 = time.perf_counter()
    synth = model.sample(n, seed=sampler_cfg.seed, batch_size=sampler_cfg.batch_size)
    sample_s = time.perf_counter() - t0
    write_csv(synth, out_dir / "synthetic.csv")
    synthetic = {"cdtd": synth}
    copula_s = None
    if eval_cfg.baseline:
        t0 = time.perf_counter()
        synthetic["gaussian_copula"] = GaussianCopula().fit(train, schema=model.schema).sample(n, seed=sampler_cfg.seed)
        copula_s = time.perf_counter() - t0
        write_csv(synthetic["gaussian_copula"], out_dir / "copula.csv")
    report = fidelity_report(train, test, synthetic, model.schema, target, task, seed=eval_cfg.report_seed)
    report["holdout_check"] = holdout_check
    report["calibration"] = model.calibration and {k: model.calibration[k] for k in
                                                   ("sampler", "steps", "rows", "rounds", "residual_tv")}
    report["timing"] = {"fit_seconds": model.fit_seconds, "fit_cpu_seconds": model.fit_cpu_seconds,
                        "calibration_seconds": model.calibration_seconds,
                        "fit_steps": model.fit_steps, "sample_seconds": sample_s,
                        "sample_rows": n, "rows_per_second": n / sample_s, "copula_seconds": copula_s,
                        "torch_threads": torch.get_num_threads(), "loadavg_1m_at_end": os.getloadavg()[0]}
    report["config"] = {"model": asdict(model_cfg), "data": asdict(data_cfg), "sampler": asdict(sampler_cfg),
                        "eval": asdict(eval_cfg), "fit": fit_kwargs}
    atomic_write(out_dir / "report.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    plot_report(train, synthetic, model.schema, report, out_dir)
    return report


def summary(report: dict) -> dict:
    """The aggregate numbers of a report, per model (what a person compares)."""
    keys = ("shape_error", "ks_mean", "tv_mean", "ks_mean_holdout", "tv_mean_holdout", "corr_diff", "detection_auc",
            "mle_gap")
    out = {name: {k: r.get(k) for k in keys} | {"mle": r.get("mle"), "dcr_share": r["dcr"]["share_closer_to_train"]}
           for name, r in report["models"].items()}
    if "real" in report:
        out["real"] = report["real"]
    if "holdout_floor" in report:
        out["holdout_floor"] = report["holdout_floor"]
    return out


def train(cfg: DictConfig) -> dict:
    ctx = prepare(cfg, groups=("model", "data", "sampler", "eval"))
    t = ctx.trainer
    check_trainer(t)
    fit_kwargs = {"seed": t.seed, "steps": t.steps, "batch_size": t.batch_size, "lr": t.lr,
                  "weight_decay": t.weight_decay, "warmup_steps": t.warmup_steps, "grad_clip": t.grad_clip or 0.0,
                  "ema_decay": t.ema_decays[0] if t.ema_decays else 0.0,
                  "device": "cpu" if t.device == "auto" and not torch.cuda.is_available() else
                  ("cuda" if t.device == "auto" else t.device), "progress": t.progress}
    checkpoint = {"ckpt_every": t.ckpt_every, "keep_last": t.keep_last, "resume": t.resume, "stop_at": t.stop_at}
    report = run(ctx.groups["model"], ctx.groups["data"], ctx.groups["sampler"], ctx.groups["eval"], fit_kwargs,
                 Path(t.out_dir).resolve(), checkpoint)
    if "stopped_at" in report:
        print(f"stopped at step {report['stopped_at']} (trainer.stop_at) with a checkpoint in "
              f"{report['checkpoint_dir']}; run again in the same trainer.out_dir to continue", flush=True)
        return report
    print(json.dumps({"summary": summary(report), "timing": report["timing"]}, indent=1), flush=True)
    return report


# Bad user data (an unreadable CSV, a bad column or value: TabularInputError, raised where the table is
# checked) exits like a bad config, code 2 and one line naming it; any other ValueError is a bug and
# keeps its traceback.
main = hydra_entry(train, REPO_CONFIGS, input_errors=(TabularInputError,))

if __name__ == "__main__":
    main()
