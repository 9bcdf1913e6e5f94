"""Training engine: typed configs, the training loop, checkpoints, EMA and distributed glue.

Knows no domain: a domain hands over a model, a ``loss_fn(model, batch, generator)``, its data
and optionally a ``sample_fn(ema_model, step, out_dir)``. See ``core/engine/example.py``.
"""

from .checkpoint import (
    CheckpointError,
    export_ema_from_checkpoint,
    export_safetensors,
    load_checkpoint,
    save_checkpoint,
)
from .config import ConfigError, TrainerConfig, path_field, register_schema, validate_trainer
from .ema import EMA
from .run import RunContext, engine_main, prepare, seed_everything
from .trainer import NonFiniteLossError, Trainer, lr_factor

__all__ = [
    "EMA",
    "CheckpointError",
    "ConfigError",
    "NonFiniteLossError",
    "RunContext",
    "Trainer",
    "TrainerConfig",
    "engine_main",
    "export_ema_from_checkpoint",
    "export_safetensors",
    "load_checkpoint",
    "lr_factor",
    "path_field",
    "prepare",
    "register_schema",
    "save_checkpoint",
    "seed_everything",
    "validate_trainer",
]
