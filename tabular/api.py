"""The pandas API of the tabular domain::

    from tabular import TabularDiffusion
    model = TabularDiffusion(steps=4000).fit(df, categorical=["sex", "income"])   # types inferred otherwise
    synth = model.sample(1000, conditions={"sex": "Female"}, seed=0)
    filled = model.impute(df_with_nans)
    model.save("my_model")                     # my_model/model.safetensors + my_model/tabular.json
    model = TabularDiffusion.load("my_model")

The model is CDTD (:mod:`tabular.model`); the training loop is a compact AdamW loop with linear
warm-up and linear decay (the official configuration) and an EMA of the weights, which are the
weights used for sampling and saved. ``fit(df, checkpoint_dir=...)`` checkpoints the fit and continues
an interrupted one bit for bit. No Hydra needed (``python -m tabular.train`` wraps this).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from scipy.special import ndtri
from tqdm.auto import tqdm

from core.engine.checkpoint import (
    CheckpointError,
    atomic_write,
    checkpoint_path,
    pick_resume_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_aside_checkpoints_after,
    set_rng_state,
)
from core.engine.ema import EMA

from .data import QuantileNormal, TableEncoder
from .model import CDTD, CDTDConfig, check_sampler
from .schema import MISSING, Schema, TabularInputError, category_strings, infer_schema

FORMAT_VERSION = 1
FIT_CHECKPOINT_FORMAT = "tabular.cdtd_fit/1"
# FitConfig fields that shape the optimisation: a checkpoint continues only a fit with the same values
# (and the same model config and encoded training table)
RESUME_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup_steps", "ema_decay", "grad_clip", "seed", "device")


@dataclass
class FitConfig:
    """Training loop settings (official CDTD: 30k steps, batch 4096, lr 1e-3, betas (0.9, 0.99), EMA 0.999)."""

    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    ema_decay: float = 0.999  # 0: no EMA, sample with the last weights
    grad_clip: float = 10.0
    seed: int = 0
    time_limit_s: float | None = None  # stop early after this wall time (the LR schedule still spans ``steps``)
    cpu_time_limit_s: float | None = None  # ... or after this much CPU time of the process
    sampler: str = "euler"  # core sampler used by .sample()
    sample_steps: int = 25
    # draws per round of the marginal calibration after fitting (TabularDiffusion.calibrate); None: four
    # times the training rows, within [10,000, 30,000]; 0: no calibration
    calibration_rows: int | None = None
    calibration_rounds: int = 8  # rounds fitting the categorical logit offsets (see TabularDiffusion.calibrate)
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"FitConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("steps", "batch_size", "sample_steps"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        # checked here, not when fit() reaches the calibration after the whole training run
        if not _is_positive_int(self.calibration_rounds):
            bad("calibration_rounds", "must be an integer >= 1")
        if self.calibration_rows is not None and not (self.calibration_rows == 0 or _is_positive_int(self.calibration_rows)):
            bad("calibration_rows", "must be an integer >= 0 (0: no marginal calibration) or None (automatic)")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if self.warmup_steps < 0:
            bad("warmup_steps", "must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            bad("ema_decay", "must be in [0, 1)")
        for name in ("time_limit_s", "cpu_time_limit_s"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                bad(name, "must be > 0 or None")
        check_sampler(self.sampler, "FitConfig.sampler")


def _is_positive_int(v) -> bool:
    """An int (numpy's too) >= 1; not a bool, not a float such as 2.5."""
    return not isinstance(v, bool) and isinstance(v, int | np.integer) and v >= 1


def calibrate_scores(x_num: np.ndarray, quantiles: list, known: np.ndarray | None = None) -> np.ndarray:
    """The numerical half of the marginal calibration: each score through the model's own marginal
    CDF (``quantiles[i]``: its quantiles at equally spaced levels, or None to leave the column) to the
    standard normal score of the same level, which the encoder's inverse turns into the data's
    quantile at that level. Monotone per column; cells where ``known`` (n, n_num) is True are kept."""
    out = x_num.astype(np.float64)
    for i, q in enumerate(quantiles):
        if q is None:
            continue
        u = np.interp(out[:, i], q, np.linspace(0.0, 1.0, len(q)))
        z = ndtri(np.clip(u, QuantileNormal.CLIP, 1.0 - QuantileNormal.CLIP))
        out[:, i] = z if known is None else np.where(known[:, i], out[:, i], z)
    return out.astype(x_num.dtype)


class SavedModelError(ValueError):
    """A saved model directory that :meth:`TabularDiffusion.load` cannot use (a file missing, another
    format, or weights and metadata from two different saves); the message names the directory."""


def _split_kwargs(kwargs: dict) -> tuple[CDTDConfig, FitConfig]:
    model_keys = {f.name for f in dataclasses.fields(CDTDConfig)}
    fit_keys = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = set(kwargs) - model_keys - fit_keys
    if unknown:
        raise TypeError(f"TabularDiffusion got an unknown argument {sorted(unknown)[0]!r}; "
                        f"model: {sorted(model_keys)}, training: {sorted(fit_keys)}")
    return (CDTDConfig(**{k: v for k, v in kwargs.items() if k in model_keys}),
            FitConfig(**{k: v for k, v in kwargs.items() if k in fit_keys}))


class TabularDiffusion:
    """CDTD on a pandas DataFrame. Keyword arguments: any field of :class:`CDTDConfig` (network,
    schedule) or :class:`FitConfig` (training, sampler)."""

    def __init__(self, **kwargs):
        self.model_config, self.fit_config = _split_kwargs(kwargs)
        self.schema: Schema | None = None
        self.encoder: TableEncoder | None = None
        self.model: CDTD | None = None
        self.calibration: dict | None = None
        self.history: list[dict] = []
        self.stopped_at: int | None = None  # the step a fit with stop_at stopped at (see fit)

    # -- fitting -----------------------------------------------------------------------------------

    def fit(self, df: pd.DataFrame, categorical: list[str] | None = None, numerical: list[str] | None = None,
            *, constant: str = "keep", checkpoint_dir: str | Path | None = None, ckpt_every: int = 0,
            keep_last: int = 3, resume: bool | str = "auto", stop_at: int | None = None) -> TabularDiffusion:
        """Infer/check the schema, encode, and train. Returns ``self``.

        Checkpoints (all off without ``checkpoint_dir``): every ``ckpt_every`` steps (0: only at the end
        and at ``stop_at``) an atomic ``checkpoint_dir/ckpt_<step>.pt`` of the weights, optimiser, LR
        schedule, EMA, RNG states and data position; the newest ``keep_last`` are kept. ``resume``:
        ``"auto"`` continues from the newest checkpoint there if any, ``True`` requires one, ``False``
        requires none, a path names the file. A resumed fit continues bit for bit as the uninterrupted
        one would have (same table, model and training settings, else :class:`CheckpointError` naming
        what differs). ``stop_at``: stop after that step with a checkpoint (``self.stopped_at`` is set,
        no calibration is run); fit again with the same arguments to continue.
        """
        if checkpoint_dir is None and stop_at is not None:
            raise ValueError(f"stop_at={stop_at!r} needs checkpoint_dir (the fit is continued from its checkpoint)")
        if stop_at is not None and not (_is_positive_int(stop_at) and stop_at <= self.fit_config.steps):
            raise ValueError(f"stop_at must be None or an integer in [1, steps={self.fit_config.steps}], got {stop_at!r}")
        if not (isinstance(ckpt_every, int | np.integer) and not isinstance(ckpt_every, bool) and ckpt_every >= 0):
            raise ValueError(f"ckpt_every must be an integer >= 0, got {ckpt_every!r}")
        if not _is_positive_int(keep_last):
            raise ValueError(f"keep_last must be a positive integer, got {keep_last!r}")
        if not (isinstance(resume, bool) or (isinstance(resume, str | Path) and str(resume) != "")):
            raise ValueError(f"resume must be 'auto', True, False or a checkpoint path, got {resume!r}")
        schema = infer_schema(df, categorical, numerical, constant=constant)
        if not schema.numerical and not schema.categorical:
            raise TabularInputError("every column is constant: there is nothing to model")
        encoder = TableEncoder.fit(df, schema)
        x_num, x_cat = encoder.encode(df)
        observed = np.stack([pd.to_numeric(df[c.name]).notna().to_numpy() for c in schema.numerical], 1) \
            if schema.numerical else np.ones((len(df), 0), bool)
        props = [torch.from_numpy(np.bincount(x_cat[:, j], minlength=k) / len(df)).float()
                 for j, k in enumerate(encoder.cardinalities)]
        fc = self.fit_config
        dev = torch.device(fc.device)
        gen = torch.Generator().manual_seed(fc.seed)
        torch.manual_seed(fc.seed)
        model = CDTD(x_num.shape[1], encoder.cardinalities, self.model_config, props).to(dev)
        self.schema, self.encoder, self.model = schema, encoder, model
        levels = None
        if self.model_config.dequantize and schema.numerical:
            lo, hi = encoder.level_ranges(df)
            if (hi > lo).any():
                levels = (torch.from_numpy(lo), torch.from_numpy(hi - lo))
        ckpt = None
        if checkpoint_dir is not None:
            ckpt = {"dir": Path(checkpoint_dir), "every": int(ckpt_every), "keep_last": int(keep_last),
                    "resume": resume, "stop_at": stop_at}
        self._train(torch.from_numpy(x_num), torch.from_numpy(x_cat), torch.from_numpy(observed), gen, levels, ckpt)
        self.train_rows = len(df)
        self.calibration, self.calibration_seconds = None, 0.0
        if fc.calibration_rows != 0 and self.stopped_at is None:
            t0 = time.perf_counter()
            self.calibrate()
            self.calibration_seconds = time.perf_counter() - t0
        return self

    def _fit_fingerprint(self, tensors) -> dict:
        """What a checkpoint must share with this fit to continue it: the model config, the training
        settings of :data:`RESUME_KEYS` and a hash of the encoded training table."""
        h = hashlib.sha256()
        for t in tensors:
            if t is not None:
                h.update(str((tuple(t.shape), str(t.dtype))).encode())
                h.update(t.contiguous().numpy().tobytes())
        fit = dataclasses.asdict(self.fit_config)
        return {"model": dataclasses.asdict(self.model_config), "fit": {k: fit[k] for k in RESUME_KEYS},
                "data_sha256": h.hexdigest()}

    def _resume_state(self, ckpt: dict, fingerprint: dict) -> dict | None:
        """The checkpoint ``ckpt['resume']`` asks for (None: start at step 0), checked against ``fingerprint``."""
        d, resume = ckpt["dir"], ckpt["resume"]
        remove_stale_temp_files(d)
        found = pick_resume_checkpoint(d, resume, "resume", CheckpointError, ("False", "True"))
        if found is None:
            set_aside_checkpoints_after(d, None)  # only unloadable files (or none): this fit starts at step 0
            return None
        path, state = found
        if state.get("format") != FIT_CHECKPOINT_FORMAT:
            raise CheckpointError(f"{str(path)!r} is not a CDTD fit checkpoint (format {state.get('format')!r})")
        saved = state["fingerprint"]
        diffs = [f"{g}.{k} {saved[g].get(k)!r} -> {fingerprint[g][k]!r}" for g in ("model", "fit")
                 for k in fingerprint[g] if saved[g].get(k) != fingerprint[g][k]]
        if saved["data_sha256"] != fingerprint["data_sha256"]:
            diffs.append("the training table (its encoded values differ)")
        if diffs:
            raise CheckpointError(f"{str(path)!r} (step {state['step']}) belongs to another fit: "
                                  f"{'; '.join(diffs)}. Fit with the checkpoint's table and settings to continue "
                                  f"it, or use another checkpoint directory (resume=False starts afresh)")
        set_aside_checkpoints_after(d, int(state["step"]))  # later ones belong to an abandoned fit
        return state

    def _train(self, x_num, x_cat, observed, gen, levels=None, ckpt=None):
        """``levels``: optional (low level, level width) per numerical cell; each batch then draws its
        scores ``ndtri(low + U * width)`` afresh (dequantised ties) instead of using ``x_num``.
        ``ckpt``: the checkpoint settings of :meth:`fit` (dir, every, keep_last, resume, stop_at) or None."""
        fc, model = self.fit_config, self.model
        dev = torch.device(fc.device)
        n = x_num.shape[0]
        bs = min(fc.batch_size, n)
        opt = torch.optim.AdamW(model.parameters(), lr=fc.lr, betas=(0.9, 0.99), weight_decay=fc.weight_decay)

        def lr_factor(step):  # linear warm-up, then linear decay to 0 (official ``anneal_lr``)
            if step < fc.warmup_steps:
                return (step + 1) / fc.warmup_steps
            return max(0.0, (fc.steps - step) / max(1, fc.steps - fc.warmup_steps))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        # early averages not dominated by the init; ema_decay 0: no averaging, the last weights are kept
        ema = EMA(model, [fc.ema_decay], warmup=True) if fc.ema_decay > 0 else None
        dgen = torch.Generator(device=dev).manual_seed(fc.seed + 1) if dev.type != "cpu" else gen
        perm, pos = torch.randperm(n, generator=gen), 0
        self.history, self.stopped_at = [], None
        running, first, elapsed0, cpu_elapsed0 = None, 0, 0.0, 0.0
        fingerprint = state = None
        if ckpt is not None:
            fingerprint = self._fit_fingerprint((x_num, x_cat, observed) + (levels or ()))
            state = self._resume_state(ckpt, fingerprint)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            gen.set_state(state["generator"])
            if dgen is not gen:
                dgen.set_state(state["device_generator"])
            set_rng_state(state["rng"])
            perm, pos = state["perm"], int(state["pos"])
            self.history = list(state["history"])
            running, first = state["running"], int(state["step"])
            elapsed0, cpu_elapsed0 = float(state["fit_seconds"]), float(state["fit_cpu_seconds"])
        start, cpu0 = time.perf_counter(), time.process_time()

        def save(done: int) -> None:
            """A checkpoint after ``done`` steps (read-only: it draws no random numbers)."""
            st = {"format": FIT_CHECKPOINT_FORMAT, "step": done, "fingerprint": fingerprint,
                  "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                  "ema": ema.state_dict() if ema is not None else None, "generator": gen.get_state(),
                  "device_generator": dgen.get_state() if dgen is not gen else None, "rng": rng_state(),
                  "perm": perm, "pos": pos, "history": self.history, "running": running,
                  "fit_seconds": elapsed0 + time.perf_counter() - start,
                  "fit_cpu_seconds": cpu_elapsed0 + time.process_time() - cpu0}
            save_checkpoint(st, checkpoint_path(ckpt["dir"], done))
            prune_checkpoints(ckpt["dir"], ckpt["keep_last"])

        bar = tqdm(range(first, fc.steps), desc="CDTD fit", disable=not fc.progress, mininterval=2.0,
                   initial=first, total=fc.steps)
        model.train()
        for step in bar:
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + bs]
            pos += bs
            xb = x_num[idx]
            if levels is not None:
                lo, width = levels[0][idx], levels[1][idx]
                xb = torch.special.ndtri(lo + width * torch.rand(lo.shape, generator=gen, dtype=lo.dtype)).float()
            loss, stats = model.loss(xb.to(dev), x_cat[idx].to(dev), observed[idx].to(dev), generator=dgen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at step {step}: {stats}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if fc.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), fc.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            running = stats["loss"] if running is None else 0.98 * running + 0.02 * stats["loss"]
            self.history.append({"step": step, **stats})
            if step % 50 == 0:
                bar.set_postfix(loss=f"{running:.4f}")
            done = step + 1
            out_of_time = (fc.time_limit_s is not None and elapsed0 + time.perf_counter() - start > fc.time_limit_s) \
                or (fc.cpu_time_limit_s is not None and cpu_elapsed0 + time.process_time() - cpu0 > fc.cpu_time_limit_s)
            stop = ckpt is not None and done == ckpt["stop_at"]
            if ckpt is not None and ((ckpt["every"] and done % ckpt["every"] == 0) or done == fc.steps
                                     or stop or out_of_time):
                save(done)
            if stop and done < fc.steps:
                self.stopped_at = done
                break
            if out_of_time:
                break
        bar.close()
        self.fit_seconds = elapsed0 + time.perf_counter() - start
        # CPU time of this process (and of the fit's earlier processes): less inflated by a shared box
        self.fit_cpu_seconds = cpu_elapsed0 + time.process_time() - cpu0
        self.fit_steps = len(self.history)
        if ema is not None:
            model.load_state_dict(ema.averaged(), strict=False)  # sample with (and save) the EMA weights
        model.eval()

    # -- sampling ----------------------------------------------------------------------------------

    def _require_fitted(self):
        if self.model is None:
            raise RuntimeError("the model is not fitted: call .fit(df) or TabularDiffusion.load(path)")

    def _check_constants(self, df: pd.DataFrame, known_cells: pd.DataFrame) -> None:
        """Refuse an observed cell of a constant column that is not its constant (the model cannot be
        given it; the cell would come back unchanged beside values generated for the constant)."""
        for col in self.schema.columns:
            if col.kind != "constant" or col.name not in df.columns:
                continue
            v = df.loc[known_cells[col.name].to_numpy(), col.name]
            other = v[category_strings(v) != category_strings(pd.Series([col.value]))[0]]  # '1' is 1.0
            if len(other):
                raise TabularInputError(f"column {col.name!r}: value {other.iloc[0]!r} differs from the constant "
                                        f"{col.value!r} of the training data")

    def _known(self, df: pd.DataFrame, known_cells: pd.DataFrame):
        """Encode the known cells of ``df`` (``known_cells`` bool, same shape) into the model's features.

        Returns (mask (n, F) bool, num (n, n_num), cat (n, n_cat), forbid list): a numerical cell that
        is unknown but whose column has a missingness flag gets the flag fixed to 'observed' and the
        missing category is forbidden where a categorical cell is unknown, so imputation fills values.
        """
        enc, n = self.encoder, len(df)
        n_c, n_f = len(enc.cat_cols), len(enc.flag_cols)
        mask = np.zeros((n, n_c + n_f + len(enc.num_cols)), bool)
        num = np.zeros((n, len(enc.num_cols)), np.float32)
        cat = np.zeros((n, n_c + n_f), np.int64)
        forbid = [None] * (n_c + n_f)
        flag_index = {c.name: n_c + k for k, c in enumerate(enc.flag_cols)}
        for i, col in enumerate(enc.num_cols):
            if col.name not in df.columns:
                continue
            k = known_cells[col.name].to_numpy()
            sub = df.loc[k, [col.name]]
            if k.any():
                z, miss = enc.numeric_scores(sub, col)
                num[k, i] = z
                mask[k, n_c + n_f + i] = ~miss
                if col.name in flag_index:
                    f = flag_index[col.name]
                    cat[k, f] = miss.astype(np.int64)
                    mask[k, f] = True
            if col.name in flag_index:  # unknown value: generate an observed one
                f = flag_index[col.name]
                mask[~k, f] = True
                cat[~k, f] = 0
        for j, col in enumerate(enc.cat_cols):
            if col.name not in df.columns:
                continue
            k = known_cells[col.name].to_numpy()
            if k.any():
                cat[k, j] = enc.category_codes(df.loc[k, [col.name]], j)
                mask[k, j] = True
            if MISSING in col.categories:
                forbid[j] = torch.tensor([c == MISSING for c in col.categories])
        return mask, num, cat, forbid

    def _encoded(self, n, mask, num, cat, forbid, gen, batch_size, sampler, steps, logit_bias, desc="CDTD sample"):
        """``n`` rows of model features (x_num scores, x_cat codes) as NumPy, in batches."""
        outs_num, outs_cat = [], []
        chunks = range(0, n, batch_size)
        show = desc is not None and self.fit_config.progress and len(chunks) > 1
        for s in tqdm(chunks, desc=desc, disable=not show):
            e = min(n, s + batch_size)
            kw = {}
            if mask is not None and mask[s:e].any():
                kw = dict(known_mask=torch.from_numpy(mask[s:e]), known_num=torch.from_numpy(num[s:e]),
                          known_cat=torch.from_numpy(cat[s:e]), forbid=forbid)
            xn, xc = self.model.sample_encoded(e - s, sampler=sampler, steps=steps, generator=gen,
                                               logit_bias=logit_bias, **kw)
            outs_num.append(xn.cpu().numpy())
            outs_cat.append(xc.cpu().numpy())
        return np.concatenate(outs_num), np.concatenate(outs_cat)

    def _generate(self, n, mask, num, cat, forbid, seed, batch_size, sampler, steps, calibrated=True):
        if steps is not None and not _is_positive_int(steps):
            # checked, not `steps or default`: a 0 would silently sample with the default
            raise ValueError(f"steps must be a positive integer or None, got {steps!r}")
        fc = self.fit_config
        sampler = sampler or fc.sampler
        steps = fc.sample_steps if steps is None else int(steps)
        cal = self.calibration if calibrated else None
        if cal is not None and (cal["sampler"], cal["steps"]) != (sampler, steps):
            warnings.warn(f"the marginal calibration was fitted for sampler={cal['sampler']!r} steps={cal['steps']}; "
                          f"these samples (sampler={sampler!r} steps={steps}) are uncalibrated: "
                          f"model.calibrate(sampler={sampler!r}, steps={steps}) fits one for them", stacklevel=3)
            cal = None
        gen = torch.Generator(device=torch.device(fc.device)).manual_seed(int(seed))
        bias = [torch.tensor(b, dtype=torch.float32) for b in cal["cat_bias"]] if cal else None
        x_num, x_cat = self._encoded(n, mask, num, cat, forbid, gen, batch_size, sampler, steps, bias)
        if cal:
            known = mask[:, -x_num.shape[1]:] if mask is not None and x_num.shape[1] else None
            x_num = calibrate_scores(x_num, cal["num_quantiles"], known)
        return self.encoder.decode(x_num, x_cat)

    def auto_calibration_rows(self) -> int:
        """The default number of calibration draws per round: four times the training rows, within
        [10,000, 30,000] (30,000 for a model saved before the training rows were recorded)."""
        n = getattr(self, "train_rows", None)
        return int(min(30_000, max(10_000, 4 * n))) if n else 30_000

    def calibrate(self, rows: int | None = None, rounds: int | None = None, *, seed: int = 1_000_003,
                  sampler: str | None = None, steps: int | None = None, batch_size: int = 10_000) -> TabularDiffusion:
        """Fit the marginal calibration used by :meth:`sample` and :meth:`impute` (run by :meth:`fit`
        with ``calibration_rows`` / ``calibration_rounds``; call again for another sampler or number
        of steps). Needs no data: the targets are the training marginals the model keeps. ``rows``:
        draws per round (default ``calibration_rows``, else :meth:`auto_calibration_rows`).

        Categories: an offset per category added to its logits at every sampling step (a fixed
        reweighting of the model's class posteriors), fitted by stochastic approximation over
        ``rounds`` rounds of ``rows`` fresh unconditional draws: per feature ``b <- b + a clip(log(p_data
        / p_model), -1, 1)``, ``a`` starting at 1/2 and halved whenever a round's total variation
        rises (the offsets act at every step and compound, so a full step overshoots), and the
        result is the mean of the second half of the rounds' offsets (Polyak averaging: the draws'
        noise averages out instead of being fitted). This corrects a model whose marginals are off by
        a few per cent; it cannot make a model that never generates a category generate it at the
        right rate.

        Numbers: a monotone map per column from the model's marginal to the data's: the model's
        scores through their own CDF (estimated from ``rows`` more draws with the final offsets,
        pooled with the second half of the rounds' draws), then through the data's quantile function. Each cell is mapped on its own, so
        samples stay independent and ranks within a column are kept. Returns ``self``.
        """
        self._require_fitted()
        fc = self.fit_config
        if rows is None:
            rows = fc.calibration_rows or self.auto_calibration_rows()
        rounds = fc.calibration_rounds if rounds is None else rounds
        for name, v in (("rows", rows), ("rounds", rounds), ("steps", 1 if steps is None else steps)):
            if not _is_positive_int(v):
                raise ValueError(f"calibrate: {name} must be a positive integer, got {v!r}")
        sampler = sampler or fc.sampler
        check_sampler(sampler, "calibrate: sampler")
        steps = fc.sample_steps if steps is None else int(steps)
        enc, cards = self.encoder, self.encoder.cardinalities
        init = self.model.logit_init.detach().cpu().double().exp()
        target = [p / p.sum() for p in torch.split(init, cards)] if cards else []
        bias = [torch.zeros(k, dtype=torch.float64) for k in cards]
        gain, last_tv = [0.5] * len(cards), [math.inf] * len(cards)
        kept, pooled = [], []  # the offsets of the second half of the rounds (averaged at the end), their draws
        gen = torch.Generator(device=torch.device(fc.device))
        eps = 0.5 / rows
        for r in tqdm(range(rounds if cards else 0), desc="CDTD calibrate", disable=not fc.progress):
            gen.manual_seed(int(seed) + 1 + r)  # fresh draws every round: their noise averages out
            x_num, x_cat = self._encoded(rows, None, None, None, None, gen, batch_size, sampler, steps,
                                         [b.float() for b in bias], desc=None)
            if r >= rounds // 2:  # late rounds: offsets near the final ones; their numbers are pooled below
                pooled.append((x_num, x_cat))
            for j, k in enumerate(cards):
                freq = torch.from_numpy(np.bincount(x_cat[:, j], minlength=k) / rows)
                tv = 0.5 * float((freq - target[j]).abs().sum())
                if tv > last_tv[j]:  # overshot (or noise): smaller steps from here on
                    gain[j] *= 0.5
                last_tv[j] = tv
                b = bias[j] + gain[j] * ((target[j] + eps).log() - (freq + eps).log()).clamp(-1.0, 1.0)
                bias[j] = (b - b.mean()).clamp(-20.0, 20.0)
            if r >= rounds // 2:
                kept.append(list(bias))
        if kept:
            bias = [torch.stack([k[j] for k in kept]).mean(0) for j in range(len(cards))]
        gen.manual_seed(int(seed))
        x_num, x_cat = self._encoded(rows, None, None, None, None, gen, batch_size, sampler, steps,
                                     [b.float() for b in bias], desc=None)
        residual = [0.5 * float(np.abs(np.bincount(x_cat[:, j], minlength=k) / rows - target[j].numpy()).sum())
                    for j, k in enumerate(cards)]
        # the numerical CDFs from the final draws and the late rounds' together: their noise adds to
        # every calibrated sample's, so more draws for free
        x_num = np.concatenate([x_num] + [a for a, _ in pooled])
        x_cat = np.concatenate([x_cat] + [c for _, c in pooled])
        n_cat = len(enc.cat_cols)
        flag_of = {c.name: n_cat + k for k, c in enumerate(enc.flag_cols)}
        quantiles = []
        for i, col in enumerate(enc.num_cols):
            z = x_num[:, i].astype(np.float64)
            if col.name in flag_of:  # cells generated as missing carry a placeholder score
                z = z[x_cat[:, flag_of[col.name]] == 0]
            quantiles.append(np.quantile(z, np.linspace(0.0, 1.0, min(1001, len(z)))).tolist() if len(z) > 1 else None)
        self.calibration = {"sampler": sampler, "steps": steps, "rows": int(rows), "rounds": int(rounds),
                            "seed": int(seed), "cat_bias": [b.tolist() for b in bias], "num_quantiles": quantiles,
                            "residual_tv": residual}
        return self

    def sample(self, n: int, conditions: dict | None = None, *, seed: int = 0, batch_size: int = 10_000,
               sampler: str | None = None, steps: int | None = None, calibrated: bool = True) -> pd.DataFrame:
        """``n`` synthetic rows. ``conditions``: column -> a value (every row) or ``n`` values (row-wise);
        those columns are fixed and the rest is generated given them. ``calibrated``: apply the
        marginal calibration (:meth:`calibrate`) when the model has one for this sampler and number of
        steps (a warning says when it has one only for others)."""
        self._require_fitted()
        if not _is_positive_int(n):
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        mask = num = cat = forbid = None
        cond_df = None
        if conditions:
            if not isinstance(conditions, dict):
                raise TypeError(f"conditions must be a dict column -> value(s), got {type(conditions).__name__}")
            cols = {}
            for name, value in conditions.items():
                if name not in self.schema.names:
                    raise ValueError(f"condition on unknown column {name!r}; columns are {self.schema.names}")
                if np.ndim(value) == 0:
                    value = [value] * n
                elif len(value) != n:
                    raise ValueError(f"condition {name!r} has {len(value)} values for n={n} rows")
                col = self.schema[name]
                if col.kind == "constant" and any(v != col.value for v in value):
                    raise ValueError(f"column {name!r} is constant ({col.value!r}) in the training data; "
                                     f"it cannot be conditioned on another value")
                if col.kind == "numerical" and col.integer:
                    x = pd.to_numeric(pd.Series(list(value), dtype=object), errors="coerce").to_numpy(np.float64)
                    bad = np.isfinite(x) & (np.mod(x, 1.0) != 0.0)
                    if bad.any():  # non-numbers and infinities are named by the encoder
                        raise TabularInputError(f"condition {name!r}: value {list(value)[int(np.argmax(bad))]!r} is "
                                                f"not an integer, but the column holds integers")
                cols[name] = list(value)
            cond_df = pd.DataFrame(cols)
            cond_df = cond_df.astype({c: object for c in cond_df.columns})
            model_cols = [c for c in cond_df.columns if self.schema[c].kind != "constant"]
            sub = cond_df[model_cols]
            mask, num, cat, forbid = self._known(sub, pd.DataFrame(True, index=sub.index, columns=sub.columns))
            forbid = None  # an unconditioned missing category may be generated as usual
            # numerical columns not conditioned: let the model generate missingness as it learned it
            enc = self.encoder
            for k, c in enumerate(enc.flag_cols):
                if c.name not in cond_df.columns:
                    mask[:, len(enc.cat_cols) + k] = False
        out = self._generate(n, mask, num, cat, forbid, seed, batch_size, sampler, steps, calibrated)
        if cond_df is not None:
            for c in cond_df.columns:  # the user's values, exactly
                out[c] = cond_df[c].to_numpy()
                out[c] = out[c].infer_objects()
        return out

    def impute(self, df: pd.DataFrame, *, seed: int = 0, batch_size: int = 10_000, sampler: str | None = None,
               steps: int | None = None, calibrated: bool = True) -> pd.DataFrame:
        """Fill every missing cell of ``df`` (NaN / None) given the observed cells of its row; observed
        cells are returned unchanged. A missing cell of a constant column gets the constant.
        ``calibrated``: as for :meth:`sample` (the calibration acts on the generated cells only)."""
        self._require_fitted()
        self.schema.check_frame(df)
        out = df.copy()
        known = df.notna()
        rows = np.flatnonzero(~known.to_numpy().all(1))
        # every row's observed cells are encoded, not only those of rows with a hole: a value the model
        # cannot take (a non-number in a numerical column, an unseen category) is refused wherever it is,
        # as in a condition of sample(), rather than returned unchecked in a complete row
        full, kfull = df.reset_index(drop=True), known.reset_index(drop=True)
        model_cols = [c.name for c in self.schema.columns if c.kind != "constant"]
        self._check_constants(full, kfull)
        mask, num, cat, forbid = self._known(full[model_cols], kfull[model_cols])
        if len(rows) == 0:
            return out
        ksub = kfull.iloc[rows].reset_index(drop=True)
        gen = self._generate(len(rows), mask[rows], num[rows], cat[rows], forbid, seed, batch_size, sampler, steps,
                             calibrated)
        for c in df.columns:
            miss = ~ksub[c].to_numpy()
            if miss.any():
                if out[c].dtype != object and gen[c].dtype == object:
                    out[c] = out[c].astype(object)
                col_idx = out.columns.get_loc(c)
                out.iloc[rows[miss], col_idx] = gen[c].to_numpy()[miss]
        return out

    # -- persistence -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write ``path/model.safetensors`` (weights) and ``path/tabular.json`` (schema, encoder, configs).

        Each file is written atomically (temporary file, then rename), weights first. The JSON records
        the SHA-256 of the weights file it was saved with, and :meth:`load` refuses a pair from two
        saves (a save over an existing model that was killed between its two renames) instead of
        combining new weights with an old encoder."""
        self._require_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        weights = save_safetensors(state)
        meta = {"format": FORMAT_VERSION, "schema": json.loads(self.schema.to_json()),
                "encoder": self.encoder.state(), "model_config": dataclasses.asdict(self.model_config),
                "fit_config": dataclasses.asdict(self.fit_config),
                "fit_steps": getattr(self, "fit_steps", None), "fit_seconds": getattr(self, "fit_seconds", None),
                "calibration": self.calibration, "train_rows": getattr(self, "train_rows", None),
                "weights_sha256": hashlib.sha256(weights).hexdigest()}
        atomic_write(path / "model.safetensors", lambda f: f.write(weights))
        atomic_write(path / "tabular.json", lambda f: f.write(json.dumps(meta).encode()))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> TabularDiffusion:
        path = Path(path)
        for name in ("model.safetensors", "tabular.json"):
            if not (path / name).is_file():
                raise SavedModelError(f"{str(path)!r} is not a saved TabularDiffusion: {name} is missing")
        meta = json.loads((path / "tabular.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise SavedModelError(f"{str(path)!r}: unsupported format {meta.get('format')!r}")
        weights = (path / "model.safetensors").read_bytes()
        expected = meta.get("weights_sha256")  # absent in files saved before it was recorded
        if expected is not None and hashlib.sha256(weights).hexdigest() != expected:
            raise SavedModelError(f"{str(path)!r}: model.safetensors is not the weights file tabular.json was saved with "
                             f"(SHA-256 {hashlib.sha256(weights).hexdigest()[:12]}..., expected {expected[:12]}...): "
                             f"the two files come from different saves, e.g. a save interrupted between them; "
                             f"save the model again")
        fit_cfg = {**meta["fit_config"], "device": device}
        obj = cls(**meta["model_config"], **fit_cfg)
        obj.schema = Schema.from_json(json.dumps(meta["schema"]))
        obj.encoder = TableEncoder.from_state(obj.schema, meta["encoder"])
        obj.fit_steps, obj.fit_seconds = meta.get("fit_steps"), meta.get("fit_seconds")
        obj.calibration = meta.get("calibration")  # None in files written before calibration existed
        obj.train_rows = meta.get("train_rows")
        state = load_safetensors(weights)
        props = [torch.full((k,), 1.0 / k) for k in obj.encoder.cardinalities]  # buffers come from the file
        obj.model = CDTD(len(obj.encoder.num_cols), obj.encoder.cardinalities, obj.model_config, props)
        obj.model.load_state_dict(state)
        obj.model.to(torch.device(device)).eval()
        return obj


def rows_per_second(model: TabularDiffusion, n: int, **kwargs) -> tuple[float, float]:
    """(seconds, rows/s) of ``model.sample(n, **kwargs)``."""
    t0 = time.perf_counter()
    model.sample(n, **kwargs)
    dt = time.perf_counter() - t0
    return dt, n / dt if dt > 0 else math.inf
