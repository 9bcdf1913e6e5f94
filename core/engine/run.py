"""Glue a domain's Hydra ``main`` calls: typed groups, validation, seeding, clean failure.

A domain's entry point reads::

    @hydra.main(version_base="1.3", config_path="../configs/<domain>", config_name="config")
    def main(cfg):
        with engine_main():
            ctx = prepare(cfg, groups=("model", "data", "path", "sampler"))
            model = build_model(ctx.groups["model"])
            Trainer(model, loss_fn, data, ctx.trainer, sample_fn).fit()

Everything that can be checked before training (unknown keys, types, value ranges, the global
batch against the number of ranks, data paths) is checked in :func:`prepare`, before the
process group is joined, so a bad config fails at start on every rank alike.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from . import distributed as D
from .checkpoint import CheckpointError
from .config import (
    ConfigError,
    TrainerConfig,
    to_schema,
    typed_group,
    validate_paths,
    validate_trainer,
    world_size_from_env,
)
from .trainer import NonFiniteLossError

log = logging.getLogger("polydiff.engine")


@dataclass
class RunContext:
    cfg: DictConfig
    trainer: TrainerConfig
    groups: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare(cfg: DictConfig, groups: Iterable[str] = ()) -> RunContext:
    """Check ``cfg.trainer`` and the typed ``groups`` of a composed config; seed; raise ConfigError.

    Each group object may define ``validate()`` raising ``ValueError`` for its own rules;
    every :func:`~core.engine.config.path_field` in it must exist.
    """
    ws = world_size_from_env()
    try:
        trainer = to_schema(cfg.trainer, TrainerConfig, "trainer")
        validate_trainer(trainer, ws)
        typed = {}
        for g in groups:
            obj = typed_group(cfg, g)
            validate_paths(obj, g)
            check = getattr(obj, "validate", None)
            if callable(check):
                check()
            typed[g] = obj
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if int(_env_rank()) != 0:
        logging.getLogger("polydiff").setLevel(logging.WARNING)
    seed_everything(trainer.seed)
    return RunContext(cfg=cfg, trainer=trainer, groups=typed, world_size=ws)


def _env_rank() -> str:
    import os

    return os.environ.get("RANK", "0")


@contextlib.contextmanager
def engine_main() -> Iterator[None]:
    """Turn expected failures into one clear line on stderr and an exit code; leave the process group.

    Exit codes: 2 bad config, 3 non-finite loss, 4 unusable checkpoint. Other exceptions keep
    their traceback.
    """
    code = 0
    try:
        yield
    except ConfigError as e:
        code, msg = 2, f"config error: {e}"
    except NonFiniteLossError as e:
        code, msg = 3, f"training stopped: {e}"
    except CheckpointError as e:
        code, msg = 4, f"checkpoint error: {e}"
    finally:
        D.cleanup()
    if code:
        log.error(msg)
        print(f"polydiff: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(code)
