"""Typed configuration schemas for the training engine and the checks that run at start.

Every config group a domain exposes to Hydra (model, data, path/loss, sampler, trainer) is
backed by a dataclass registered in Hydra's ``ConfigStore``. A group's YAML file extends its
schema through its defaults list, so Hydra itself rejects an unknown key (in a YAML file or on
the command line) before any code runs. Values are then checked by :func:`validate_trainer`
and :func:`validate_paths`, which raise ``ValueError`` naming the field and the value:

    trainer.lr must be > 0, got -0.001

A group's YAML extends its schema like this (``trainer_schema`` is registered below)::

    defaults:
      - trainer_schema
      - _self_
    lr: 2e-4
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "exponential")
PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the value."""


def path_field(default: Any = None, **kwargs: Any) -> Any:
    """A dataclass field holding a filesystem path that must exist when it is set.

    :func:`validate_paths` checks every such field; use it for data files and directories so
    that a missing path fails at start, not when the first batch is read.
    """
    return field(default=default, metadata={"must_exist": True}, **kwargs)


@dataclass
class TrainerConfig:
    """Everything the training loop needs; ``batch_size`` is the *global* batch per optimiser step.

    The global batch is split over ``world_size`` ranks and ``grad_accum`` micro-steps, so it
    must be divisible by ``world_size * grad_accum``. The batches are then the same for any number of
    ranks, and a deterministic loss gives the same optimisation (up to float reduction order); a loss
    that draws noise (diffusion times and noise) draws it per rank, so its draws, and the weights,
    differ from a one-rank run's while following the same distribution.
    """

    seed: int = 0
    steps: int = 1000
    # Stop (after writing a checkpoint) once this step is reached; the LR schedule still spans
    # ``steps``. Lets a run be split over several jobs; None runs to ``steps``.
    stop_at: int | None = None
    batch_size: int = 64
    grad_accum: int = 1
    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0  # end of the cosine / linear / exponential decay, as a fraction of lr
    grad_clip: float | None = 1.0  # max global grad norm; None or 0 disables clipping
    # Clip these parameter groups each to grad_clip on their own, as GDSS clips its two networks
    # (one optimiser each): a group is every parameter named "<prefix>" or "<prefix>.*" (a submodule, or a
    # bare nn.Parameter); the parameters no prefix names form one more group. Empty: one global norm.
    grad_clip_groups: list[str] = field(default_factory=list)
    ema_decays: list[float] = field(default_factory=lambda: [0.999])
    ema_warmup: bool = False  # decay_n = min(decay, (1 + n) / (10 + n)) for update n
    precision: str = "fp32"
    device: str = "auto"
    strategy: str = "ddp"  # used when launched by torchrun with more than one rank
    fsdp_wrap: list[str] = field(default_factory=list)  # module class names sharded on their own
    # DDP: let parameters go without a gradient in a step (a model with layers its loss does not use,
    # e.g. GDSS's last adjacency layer); DDP otherwise stops at the second step
    find_unused_parameters: bool = False
    compile: bool = False
    num_workers: int = 0
    ckpt_every: int = 1000
    keep_last: int = 3
    sample_every: int = 0
    sample_all_ranks: bool = False  # call sample_fn on every rank (it may gather); else rank 0
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True  # used only when the tensorboard package is installed
    out_dir: str = "outputs"
    # "auto": continue from the newest checkpoint in out_dir if any; True: that checkpoint
    # must exist; False: start fresh (out_dir must hold no checkpoint); a path: that file.
    resume: Any = "auto"
    export_ema: bool = True  # write ema_<decay>.safetensors at the end


def _fail(name: str, rule: str, value: Any) -> None:
    raise ConfigError(f"{name} {rule}, got {value!r}")


