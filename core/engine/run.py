"""Glue a domain's Hydra ``main`` calls: typed groups, validation, seeding, clean failure.

A domain's entry point reads::

    def train(cfg):
        ctx = prepare(cfg, groups=("model", "data", "path", "sampler"))
        model = build_model(ctx.groups["model"])
        return Trainer(model, loss_fn, data, ctx.trainer, sample_fn, run_config=ctx.snapshot()).fit()

    main = hydra_entry(train, Path(__file__).resolve().parents[1] / "configs" / "<domain>")

Everything that can be checked before training (unknown keys, types, value ranges, the global
batch against the number of ranks, data paths) is checked in :func:`prepare`, before the
process group is joined, so a bad config fails at start on every rank alike.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
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

    def snapshot(self) -> dict:
        """The typed groups as plain values, for ``Trainer(..., run_config=ctx.snapshot())``: kept in
        every checkpoint, so that a resume under another model is refused and other changes reported."""
        from .trainer import plain_config

        return plain_config(self.groups)


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


def hydra_entry(train_fn: Callable[[DictConfig], Any], config_dir: str | Path, config_name: str = "config", *,
                input_errors: tuple[type[BaseException], ...] = ()) -> Callable[[], None]:
    """The ``main()`` of a domain entry point: Hydra on ``config_dir`` (an absolute path, so that
    console scripts work from any directory) around ``train_fn(cfg)`` inside :func:`engine_main`.

    ``input_errors``: exception types that mean bad user input (e.g. a ``ValueError`` naming a CSV
    column) and exit like a bad config, with code 2 and one line naming it.
    """
    import hydra

    started = []

    def task(cfg: DictConfig) -> None:
        started.append(True)
        with engine_main():
            try:
                train_fn(cfg)
            except input_errors as e:
                raise ConfigError(str(e)) from None

    # Hydra names the job (and its log file) after the task's module: keep the domain's.
    task.__module__ = train_fn.__module__
    task.__name__ = task.__qualname__ = "main"
    hydra_main = hydra.main(version_base="1.3", config_path=str(Path(config_dir).resolve()),
                            config_name=config_name)(task)

    def main() -> None:
        try:
            hydra_main()
        except SystemExit as e:
            # Hydra reports a config it cannot compose (a misspelt key, a value of the wrong type, an unknown
            # group option) itself, naming the key, and exits 1 before the task starts: that is a bad config
            if e.code == 1 and not started:
                raise SystemExit(2) from None
            raise

    main.__module__, main.__doc__ = train_fn.__module__, task.__doc__
    return main
