"""The training loop: one ``Trainer`` for every domain.

``Trainer(model, loss_fn, data, cfg, sample_fn=None).fit()`` runs ``cfg.steps`` optimiser steps:

- ``loss_fn(model, batch, generator) -> loss`` (a scalar tensor, or a dict with ``"loss"`` and
  other scalar metrics). Every random draw in it should use ``generator`` (a per-rank
  ``torch.Generator`` whose state is checkpointed), so a resumed run draws the same numbers.
- ``data`` is a tensor (rows are samples), a ``TensorDataset`` or any map-style dataset. Batches
  come from a seeded permutation per epoch; the position ``(epoch, index)`` is checkpointed.
  Each global micro-batch of ``batch_size / grad_accum`` indices is cut in contiguous pieces,
  one per rank, so N ranks see exactly the samples one rank would.
- The constructor seeds Python's, NumPy's and torch's global RNGs from ``cfg.seed`` and the rank
  (and a resume restores them), so draws that cannot take ``generator`` (dropout) are
  reproducible too. A caller that runs a Trainer as a helper inside its own seeded work (a
  classifier for an evaluation, say) should wrap it in ``torch.random.fork_rng()`` and reseed
  ``random``/``numpy`` itself if it uses them.
- Optimiser (AdamW / Adam / SGD), linear warm-up then constant / cosine / linear decay
  (``LambdaLR``), gradient accumulation and clipping, EMA with several decays, bf16 autocast
  (CPU and CUDA) or fp16 autocast with a ``GradScaler`` (CUDA only). Clipping is of the global
  gradient norm, or with ``grad_clip_groups`` of each named submodule's norm on its own (a model
  made of networks that the reference trains with one optimiser each, like GDSS's two).
- A non-finite loss (or gradient norm, without fp16 scaling) raises :class:`NonFiniteLossError`
  naming the step, before the optimiser touches the weights; no checkpoint is written for it.
- Every ``ckpt_every`` steps an atomic checkpoint (model, EMA, optimiser, scheduler, scaler,
  step, per-rank RNG states, data position); the newest ``keep_last`` are kept.
- Metrics go to ``metrics.jsonl`` and ``metrics.csv`` in ``out_dir`` (and TensorBoard when the
  package is installed); a tqdm bar shows loss and samples/s on rank 0.
- Every ``sample_every`` steps ``sample_fn(ema_model, step, out_dir)`` is called with the EMA
  weights (first decay) swapped into the model; torch / numpy / python RNG states are restored
  afterwards so sampling does not change training.
- Under ``torchrun --nproc_per_node N``: DDP (gloo on CPU, nccl on CUDA) or FSDP2
  (``strategy: fsdp``; ``fsdp_wrap`` names the module classes sharded on their own).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as D
from .checkpoint import (
    FORMAT,
    atomic_write,
    checkpoint_path,
    export_safetensors,
    pick_resume_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_aside_checkpoints_after,
    set_rng_state,
    state_dict_misfit,
)
from .config import ConfigError, TrainerConfig, resolve_device, to_schema, validate_trainer
from .ema import EMA, decay_key

log = logging.getLogger("polydiff.engine")

# TrainerConfig fields that shape the optimisation: a resume under other values is reported.
# (Bookkeeping such as out_dir, stop_at, logging and checkpoint cadence may change freely.)
OPTIMISATION_KEYS = ("seed", "steps", "batch_size", "grad_accum", "optimizer", "lr", "weight_decay", "betas", "eps",
                     "momentum", "warmup_steps", "schedule", "min_lr_ratio", "grad_clip", "grad_clip_groups",
                     "ema_decays", "ema_warmup", "precision")


def changed_settings(saved: dict, now: dict) -> list[str]:
    """``"key old -> new"`` for each of :data:`OPTIMISATION_KEYS` whose value in ``now`` differs from
    ``saved`` (a checkpoint's ``config``); keys a checkpoint lacks are not compared."""
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in OPTIMISATION_KEYS
            if k in saved and k in now and saved[k] != now[k]]


def plain_config(config: Any) -> Any:
    """``config`` (dataclasses, tuples, paths, ...) as plain JSON values, as a checkpoint keeps them."""
    def default(o):
        return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)

    return json.loads(json.dumps(config, default=default))