def world_size_from_env() -> int:
    """The number of ranks torchrun launched (1 when not under torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(device: str) -> Any:
    """``"auto"`` is CUDA when available, else CPU; under torchrun each rank takes its LOCAL_RANK GPU."""
    import torch

    if device not in DEVICES:
        _fail("trainer.device", f"must be one of {list(DEVICES)}", device)
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        _fail("trainer.device", "is 'cuda' but CUDA is not available", device)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def validate_trainer(cfg: TrainerConfig, world_size: int | None = None, prefix: str = "trainer") -> None:
    """Check every value of ``cfg``; raise ``ValueError`` naming the first bad field and value."""
    ws = world_size_from_env() if world_size is None else world_size
    p = prefix + "."

    def positive_int(name: str) -> None:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            _fail(p + name, "must be a positive integer", v)

    def non_negative_int(name: str) -> None:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            _fail(p + name, "must be an integer >= 0", v)

    def choice(name: str, options: tuple[str, ...]) -> None:
        v = getattr(cfg, name)
        if v not in options:
            _fail(p + name, f"must be one of {list(options)}", v)

    positive_int("steps")
    positive_int("batch_size")
    positive_int("grad_accum")
    positive_int("keep_last")
    for name in ("warmup_steps", "ckpt_every", "sample_every", "log_every", "num_workers", "seed"):
        non_negative_int(name)
    warmup_note = (cfg.warmup_steps, cfg.steps, cfg.schedule)
    if (cfg.warmup_steps > cfg.steps or (cfg.warmup_steps == cfg.steps and cfg.schedule != "constant")) \
            and getattr(cfg, "_warmup_warned", None) != warmup_note:  # once per config: prepare() and Trainer
        cfg._warmup_warned = warmup_note  # both validate the same object
        # legal (a short smoke run under a long run's warm-up), but the learning rate ends below
        # trainer.lr or the decay never starts: say so at start rather than let the run look fine
        decay = "" if cfg.schedule == "constant" else f" and the {cfg.schedule!r} decay never starts"
        warnings.warn(f"{p}warmup_steps={cfg.warmup_steps} >= {p}steps={cfg.steps}: the learning rate ends at "
                      f"{cfg.steps / cfg.warmup_steps:.3g} x lr{decay}", UserWarning, stacklevel=3)
    if cfg.stop_at is not None and not (0 < cfg.stop_at <= cfg.steps):
        _fail(p + "stop_at", f"must be None or in (0, steps={cfg.steps}]", cfg.stop_at)
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        _fail(p + "lr", "must be > 0", cfg.lr)
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        _fail(p + "weight_decay", "must be >= 0", cfg.weight_decay)
    if not (math.isfinite(cfg.eps) and cfg.eps > 0):
        _fail(p + "eps", "must be > 0", cfg.eps)
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        _fail(p + "betas", "must be two numbers in [0, 1)", list(cfg.betas))
    if not 0.0 <= cfg.momentum < 1.0:
        _fail(p + "momentum", "must be in [0, 1)", cfg.momentum)
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        _fail(p + "min_lr_ratio", "must be in [0, 1]", cfg.min_lr_ratio)
    if cfg.schedule == "exponential" and cfg.min_lr_ratio <= 0.0:
        _fail(p + "min_lr_ratio", "must be > 0 for schedule 'exponential' (the decay reaches it geometrically)",
              cfg.min_lr_ratio)
    if cfg.grad_clip is not None and not (math.isfinite(cfg.grad_clip) and cfg.grad_clip >= 0):
        _fail(p + "grad_clip", "must be None or >= 0", cfg.grad_clip)
    groups = list(cfg.grad_clip_groups)
    if any(not isinstance(g, str) or not g or g.startswith(".") or g.endswith(".") for g in groups):
        _fail(p + "grad_clip_groups", "must hold non-empty module names (no leading/trailing dot)", groups)
    if len(set(groups)) != len(groups):
        _fail(p + "grad_clip_groups", "must not repeat a name", groups)
    for a in groups:
        for b in groups:
            if a != b and b.startswith(a + "."):
                _fail(p + "grad_clip_groups", f"must not nest {b!r} inside {a!r}", groups)
    for d in cfg.ema_decays:
        if not 0.0 < d < 1.0:
            _fail(p + "ema_decays", "must hold decays in (0, 1)", list(cfg.ema_decays))
    if len(set(cfg.ema_decays)) != len(cfg.ema_decays):
        _fail(p + "ema_decays", "must not repeat a decay", list(cfg.ema_decays))
    choice("device", DEVICES)
    choice("optimizer", OPTIMIZERS)
    choice("schedule", SCHEDULES)
    choice("precision", PRECISIONS)
    choice("strategy", STRATEGIES)
    if cfg.precision == "fp16" and resolve_device(cfg.device).type != "cuda":
        _fail(p + "precision", "'fp16' needs CUDA (a GradScaler); use 'bf16' on CPU", cfg.precision)
    if not (isinstance(cfg.resume, (bool, str)) and cfg.resume != ""):
        _fail(p + "resume", "must be 'auto', true, false or a checkpoint path", cfg.resume)
    if isinstance(cfg.resume, str) and cfg.resume != "auto" and not Path(cfg.resume).is_file():
        _fail(p + "resume", "is not 'auto' and names no existing checkpoint file", cfg.resume)
    if not cfg.out_dir:
        _fail(p + "out_dir", "must be a directory path", cfg.out_dir)
    if ws < 1:
        raise ConfigError(f"world size must be >= 1, got {ws}")
    if cfg.batch_size % (ws * cfg.grad_accum) != 0:
        raise ConfigError(
            f"{p}batch_size={cfg.batch_size} (global) must be divisible by world_size * grad_accum "
            f"= {ws} * {cfg.grad_accum} = {ws * cfg.grad_accum}"
        )


def validate_paths(obj: Any, prefix: str) -> None:
    """Raise ``ValueError`` for any :func:`path_field` of ``obj`` (recursively) that does not exist."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}.{f.name}"
        if f.metadata.get("must_exist") and value is not None:
            if not str(value):
                raise ConfigError(f"{name} is empty; give the path of an existing file or directory")
            if not Path(value).exists():
                raise ConfigError(f"{name} does not exist: {str(value)!r}")
        elif dataclasses.is_dataclass(value):
            validate_paths(value, name)


