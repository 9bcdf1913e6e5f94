"""A complete, tiny training entry point: a denoising MLP on synthetic data.

Shows how a domain wires the engine, and gives tests something real to run, kill and resume::

    python -m core.engine.example trainer.steps=200 trainer.out_dir=/tmp/run
    torchrun --standalone --nproc_per_node 2 -m core.engine.example trainer.batch_size=64
    python -m core.engine.example data=file data.path=/data/points.pt loss=regression

Config groups (``configs/example/``): ``model`` (MLP), ``data`` (``synthetic``: a Gaussian
mixture generated from a seed; ``file``: a tensor file), ``path`` (the Gaussian path
``x_t = alpha(t) x0 + sigma(t) eps``: any ``core.paths`` name; ``linear`` and ``cosine`` ship), ``loss`` (``denoise``: x0
prediction MSE; ``regression``: a fixed deterministic target, no randomness), ``sampler``
(core DDIM on a uniform grid from the path's t_max to 0), ``trainer`` (:class:`TrainerConfig`).

The path, loss and sampler are the core's (``core.paths``, ``core.losses``, ``core.samplers``):
a domain entry point is this file with its own data and model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from ..grids import uniform_t_grid
from ..losses import denoising_loss
from ..paths import PATHS, get_path
from ..predictions import as_denoiser
from ..samplers import sample
from . import distributed as D
from .checkpoint import atomic_write
from .config import ConfigError, path_field, register_schema
from .run import hydra_entry, prepare
from .trainer import Trainer, seed_from

# ----------------------------------------------------------------------------- schemas


@dataclass
class MLPConfig:
    hidden: int = 128
    depth: int = 3
    time_features: int = 16

    def validate(self) -> None:
        for name in ("hidden", "depth", "time_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)!r}")


@dataclass
class SyntheticDataConfig:
    n: int = 4096
    dim: int = 2
    modes: int = 8
    radius: float = 2.0
    noise: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        for name in ("n", "dim", "modes"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.noise < 0:
            raise ValueError(f"data.noise must be >= 0, got {self.noise!r}")


@dataclass
class FileDataConfig:
    path: str = path_field("???")  # a .pt (tensor, or dict holding `key`) or .safetensors file
    key: str = "x"


@dataclass
class PathConfig:
    kind: str = "linear"

    def validate(self) -> None:
        if self.kind not in PATHS:
            raise ValueError(f"path.kind must be one of {sorted(PATHS)}, got {self.kind!r}")


@dataclass
class LossConfig:
    kind: str = "denoise"

    def validate(self) -> None:
        if self.kind not in ("denoise", "regression"):
            raise ValueError(f"loss.kind must be 'denoise' or 'regression', got {self.kind!r}")


@dataclass
class SamplerConfig:
    steps: int = 32
    num_samples: int = 512
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.num_samples < 1:
            raise ValueError(f"sampler.steps and sampler.num_samples must be >= 1, got {self.steps}, "
                             f"{self.num_samples}")


register_schema("model", "mlp_schema", MLPConfig)
register_schema("data", "synthetic_schema", SyntheticDataConfig)
register_schema("data", "file_schema", FileDataConfig)
register_schema("path", "path_schema", PathConfig)
register_schema("loss", "loss_schema", LossConfig)
register_schema("sampler", "sampler_schema", SamplerConfig)

# ----------------------------------------------------------------------------- data


def make_data(cfg: SyntheticDataConfig | FileDataConfig) -> torch.Tensor:
    """``(n, dim)`` float32 samples: a seeded Gaussian mixture, or the rows of a tensor file."""
    if isinstance(cfg, FileDataConfig):
        p = Path(cfg.path)
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        x = obj[cfg.key] if isinstance(obj, dict) else obj
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ConfigError(f"data.path {cfg.path!r}: expected a (n, dim) tensor under key {cfg.key!r}")
        return x.float()
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.dim == 2:
        angle = torch.arange(cfg.modes) * (2 * math.pi / cfg.modes)
        centers = torch.stack([angle.cos(), angle.sin()], 1)
    else:
        centers = torch.nn.functional.normalize(torch.randn(cfg.modes, cfg.dim, generator=g), dim=1)
    which = torch.randint(cfg.modes, (cfg.n,), generator=g)
    return cfg.radius * centers[which] + cfg.noise * torch.randn(cfg.n, cfg.dim, generator=g)


# ----------------------------------------------------------------------------- model and path


class Denoiser(nn.Module):
    """``D(x_t, t) -> x0_hat`` for ``x_t: (B, dim)``, ``t: (B,)``; sin-cos time features."""

    def __init__(self, dim: int, cfg: MLPConfig):
        super().__init__()
        self.register_buffer("freqs", torch.randn(max(1, cfg.time_features // 2)) * 4.0)
        layers: list[nn.Module] = []
        width = dim + 2 * self.freqs.numel()
        for _ in range(cfg.depth):
            layers += [nn.Linear(width, cfg.hidden), nn.SiLU()]
            width = cfg.hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angle = t[:, None] * self.freqs[None] * math.pi
        return self.net(torch.cat([x, angle.sin(), angle.cos()], dim=1))


def make_loss(path: PathConfig, loss: LossConfig):
    gpath = get_path(path.kind)

    def denoise(model: nn.Module, x0: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        # plain x0-MSE ("snr" weighting) with t uniform on the path's range
        return {"loss": denoising_loss(model, x0, gpath, prediction="x0", weighting="snr", generator=g)}

    def regression(model: nn.Module, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        target = torch.sin(x0.roll(1, dims=1)) + 0.5 * x0
        return (model(x0, torch.zeros(x0.shape[0], device=x0.device)) - target).float().pow(2).mean()

    return denoise if loss.kind == "denoise" else regression


@torch.no_grad()
def ddim_sample(model: nn.Module, kind: str, n: int, dim: int, steps: int, generator: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """Core DDIM from the path's prior at ``t_max`` down to ``t = 0`` with the x0 prediction."""
    path = get_path(kind)
    grid = uniform_t_grid(path, steps, t_end=0.0)
    x = path.prior_sample((n, dim), t=float(grid[0]), generator=generator, device=device)
    out, _ = sample("ddim", as_denoiser(model, path, "x0"), path, x, grid)
    return out


