"""RADD's cached absorbing sampler vs the same sampler without the cache.

    python -m benchmarks.discrete_sampling [--steps 1024] [--length 256] [--batch 1,4] [--threads 1] [--device cpu]

A small random time-independent transformer (``core.nn.TokenTransformer``: token embedding,
1D RoPE, DiT blocks under a constant conditioning vector, LayerNorm + linear head, softmax over
the V clean tokens) plays the RADD network ``probs_fn(x) -> (B, L, V)``. Its weights get a
0.02 N(0, 1) perturbation after the DiT init so that the adaLN-Zero gates are open and every
token attends to the whole sequence.

For each batch size both variants run ``core.discrete.sample_absorbing`` (analytic update,
log-linear noise, final denoise) from the all-mask prior with generators seeded alike, so they
consume the same random draws; the benchmark checks that their samples are identical, and
reports samples/s, NFE per sequence (RADD's E-NFE, mean over runs; the uncached sampler spends
steps + 1) and the speed ratio. Runs alternate between the two variants (which one goes first alternates too)
after one untimed warm-up each; times are medians over ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from core.discrete import Absorbing, LogLinear, sample_absorbing
from core.nn.transformer import TokenTransformer, TransformerConfig


class RandomRADD(nn.Module):
    """Time-independent clean-token model: ids (B, L) in [0, V] -> probabilities (B, L, V)."""

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size + 1, dim)  # + the mask token
        self.body = TokenTransformer(TransformerConfig(dim=dim, depth=depth, num_heads=heads, rope_axes=1))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L = x.shape
        # RADD's network has no time input: feed the blocks one constant conditioning vector.
        c = self.body.condition(torch.zeros(B, device=x.device))
        positions = torch.arange(L, device=x.device, dtype=torch.float32)[:, None]
        h = self.body(self.embed(x), c, positions=positions)
        return self.head(self.norm(h)).float().softmax(-1)


def build(vocab: int, dim: int, depth: int, heads: int, device: str) -> RandomRADD:
    torch.manual_seed(0)
    model = RandomRADD(vocab, dim, depth, heads)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.to(device).eval()


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(model, graph, noise, args, batch: int, cache: bool, seed: int):
    x = graph.sample_limit(batch, args.length, device=args.device)
    g = torch.Generator(device=args.device).manual_seed(seed)
    _sync(args.device)
    start = time.perf_counter()
    out, nfe = sample_absorbing(model, graph, noise, x, args.steps, cache=cache, generator=g)
    _sync(args.device)
    return time.perf_counter() - start, out, nfe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1024)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=str, default="1", help="comma-separated batch sizes")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    graph, noise = Absorbing(args.vocab), LogLinear(1e-3)
    model = build(args.vocab, args.dim, args.depth, args.heads, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    device_name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"device {device_name}; torch {torch.__version__}; model: vocab {args.vocab}, dim {args.dim}, "
        f"depth {args.depth}, heads {args.heads} ({n_params / 1e6:.2f}M params); "
        f"{args.steps} steps + denoise, length {args.length}, analytic update, log-linear noise"
    )
    print(f"{'batch':>5} {'variant':>9} {'time s':>8} {'samples/s':>10} {'NFE/seq':>8} {'identical':>9}")
    ok = True
    with torch.inference_mode():
        for batch in (int(b) for b in args.batch.split(",")):
            for cache in (False, True):  # warm-up (kernels, allocator)
                run(model, graph, noise, args, batch, cache, seed=12345)
            times = {False: [], True: []}
            nfes = {False: [], True: []}
            ratios = []
            for r in range(args.repeats):
                res = {}
                for cache in (False, True) if r % 2 == 0 else (True, False):
                    res[cache] = run(model, graph, noise, args, batch, cache, seed=r)
                    times[cache].append(res[cache][0])
                    nfes[cache].append(res[cache][2].double().mean().item())
                same = torch.equal(res[False][1], res[True][1])
                ok &= same
                ratios.append(res[False][0] / res[True][0])
            for cache in (False, True):
                t = statistics.median(times[cache])
                name = "cached" if cache else "uncached"
                nfe = statistics.mean(nfes[cache])
                print(f"{batch:>5} {name:>9} {t:>8.2f} {batch / t:>10.2f} {nfe:>8.1f} {str(same):>9}")
            print(
                f"{batch:>5} {'ratio':>9} uncached/cached time: median {statistics.median(ratios):.2f}x "
                f"(runs: {', '.join(f'{q:.2f}' for q in ratios)})"
            )
    if not ok:
        raise SystemExit("cached and uncached samples differ")


if __name__ == "__main__":
    main()
