"""Sample graphs from a ``graph.train`` run and evaluate them (GDSS's ``sampler.py``).

    python -m graph.sample --run outputs/graph/community_small
    python -m graph.sample --run outputs/graph/community_small --ema --num 100 --tag eval_ema100
    python -m graph.sample --run outputs/graph/community_small --solver s4 --snr 0.15 --scale-eps 0.7

Reads ``<run>/run.json`` (the run's model, data and sampler settings) and the newest checkpoint under
``<run>/checkpoints/`` (or ``--ckpt``), regenerates the data set from its seed, samples with the GDSS
solver and writes ``<run>/<tag>/``: ``metrics.json`` (MMDs against the test split for generic graphs,
the molecule metrics for molecules), ``samples.png``, ``test.png`` and ``samples.pt``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from core.engine.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from core.engine.config import to_schema
from core.engine.ema import decay_key

from .train import GDSSModel, GraphDataConfig, GraphModelConfig, GraphSamplerConfig, evaluate, load_data

__all__ = ["load_run", "main"]


def load_run(run: str | Path, ckpt: str | Path | None = None, ema: bool = False):
    """``(model, data config, sampler config, checkpoint step)`` of a run directory; the model in eval mode
    with the checkpoint's raw weights, or its first EMA shadow with ``ema=True``."""
    run = Path(run)
    info_path = run / "run.json"
    if not info_path.is_file():
        raise ValueError(f"{run} is not a graph.train run directory: {info_path} does not exist")
    info = json.loads(info_path.read_text())
    model_cfg = to_schema(info["model"], GraphModelConfig, "model")
    data_cfg = to_schema(info["data"], GraphDataConfig, "data")
    sampler = to_schema(info["sampler"], GraphSamplerConfig, "sampler")
    if ckpt is None:
        found = list_checkpoints(run / "checkpoints")
        if not found:
            raise ValueError(f"{run / 'checkpoints'} holds no checkpoint")
        ckpt = found[-1][1]
    state = load_checkpoint(ckpt)
    weights = state["model"]
    if ema:
        if not state.get("ema"):
            raise CheckpointError(f"{ckpt} holds no EMA weights")
        weights = state["ema"]["shadows"][decay_key(state["ema"]["decays"][0])]  # the first decay, as the engine
    model = GDSSModel(model_cfg, data_cfg.max_node_num, data_cfg.max_feat_num)
    model.load_state_dict(weights, strict=True)
    return model.eval(), data_cfg, sampler, int(state["step"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m graph.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="output directory of python -m graph.train")
    p.add_argument("--ckpt", default=None, help="checkpoint file (default: the run's newest)")
    p.add_argument("--ema", action="store_true", help="sample with the EMA weights (default: the run's setting)")
    p.add_argument("--raw", action="store_true", help="sample with the raw weights")
    p.add_argument("--num", type=int, default=None, help="graphs to generate (default: the run's setting)")
    p.add_argument("--solver", choices=("pc", "s4"), default=None)
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the SDE's num_scales)")
    p.add_argument("--snr", type=float, default=None)
    p.add_argument("--scale-eps", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--protocol", choices=("gdss", "spectre"), default=None)
    p.add_argument("--tag", default="sample", help="output folder name under the run directory")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.ema and a.raw:
        p.error("--ema and --raw exclude each other")
    torch.set_num_threads(a.threads)
    # Weights first: the run's sampler says which (GDSS's community-small samples with the raw ones).
    run_sampler = to_schema(json.loads((Path(a.run) / "run.json").read_text())["sampler"], GraphSamplerConfig,
                            "sampler") if (Path(a.run) / "run.json").is_file() else None
    use_ema = a.ema or (not a.raw and run_sampler is not None and run_sampler.use_ema)
    model, data_cfg, sampler, step = load_run(a.run, a.ckpt, ema=use_ema)
    changes = {k: v for k, v in {"num_samples": a.num, "solver": a.solver, "snr": a.snr, "scale_eps": a.scale_eps,
                                 "seed": a.seed, "protocol": a.protocol}.items() if v is not None}
    sampler = dataclasses.replace(sampler, use_ema=use_ema, **changes)
    try:
        sampler.validate()
    except ValueError as e:
        p.error(str(e))
    steps = a.steps or json.loads((Path(a.run) / "run.json").read_text())["model"]["sde_adj"]["num_scales"]
    if steps < 1:
        p.error(f"--steps must be >= 1, got {steps}")
    data = load_data(data_cfg)
    g = torch.Generator().manual_seed(sampler.seed)
    with torch.no_grad():
        metrics = evaluate(model, data, sampler, steps, Path(a.run), g, tag=a.tag)
    metrics.update({"checkpoint_step": step, "weights": "ema" if use_ema else "raw"})
    out = Path(a.run) / a.tag / "metrics.json"
    out.write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main()
