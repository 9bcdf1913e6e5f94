"""The 2D demo: train a small MLP on a checkerboard, sample with three samplers, measure the NLL.

    python -m core.demo [--steps 3000] [--path linear] [--prediction velocity] [--out outputs/demo2d]

Writes ``samples.png`` (data next to three samplers) and ``metrics.json`` into the output folder and
prints the test negative log-likelihood from the probability-flow ODE. The checkerboard is uniform on
8 unit squares, so the best possible NLL is log 8 = 2.079 nats: the printout shows how close the model is.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import trange

from .engine.checkpoint import atomic_write_text
from .engine.ema import EMA
from .grids import karras_grid
from .likelihood import log_likelihood
from .losses import denoising_loss
from .mixture import sliced_wasserstein
from .paths import PATHS, get_path
from .predictions import PREDICTIONS, as_denoiser
from .samplers import sample

CHECKERBOARD_NLL = math.log(8.0)  # uniform density 1/8 on 8 unit squares


def checkerboard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, 2)`` points uniform on the black squares of a 4x4 board covering [-2, 2]^2."""
    cell = torch.randint(0, 8, (n,), generator=generator)
    row = cell // 2
    col = 2 * (cell % 2) + (row % 2)
    u = torch.rand(n, 2, generator=generator)
    return torch.stack([col + u[:, 0], row + u[:, 1]], dim=1) - 2.0


class TimeMLP(nn.Module):
    """MLP on ``(x, t)``: sinusoidal features of t concatenated to x, SiLU hidden layers."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, n_freq: int = 16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000.0), n_freq)))
        layers: list[nn.Module] = [nn.Linear(dim + 2 * n_freq, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        arg = t.to(x.dtype)[:, None] * self.freqs[None]
        return self.net(torch.cat([x, torch.sin(arg), torch.cos(arg)], dim=1))


def scatter_png(panels: list[tuple[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (title, pts) in zip(axes, panels):
        p = pts.detach().cpu().numpy()
        ax.scatter(p[:, 0], p[:, 1], s=1.0, alpha=0.4, color="black", rasterized=True)
        ax.set_xlim(-2.5, 2.5)
        ax.set_ylim(-2.5, 2.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6000, help="training steps")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--path", default="linear", choices=sorted(PATHS))
    ap.add_argument("--prediction", default="velocity", choices=PREDICTIONS)
    ap.add_argument("--n-samples", type=int, default=4000)
    ap.add_argument("--n-nll", type=int, default=1000, help="test points for the NLL")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; one is fastest for this small MLP and immune to a busy machine")
    ap.add_argument("--out", default="outputs/demo2d")
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "n_samples", "n_nll"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.lr > 0:
        raise SystemExit(f"--lr must be positive, got {args.lr}")

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    path = get_path(args.path)
    model = TimeMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    ema = EMA(model, decays=(0.999,), warmup=True)

    t0 = time.perf_counter()
    bar = trange(args.steps, desc="train", mininterval=1.0)
    for _ in bar:
        x0 = checkerboard(args.batch, gen)
        loss = denoising_loss(model, x0, path, prediction=args.prediction, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    train_s = time.perf_counter() - t0

    model.load_state_dict(ema.averaged(0.999))
    model.eval()
    D = as_denoiser(model, path, args.prediction)
    # (sampler, steps): dpmpp_2m costs 1 NFE a step, heun 2 (1 on the last step to t=0).
    runs = [("dpmpp_2m", 10), ("heun", 18), ("euler_maruyama", 200)]
    data = checkerboard(args.n_samples, gen)
    panels = [("data (checkerboard)", data)]
    metrics: dict = {"train_seconds": round(train_s, 1), "train_steps": args.steps, "path": args.path,
                     "prediction": args.prediction, "samplers": {}}
    with torch.no_grad():
        for name, steps in runs:
            grid = karras_grid(path, steps)
            x = path.prior_sample((args.n_samples, 2), t=float(grid[0]), generator=gen)
            t1 = time.perf_counter()
            xs, nfe = sample(name, D, path, x, grid, generator=gen)
            sw = sliced_wasserstein(xs, data, generator=gen)
            metrics["samplers"][name] = {"nfe": nfe, "sliced_w2_to_data": round(sw, 4),
                                         "seconds": round(time.perf_counter() - t1, 2)}
            panels.append((f"{name}, NFE {nfe}, SW2 {sw:.3f}", xs))
    scatter_png(panels, out / "samples.png")

    test = checkerboard(args.n_nll, gen)
    logp, nfe = log_likelihood(D, path, test, trace="exact", rtol=1e-4, atol=1e-4)
    nll = float(-logp.mean())
    metrics["test_nll_nats"] = round(nll, 4)
    metrics["test_nll_bits_per_dim"] = round(nll / (2 * math.log(2)), 4)
    metrics["optimal_nll_nats"] = round(CHECKERBOARD_NLL, 4)
    metrics["nll_nfe"] = nfe
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))

    print(f"trained {args.steps} steps in {train_s:.1f}s on the {args.path} path ({args.prediction} prediction)")
    for name, m in metrics["samplers"].items():
        print(f"  {name:>15}: NFE {m['nfe']:>3}  sliced W2 to data {m['sliced_w2_to_data']:.4f}")
    print(f"test NLL {nll:.3f} nats ({metrics['test_nll_bits_per_dim']:.3f} bits/dim); "
          f"the true density gives log 8 = {CHECKERBOARD_NLL:.3f} nats")
    print(f"wrote {out / 'samples.png'} and {out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    main()
