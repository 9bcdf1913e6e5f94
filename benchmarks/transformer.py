"""DiT training and sampling throughput on CPU: polydiff's DiT vs diffusers' DiTTransformer2DModel.

    python -m benchmarks.transformer [--config DiT-S/2] [--batch 8] [--steps 10]

Both models get the same configuration (depth, heads, head dim, 4 input and 8 output
channels as DiT with learned sigma, 32x32 latents, patch size, 1000 classes with label
dropout 0.1, adaLN-Zero), the same inputs and the same optimiser (AdamW, lr 1e-4,
PyTorch defaults). A training step is forward + MSE loss + backward + optimiser step in
train mode; sampling is one forward under ``torch.no_grad`` in eval mode.

Timing: both models live in one fresh process and their steps alternate (which one goes
first alternates too), so load from other work on the machine hits both alike. After
``--warmup`` untimed rounds, each model's step time is the median over ``--steps`` rounds,
and the speed ratio is the median of the per-round ratios.

Memory: each (library, mode) runs alone in its own fresh process (multiprocessing
"spawn") for a warmup step and two timed steps; peak memory is that process's
``ru_maxrss`` minus its high-water mark after imports and inputs, just before the model
is built (so it counts weights, gradients, optimiser state, activations and allocator
overhead, and not the libraries' import footprint).

What bounds the ratio: with identical architectures, the matrix multiplies and the SDPA
kernel are the same calls in both libraries and make up about 90% of a DiT-S/2 training
step on CPU (single-thread CPU time at batch 8: GEMMs 2.8 s and SDPA 0.5 s of a 3.5 s
step), so throughput can differ by a few percent only. The memory gap is structural:
diffusers keeps a copy of the timestep and label embedders in every block (39.8M vs
32.9M parameters, with their gradients and AdamW state) and makes more temporaries.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _build(library: str, config: str, input_size: int):
    import torch

    size, patch = config.removeprefix("DiT-").split("/")
    depth, hidden, heads = SIZES[size]
    torch.manual_seed(0)
    if library == "polydiff":
        from image.dit import DiT

        model = DiT.from_name(config, input_size=input_size, in_channels=4, num_classes=1000, class_dropout_prob=0.1)
        return model, lambda x, t, y: model(x, t, y)
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=4,
        out_channels=8,
        num_layers=depth,
        sample_size=input_size,
        patch_size=int(patch),
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )
    return model, lambda x, t, y: model(x, t, y).sample


def _setup(library: str, mode: str, args: dict):
    """Build one model and return (params, step function) for ``mode`` ("train" or "sample")."""
    import torch

    model, fn = _build(library, args["config"], args["input_size"])
    g = torch.Generator().manual_seed(0)
    B, S = args["batch"], args["input_size"]
    x = torch.randn(B, 4, S, S, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, 1000, (B,), generator=g)
    target = torch.randn(B, 8, S, S, generator=g)
    n_params = sum(p.numel() for p in model.parameters())
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = torch.nn.functional.mse_loss(fn(x, t, y), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                fn(x, t, y)

    return n_params, step


def _timing(args: dict) -> dict:
    """Both libraries in this process, steps interleaved; returns per-round step times."""
    import torch

    torch.set_num_threads(args["threads"])
    out = {}
    for mode in ("train", "sample"):
        steps = {lib: _setup(lib, mode, args)[1] for lib in LIBRARIES}
        times = {lib: [] for lib in LIBRARIES}
        for r in range(args["warmup"] + args["steps"]):
            for lib in LIBRARIES if r % 2 == 0 else LIBRARIES[::-1]:
                t0 = time.perf_counter()
                steps[lib]()
                if r >= args["warmup"]:
                    times[lib].append(time.perf_counter() - t0)
        out[mode] = times
        del steps
    return out


def _memory(library: str, mode: str, args: dict) -> dict:
    """One library and mode alone in this fresh process: peak RSS over its import baseline."""
    import torch

    torch.set_num_threads(args["threads"])
    # Import the model class first (diffusers imports lazily): code is not model memory.
    if library == "diffusers":
        from diffusers import DiTTransformer2DModel  # noqa: F401
    else:
        from image.dit import DiT  # noqa: F401
    base = _maxrss_mib()
    n_params, step = _setup(library, mode, args)
    for _ in range(3):
        step()
    return {"peak": _maxrss_mib() - base, "params": n_params}


LIBRARIES = ("polydiff", "diffusers")


def _spawn(fn, *a):
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, a)


def main(argv=None):
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="DiT-S/2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = vars(p.parse_args(argv))
    if args["config"].removeprefix("DiT-").split("/")[0] not in SIZES:
        raise ValueError(f"--config must be DiT-{{S,B,L,XL}}/{{2,4,8}}, got {args['config']!r}")

    times = _spawn(_timing, args)
    mem = {(lib, mode): _spawn(_memory, lib, mode, args) for mode in ("train", "sample") for lib in LIBRARIES}

    B = args["batch"]
    print(
        f"{args['config']}, batch {B}, {args['input_size']}x{args['input_size']}x4 latents, "
        f"{args['threads']} CPU threads, torch {torch.__version__}; median of {args['steps']} interleaved steps"
    )
    print(
        f"{'':10s} {'params':>8s} {'train samples/s':>16s} {'train peak MiB':>15s} "
        f"{'sample samples/s':>17s} {'sample peak MiB':>16s}"
    )
    for lib in LIBRARIES:
        tr, sa = statistics.median(times["train"][lib]), statistics.median(times["sample"][lib])
        print(
            f"{lib:10s} {mem[(lib, 'train')]['params'] / 1e6:7.2f}M {B / tr:16.2f} "
            f"{mem[(lib, 'train')]['peak']:15.0f} {B / sa:17.2f} {mem[(lib, 'sample')]['peak']:16.0f}"
        )

    def speed(mode):  # median over rounds of diffusers time / polydiff time
        return statistics.median(d / p for p, d in zip(times[mode]["polydiff"], times[mode]["diffusers"]))

    def memory(mode):
        return mem[("polydiff", mode)]["peak"] / mem[("diffusers", mode)]["peak"]

    print(
        f"{'ratio':10s} {'':8s} {speed('train'):15.2f}x {memory('train'):14.2f}x "
        f"{speed('sample'):16.2f}x {memory('sample'):15.2f}x"
    )
    print(
        "ratio: polydiff / diffusers; throughput (median of per-round ratios) higher is better, "
        "peak memory lower is better"
    )


if __name__ == "__main__":
    main()