def changed_run_config(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """``"group.key old -> new"`` for every leaf that differs between two :func:`plain_config` dicts
    (a key only one of them has counts as changed: ``<absent>``)."""
    out = []
    for k in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_run_config(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


LossFn = Callable[[nn.Module, Any, torch.Generator], Any]
SampleFn = Callable[[nn.Module, int, Path], Any]


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss (or gradient norm) of ``step`` is not finite."""

    def __init__(self, step: int, what: str, value: float, last_checkpoint: Path | None):
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"non-finite {what} ({value}) at step {step}; training stopped before the optimiser update, "
            f"{where}"
        )


def seed_from(*words: int) -> int:
    """A 63-bit seed mixed from ``words`` (``SeedSequence``), for independent seeded streams."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR for optimiser step ``step`` (0-based).

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then over the
    remaining steps: ``constant`` 1; ``cosine`` ``m + (1 - m) (1 + cos(pi p)) / 2``; ``linear``
    ``m + (1 - m)(1 - p)``; ``exponential`` ``m ** p`` (the same factor every step, as
    ``ExponentialLR``: GDSS's ``0.999`` per epoch over E one-step epochs is ``m = 0.999 ** E``), with
    ``p = (step - warmup) / (total - warmup)`` and ``m = min_ratio``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - p)
    if schedule == "exponential":
        if min_ratio <= 0.0:
            raise ValueError(f"trainer.schedule 'exponential' needs trainer.min_lr_ratio > 0, got {min_ratio!r}")
        return min_ratio**p
    raise ValueError(f"trainer.schedule must be one of constant, cosine, linear, exponential, got {schedule!r}")


def build_optimizer(params, cfg: TrainerConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"trainer.optimizer must be one of adamw, adam, sgd, got {cfg.optimizer!r}")


class BatchIndexSampler:
    """Deterministic, resumable micro-batch indices: a seeded permutation per epoch, sharded by rank.

    Micro-batch ``j`` of epoch ``e`` is ``perm_e[j*g:(j+1)*g]`` (``g`` the global micro-batch);
    rank ``r`` takes its ``r``-th contiguous slice of ``g / world_size``. The last partial
    micro-batch of an epoch is dropped.
    """

    def __init__(self, n: int, global_micro_batch: int, rank: int, world_size: int, seed: int):
        if global_micro_batch % world_size:
            raise ValueError(f"global micro-batch {global_micro_batch} not divisible by world size {world_size}")
        if n < global_micro_batch:
            raise ConfigError(
                f"data has {n} samples, fewer than one global micro-batch (batch_size / grad_accum = "
                f"{global_micro_batch})"
            )
        self.n, self.g, self.rank, self.world, self.seed = n, global_micro_batch, rank, world_size, seed
        self.local = global_micro_batch // world_size
        self.per_epoch = n // global_micro_batch
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(seed_from(self.seed, 0, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices(self, epoch: int, index: int) -> torch.Tensor:
        start = index * self.g + self.rank * self.local
        return self.permutation(epoch)[start: start + self.local]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def _step_le(value: str, step: int) -> bool:
    """Whether a CSV cell holds a step number <= ``step`` (a torn row's cell need not be a number)."""
    try:
        return float(value) <= step
    except ValueError:
        return False


class MetricsWriter:
    """Rank-0 metrics sink: ``metrics.jsonl``, ``metrics.csv`` and TensorBoard when importable."""

    def __init__(self, out_dir: Path, tensorboard: bool, resume_step: int | None):
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        if resume_step is not None:
            self._truncate_after(resume_step)
        else:
            self.jsonl.unlink(missing_ok=True)
            self.csv.unlink(missing_ok=True)
        self.columns: list[str] | None = None
        if self.csv.exists():
            with open(self.csv, newline="") as f:
                self.columns = next(csv.reader(f), None)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                log.info("tensorboard is not installed; metrics go to metrics.jsonl / metrics.csv only")

    def _truncate_after(self, step: int) -> None:
        # Rows logged after the checkpoint we resume from will be logged again. Rewritten atomically (a
        # kill here must not lose the run's history); a line torn by a kill mid-append is dropped.
        if self.jsonl.exists():
            keep = []
            for ln in self.jsonl.read_text().splitlines():
                try:
                    row = json.loads(ln) if ln.strip() else None
                except json.JSONDecodeError:
                    log.warning("dropping a torn line of %s: %r", self.jsonl, ln[:80])
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= step:
                    keep.append(ln)
            atomic_write(self.jsonl, lambda f: f.write("".join(ln + "\n" for ln in keep).encode()))
        if self.csv.exists():
            with open(self.csv, newline="") as f:
                rows = list(csv.reader(f))
            if rows:
                i = rows[0].index("step") if "step" in rows[0] else 0
                keep_rows = [rows[0]] + [r for r in rows[1:] if len(r) == len(rows[0]) and _step_le(r[i], step)]
                buf = io.StringIO(newline="")
                csv.writer(buf).writerows(keep_rows)
                atomic_write(self.csv, lambda f: f.write(buf.getvalue().encode()))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.columns is None:
            self.columns = list(row)
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Trainer:
    """See the module docstring. ``cfg`` is a :class:`TrainerConfig` (or a mapping merged onto it)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, cfg: TrainerConfig | Any,
                 sample_fn: SampleFn | None = None, collate_fn: Callable | None = None,
                 run_config: dict | None = None, model_groups: tuple[str, ...] = ("model",)):
        self.cfg = cfg = to_schema(cfg, TrainerConfig, "trainer")
        # the run's other config groups (RunContext.snapshot()), saved in every checkpoint: a resume
        # under other ``model_groups`` settings is refused, other groups' changes are reported
        self.run_config = plain_config(run_config) if run_config is not None else None
        self.model_groups = (model_groups,) if isinstance(model_groups, str) else tuple(model_groups)
        self._resumed: int | None = None
        self._resume_done = False
        self.device = resolve_device(cfg.device)
        D.init_distributed(self.device)
        self.rank, self.world = D.rank(), D.world_size()
        validate_trainer(cfg, self.world)
        self.is_main = self.rank == 0
        self.loss_fn, self.sample_fn, self.collate_fn = loss_fn, sample_fn, collate_fn
        # torchrun ranks may disagree on a timestamped Hydra directory: rank 0's choice wins.
        self.out_dir = Path(D.broadcast_object(str(Path(cfg.out_dir).resolve())))
        self.ckpt_dir = self.out_dir / "checkpoints"
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        D.barrier()

        self.data = data
        self.n = self._data_len(data)
        self.micro_global = cfg.batch_size // cfg.grad_accum
        self.sampler = BatchIndexSampler(self.n, self.micro_global, self.rank, self.world, cfg.seed)

        self.raw_model = model.to(self.device)
        self.model, self.ddp = self._wrap(self.raw_model)
        self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg)
        self.clip_groups = self._clip_groups(self.raw_model, list(getattr(cfg, "grad_clip_groups", []) or []))
        total = cfg.steps

        def factor(step: int) -> float:
            return lr_factor(step, cfg.warmup_steps, total, cfg.schedule, cfg.min_lr_ratio)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.ema = EMA(self.raw_model, cfg.ema_decays, cfg.ema_warmup) if cfg.ema_decays else None

        self.generator = torch.Generator(device=self.device).manual_seed(seed_from(cfg.seed, 1, self.rank))
        # Decorrelate ranks' global RNG (dropout etc.); the model was built before, identically.
        self._seed_globals(seed_from(cfg.seed, 2, self.rank))

        self.step = 0
        self.epoch, self.index = 0, 0
        self.last_checkpoint: Path | None = None
        self.metrics: MetricsWriter | None = None

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _data_len(data: Any) -> int:
        try:
            return len(data)
        except TypeError:
            raise TypeError(f"data must be a tensor or a map-style dataset with __len__, got {type(data).__name__}") from None

    @staticmethod
    def _seed_globals(seed: int) -> None:
        import random

        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _wrap(self, raw: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        cfg, model, ddp = self.cfg, raw, None
        if self.world > 1 and cfg.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = ddp = DistributedDataParallel(raw, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters)
        elif self.world > 1 and cfg.strategy == "fsdp":
            import torch.distributed as dist
            from torch.distributed.fsdp import fully_shard

            with torch.no_grad():  # FSDP shards each rank's own copy: start from rank 0's weights
                for t in list(raw.parameters()) + list(raw.buffers()):
                    dist.broadcast(t.data, 0)
            wrap = set(cfg.fsdp_wrap)
            for m in raw.modules():
                if m is not raw and type(m).__name__ in wrap:
                    fully_shard(m)
            fully_shard(raw)
        if cfg.compile:
            model = torch.compile(model)
        return model, ddp

    @staticmethod
    def _clip_groups(raw: nn.Module, prefixes: list[str]) -> list[list[torch.Tensor]]:
        """Parameters split by ``grad_clip_groups``: one list per prefix, then the rest (if any)."""
        params = [(n, p) for n, p in raw.named_parameters() if p.requires_grad]
        if not prefixes:
            return [[p for _, p in params]]
        groups: list[list[torch.Tensor]] = [[] for _ in prefixes]
        rest: list[torch.Tensor] = []
        for name, p in params:
            hit = [i for i, pre in enumerate(prefixes) if name == pre or name.startswith(pre + ".")]
            (groups[hit[0]] if hit else rest).append(p)
        for pre, g in zip(prefixes, groups):
            if not g:
                names = sorted({n.split(".")[0] for n, _ in params})
                raise ValueError(f"trainer.grad_clip_groups: {pre!r} names no trainable parameters of the "
                                 f"model (its top-level modules: {names})")
        return groups + ([rest] if rest else [])

    @property
    def fsdp(self) -> bool:
        return self.world > 1 and self.cfg.strategy == "fsdp"

    # ------------------------------------------------------------------ data
    def _batches(self) -> Iterator[Any]:
        """Local micro-batches from the current (epoch, index) onwards; advances the position."""
        data = self.data
        tensors = None
        if isinstance(data, torch.Tensor):
            tensors = data
        elif isinstance(data, torch.utils.data.TensorDataset):
            tensors = tuple(data.tensors)
        while True:
            epoch, start = self.epoch, self.index
            per_epoch = self.sampler.per_epoch
            if tensors is not None:
                for j in range(start, per_epoch):
                    idx = self.sampler.indices(epoch, j)
                    if isinstance(tensors, tuple):
                        batch = tuple(t[idx] for t in tensors)
                    else:
                        batch = tensors[idx]
                    self._advance()
                    yield batch
            else:
                lists = [self.sampler.indices(epoch, j).tolist() for j in range(start, per_epoch)]
                loader = torch.utils.data.DataLoader(
                    data, batch_sampler=lists, num_workers=self.cfg.num_workers,
                    collate_fn=self.collate_fn, pin_memory=self.device.type == "cuda",
                    generator=torch.Generator().manual_seed(seed_from(self.cfg.seed, 3, epoch, start, self.rank)),
                )
                for batch in loader:
                    self._advance()
                    yield batch

    def _advance(self) -> None:
        self.index += 1
        if self.index >= self.sampler.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0

    # ------------------------------------------------------------------ state
    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.cfg.precision == "fp16":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _rng(self) -> dict:
        return {"globals": rng_state(), "generator": self.generator.get_state().cpu()}

    def state_dict(self) -> dict:
        """The full training state (plain, weights_only-loadable). A collective under FSDP."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(self.raw_model, options=opts)
            optim_sd = get_optimizer_state_dict(self.raw_model, self.optimizer, options=opts)
        else:
            model_sd = {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}
            optim_sd = self.optimizer.state_dict()
        return {
            "format": FORMAT,
            "step": self.step,
            "data": {"epoch": self.epoch, "index": self.index, "offset": self.index * self.micro_global,
                     "n": self.n, "micro_batch": self.micro_global},
            "model": model_sd,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": D.gather_object(self._rng()),
            "world_size": self.world,
            "config": dataclasses.asdict(self.cfg),
            "run_config": self.run_config,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved; training then continues exactly."""
        if state.get("format") != FORMAT:
            raise ValueError(f"not a polydiff engine checkpoint (format {state.get('format')!r}, expected {FORMAT!r})")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.raw_model, state["model"], options=opts)
            set_optimizer_state_dict(self.raw_model, self.optimizer, state["optimizer"], options=opts)
        else:
            self.raw_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if state.get("ema"):
                self.ema.load_state_dict(state["ema"])
                absent = [k for k in self.ema.shadows if k not in state["ema"]["shadows"]]
                if absent:
                    log.warning("EMA decays %s are not in the checkpoint; they start from its weights", absent)
            else:
                log.warning("checkpoint has no EMA; EMA restarts from its weights")
        self.step = int(state["step"])
        data = state["data"]
        self.epoch, self.index = int(data["epoch"]), int(data["index"])
        if data["micro_batch"] != self.micro_global:  # grad_accum or batch changed: keep the sample offset
            self.index = int(data["offset"]) // self.micro_global
        if data["n"] != self.n or data["offset"] % self.micro_global:
            log.warning("data size or micro-batch changed since the checkpoint (%s -> %s); "
                        "the data order is not the one of an uninterrupted run",
                        (data["n"], data["micro_batch"]), (self.n, self.micro_global))
        if self.index >= self.sampler.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        rngs = state["rng"]
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank]["globals"])
            self.generator.set_state(rngs[self.rank]["generator"].to(self.generator.get_state().device))
        else:
            log.warning("checkpoint was written by %d ranks, this run has %d: RNG streams reseeded",
                        len(rngs), self.world)
            self.generator.manual_seed(seed_from(self.cfg.seed, 1, self.rank, self.step))
            self._seed_globals(seed_from(self.cfg.seed, 2, self.rank, self.step))

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; all ranks must call)."""
        state = self.state_dict()
        path = None
        if self.is_main:
            path = save_checkpoint(state, checkpoint_path(self.ckpt_dir, self.step))
            prune_checkpoints(self.ckpt_dir, self.cfg.keep_last)
            log.info("step %d: checkpoint %s", self.step, path)
        self.last_checkpoint = checkpoint_path(self.ckpt_dir, self.step)
        D.barrier()
        return path

    def resume(self) -> int | None:
        """Load the checkpoint ``trainer.resume`` asks for (the step resumed from, or None); :meth:`fit`
        does it itself. An entry point calls it before writing its own files, so that a refused resume
        (another model's checkpoint) leaves the run directory as it was. All ranks must call it."""
        if not self._resume_done:
            self._resumed, self._resume_done = self._resume(), True
        return self._resumed

    def _set_aside_after(self, step: int | None) -> None:
        """Checkpoints of later steps than the one this run continues from belong to an abandoned (or
        unloadable) run: renamed aside, so that pruning and a later resume see this run's own."""
        if self.is_main:
            moved = set_aside_checkpoints_after(self.ckpt_dir, step)
            if moved:
                msg = (f"{len(moved)} checkpoint(s) of steps after {step or 0} in {self.ckpt_dir}, which this run "
                       f"does not continue, renamed to *.set-aside: {', '.join(p.name for p in moved)}")
                log.warning(msg)
                warnings.warn(msg, stacklevel=3)
        D.barrier()

    def _check_shapes(self, path: Path, state: dict) -> None:
        """ConfigError when the checkpoint's weights do not fit the model built from this run's config
        (a setting outside the model group shaped it differently, e.g. data that changed a vocabulary),
        naming the tensors, before anything is loaded."""
        if self.fsdp or not isinstance(state.get("model"), dict):
            return  # FSDP holds shards; its loader reports a mismatch itself
        misfit = state_dict_misfit(self.raw_model.state_dict(), state["model"])
        if misfit:
            raise ConfigError(f"the weights of {path} do not fit the model this config builds ({misfit}): "
                              "a setting that shapes the model (e.g. a data setting that changes the vocabulary "
                              "or the graph size) differs from the run's; resume with the run's settings or use "
                              "another trainer.out_dir")

    def _resume(self) -> int | None:
        cfg = self.cfg
        if self.is_main:
            remove_stale_temp_files(self.ckpt_dir)
        D.barrier()
        found = pick_resume_checkpoint(self.ckpt_dir, cfg.resume, "trainer.resume", ConfigError)
        if found is None:
            self._set_aside_after(None)  # only unloadable files (or none): this run starts at step 0
            return None
        path, state = found
        self._check_run_config(path, state)
        self._check_shapes(path, state)
        self.load_state_dict(state)
        self._set_aside_after(self.step)
        self.last_checkpoint = path
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch, self.index)
        changed = changed_settings(state.get("config") or {}, dataclasses.asdict(cfg))
        if changed and self.is_main:
            # Legitimate (a longer schedule, a bigger batch) but easy to do by accident: say so.
            msg = (f"resuming {path} (step {self.step}) with trainer settings other than the checkpoint's: "
                   + "; ".join(changed))
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
        return self.step

    def _check_run_config(self, path: Path, state: dict) -> None:
        """Refuse a resume whose model groups (``model_groups``) differ from the checkpoint's (its
        weights belong to another model, or would train on under other settings unnoticed); report
        other groups' changes."""
        saved = state.get("run_config")
        if saved is None or self.run_config is None:  # checkpoints from before run configs were kept
            return
        changes = changed_run_config(saved, self.run_config)
        model = [c for c in changes if c.split(".", 1)[0] in self.model_groups]
        if model:
            raise ConfigError(f"{path} (step {state.get('step')}) was written with other model settings than this "
                              f"run's: {'; '.join(model)}. Resume with the checkpoint's model settings, "
                              f"or start in another trainer.out_dir")
        if changes and self.is_main:
            msg = f"resuming {path} with settings other than the checkpoint's: " + "; ".join(changes)
            log.warning(msg)
            warnings.warn(msg, stacklevel=3)

    # ------------------------------------------------------------------ sampling / export
    def _sample(self) -> None:
        if self.sample_fn is None:
            return
        if not (self.is_main or self.cfg.sample_all_ranks or self.fsdp):
            return
        saved = rng_state()
        was_training = self.raw_model.training
        self.raw_model.eval()
        try:
            ctx = self.ema.swapped_in(self.raw_model) if self.ema is not None else contextlib.nullcontext()
            with ctx, torch.no_grad():
                try:
                    self.sample_fn(self.raw_model, self.step, self.out_dir)
                finally:
                    if self.fsdp:  # a no-grad forward leaves FSDP's root unsharded: shard it back before the
                        self._reshard()  # EMA swap restores the weights (plain tensors into DTensors fails)
        finally:
            self.raw_model.train(was_training)
            set_rng_state(saved)

    def _reshard(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        for m in self.raw_model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    def export(self) -> list[Path]:
        """Write ``ema_<decay>.safetensors`` for each decay (``model.safetensors`` without EMA)."""
        out = []
        meta = {"step": str(self.step), "format": FORMAT}
        if self.ema is None:
            sd = self.state_dict()["model"] if self.fsdp else self.raw_model.state_dict()
            if self.is_main:
                out.append(export_safetensors(sd, self.out_dir / "model.safetensors", meta))
            return out
        # the shadows also track non-persistent buffers (swapped in for sampling); an export holds
        # what the model's state_dict holds, so it loads with load_state_dict(strict=True)
        persistent = set(self.raw_model.state_dict())
        for d in self.ema.decays:
            weights = {k: v for k, v in self.ema.averaged(d, full=True).items() if k in persistent}
            if self.is_main:
                path = self.out_dir / f"ema_{decay_key(d)}.safetensors"
                out.append(export_safetensors(weights, path, {**meta, "ema_decay": decay_key(d)}))
        return out

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train to ``cfg.steps`` (or stop after step ``stop_at`` / ``cfg.stop_at``, with a checkpoint)."""
        cfg = self.cfg
        resumed = self.resume()
        stop = min(x for x in (stop_at, cfg.stop_at, cfg.steps) if x is not None)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsWriter(self.out_dir, cfg.tensorboard, resumed)
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=None if (self.is_main and cfg.progress) else True,
                   dynamic_ncols=True, desc="train", file=sys.stderr)
        batches = self._batches()
        self.model.train()
        # Log lines printed above the bar instead of through it.
        redirect = logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()
        with redirect, contextlib.closing(bar):
            last = self._loop(bar, batches, stop)
        return {"step": self.step, "checkpoint": self.last_checkpoint, **last}

    def _loop(self, bar: Any, batches: Iterator[Any], stop: int) -> dict[str, Any]:
        cfg = self.cfg
        window_losses: list[list[float]] = []
        window_start, window_steps = time.perf_counter(), 0
        last: dict[str, Any] = {}
        try:
            while self.step < stop:
                values, keys, norm, lr = self._train_step(batches)
                self.step += 1
                window_losses.append(values)
                window_steps += 1
                bar.update(1)
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == stop):
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    means = np.mean(np.asarray(window_losses, dtype=np.float64), axis=0).tolist()
                    last = {"step": self.step, **dict(zip(keys, means)), "lr": lr,
                            "grad_norm": norm, "samples_per_s": window_steps * cfg.batch_size / elapsed,
                            "epoch": self.epoch, "time": time.time()}
                    if self.metrics is not None:
                        self.metrics.write(last)
                    bar.set_postfix(loss=f"{last['loss']:.4g}", samples_s=f"{last['samples_per_s']:.4g}")
                    window_losses, window_steps, window_start = [], 0, time.perf_counter()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self._sample()
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == stop:
                    self.save()
            if self.step >= cfg.steps and cfg.export_ema:
                self.export()
        finally:
            if self.metrics is not None:
                self.metrics.close()
        return last

    def _train_step(self, batches: Iterator[Any]) -> tuple[list[float], list[str], float, float]:
        cfg = self.cfg
        accum = cfg.grad_accum
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.zero_grad(set_to_none=True)
        sums: torch.Tensor | None = None
        keys: list[str] = []
        for micro in range(accum):
            batch = _to_device(next(batches), self.device)
            last_micro = micro == accum - 1
            sync = contextlib.nullcontext()
            if self.ddp is not None and not last_micro:
                sync = self.ddp.no_sync()
            elif self.fsdp:
                self.raw_model.set_requires_gradient_sync(last_micro)
            with sync:
                with self._autocast():
                    out = self.loss_fn(self.model, batch, self.generator)
                loss, scalars, keys = self._unpack(out)
                self.scaler.scale(loss / accum).backward()
            vals = torch.stack([loss.detach().float()] + [s.detach().float().reshape(()) for s in scalars])
            sums = vals if sums is None else sums + vals
        values_t = D.all_reduce_mean(sums / accum)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip else float("inf")
        norms = []
        for group in self.clip_groups:  # one group (the global norm) unless grad_clip_groups is set
            params = [p for p in group if p.grad is not None]
            if not params:
                continue
            g_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norms.append(g_norm.full_tensor() if type(g_norm).__name__ == "DTensor" else g_norm)
        # The logged norm is the global one before clipping, whatever the grouping.
        norm = torch.stack([n.float() for n in norms]).square().sum().sqrt() if norms else torch.zeros((), device=self.device)
        host = torch.cat([values_t, norm.detach().float().reshape(1).to(values_t.device)]).tolist()
        values, norm_v = host[:-1], host[-1]
        if not math.isfinite(values[0]):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self.step + 1, "loss", values[0], self.last_checkpoint)
        if not math.isfinite(norm_v) and not self.scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self.step + 1, "gradient norm", norm_v, self.last_checkpoint)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is not None and self.scaler.get_scale() < scale:
            # fp16: the scaler found inf/NaN gradients and skipped the optimiser step (then lowered
            # its scale); the schedule and the EMA must not advance over a step that did not happen.
            return values, keys, norm_v, lr
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.raw_model)
        return values, keys, norm_v, lr

    @staticmethod
    def _unpack(out: Any) -> tuple[torch.Tensor, list[torch.Tensor], list[str]]:
        if isinstance(out, dict):
            if "loss" not in out:
                raise ValueError(f"loss_fn returned a dict without 'loss' (keys {list(out)})")
            extra = sorted(k for k in out if k != "loss")
            loss = out["loss"]
            return loss, [torch.as_tensor(out[k], device=loss.device) for k in extra], ["loss", *extra]
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor or a dict with 'loss', got {type(out).__name__}")
        return out, [], ["loss"]