def make_sample_fn(path: PathConfig, sampler: SamplerConfig, data: torch.Tensor):
    """Each rank draws its share of ``num_samples``; the shares are gathered; rank 0 writes them."""
    dim = data.shape[1]

    def sample_fn(model: nn.Module, step: int, out_dir: Path) -> None:
        device = next(model.parameters()).device
        mine = D.shard_range(sampler.num_samples)
        g = torch.Generator(device=device).manual_seed(seed_from(sampler.seed, step, D.rank()))
        x = ddim_sample(model, path.kind, len(mine), dim, sampler.steps, g, device)
        x = D.gather(x).cpu()
        if not D.is_main():
            return
        folder = out_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"samples_{step:08d}.pt", lambda f: torch.save({"x": x, "step": step}, f))
        stats = {"step": step, "n": x.shape[0], "mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
                 "data_mean": data.mean(0).tolist(), "data_std": data.std(0).tolist()}
        with open(folder / "stats.jsonl", "a") as f:
            f.write(json.dumps(stats) + "\n")

    return sample_fn


# ----------------------------------------------------------------------------- entry point


def train(cfg: DictConfig) -> dict:
    """Check ``cfg`` (a composed config), build everything and train; returns the last metrics."""
    ctx = prepare(cfg, groups=("model", "data", "path", "loss", "sampler"))
    g = ctx.groups
    data = make_data(g["data"])
    model = Denoiser(data.shape[1], g["model"])
    trainer = Trainer(model, make_loss(g["path"], g["loss"]), data, ctx.trainer,
                      sample_fn=make_sample_fn(g["path"], g["sampler"], data), run_config=ctx.snapshot())
    result = trainer.fit()
    if trainer.is_main:
        print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()}), flush=True)
    return result


main = hydra_entry(train, Path(__file__).resolve().parents[2] / "configs" / "example")

if __name__ == "__main__":
    main()