def to_schema(node: DictConfig | Any, schema: type, name: str) -> Any:
    """Merge ``node`` onto ``schema`` and return the dataclass instance.

    Unknown keys, wrong types and missing mandatory values raise ``ValueError`` naming the key.
    Nodes already typed by ``schema`` (the YAML extends it) pass through unchanged.
    """
    if isinstance(node, schema):
        return node
    _reject_unknown_keys(node, schema, name)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except Exception as e:  # omegaconf errors: name the group and keep their own message
        raise ConfigError(f"invalid config '{name}' ({schema.__name__}): {e}") from None


def _reject_unknown_keys(node: Any, schema: type, prefix: str) -> None:
    # Hydra's `+key=value` opens a structured node for writing; name such keys here.
    if not (isinstance(node, (dict, DictConfig)) and dataclasses.is_dataclass(schema)):
        return
    known = {f.name for f in dataclasses.fields(schema)}
    try:
        hints = typing.get_type_hints(schema)
    except Exception:  # unresolvable forward references: check this level only
        hints = {}
    for key in node.keys():
        if key not in known:
            raise ConfigError(f"unknown key '{prefix}.{key}': {schema.__name__} has {sorted(known)}")
        sub = hints.get(key)
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            _reject_unknown_keys(node[key], sub, f"{prefix}.{key}")


def typed_group(cfg: DictConfig, name: str) -> Any:
    """The dataclass instance behind group ``name`` of a composed Hydra config.

    Raise ``ValueError`` when the group's YAML does not extend a registered schema, so that
    a group without type checks cannot slip through.
    """
    if name not in cfg:
        raise ConfigError(f"config has no '{name}' group; available: {list(cfg.keys())}")
    node = cfg[name]
    schema = OmegaConf.get_type(node)
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise ConfigError(
            f"config group '{name}' is not typed: its YAML must extend a registered schema "
            f"(defaults: [<name>_schema, _self_])"
        )
    # Merging onto a fresh schema also catches keys forced in with Hydra's `+group.key=...`.
    return to_schema(node, schema, name)


def register_schema(group: str, name: str, schema: type) -> None:
    """Register ``schema`` in Hydra's ConfigStore as ``<group>/<name>`` for YAML files to extend."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=group, name=name, node=schema)


register_schema("trainer", "trainer_schema", TrainerConfig)
