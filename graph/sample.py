"""Sample graphs from a ``graph.train`` run or an official GDSS checkpoint and evaluate them (GDSS's ``sampler.py``).

    python -m graph.sample --run outputs/graph/community_small
    python -m graph.sample --run outputs/graph/community_small --ema --num 100 --tag eval_ema100
    python -m graph.sample --run outputs/graph/community_small --solver s4 --snr 0.15 --scale-eps 0.7
    python -m graph.sample --official gdss_community_small.pth --data community_small
    python -m graph.sample --official gdss_qm9.pth --data qm9 --solver s4 data.options.split_file=valid_idx_qm9.json

``--run``: reads ``<run>/run.json`` (the run's model, data and sampler settings) and the newest checkpoint
under ``<run>/checkpoints/`` (or ``--ckpt``), regenerates the data set from its seed, samples with the GDSS
solver and writes ``<run>/<tag>/``: ``metrics.json`` (MMDs against the test split for generic graphs,
the molecule metrics for molecules) and ``samples.pt``; generic graphs also get ``samples.png``, ``test.png``
and ``samples.g6`` (graph6), molecule data ``smiles.txt`` (``SMILES sample_<i>`` a line), ``molecules.sdf`` and
``grid.png``.

``--official CKPT --data NAME``: a checkpoint as the official GDSS code saves it
(``checkpoints/<data>/gdss_<data>.pth``, read ``weights_only`` by :func:`graph.official.load_official`:
architecture and SDEs from the checkpoint's own config) sampled for the data config ``NAME``, the
``configs/graph/data/NAME.yaml`` that ``python -m graph.train data=NAME`` uses, with the sampler config of
the same name where there is one (``configs/graph/sampler/NAME.yaml``: GDSS's sampler settings for
community-small and QM9; else ``--sampler``'s, by default community-small's). Trailing
``data.KEY=VALUE`` / ``sampler.KEY=VALUE`` arguments override those configs as on graph.train's command
line. The checkpoint's graph sizes must equal the data's ``max_node_num`` / ``max_feat_num``; steps default
to the checkpoint's ``num_scales`` (GDSS: 1000). Writes the same files to ``<out>/<tag>/``
(``--out``, default ``outputs/graph/official_<NAME>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from core.engine.checkpoint import (
    CheckpointError,
    atomic_write,
    list_checkpoints,
    load_checkpoint,
    read_run_json,
    state_dict_misfit,
)
from core.engine.config import ConfigError, to_schema, typed_group
from core.engine.ema import decay_key

from .official import load_official
from .train import GDSSModel, GraphDataConfig, GraphModelConfig, GraphSamplerConfig, evaluate, load_data

__all__ = ["read_run", "load_run", "official_configs", "main"]

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "graph"


def read_run(run: str | Path) -> tuple[dict, GraphModelConfig, GraphDataConfig, GraphSamplerConfig]:
    """``(run.json, model, data and sampler configs)`` of a ``graph.train`` run directory; ValueError saying
    so when it is not one (no run.json, or another entry point's: text.train, image.train, ...)."""
    run = Path(run)
    info = read_run_json(run, "graph.train", ("model", "data", "sampler"))
    try:
        configs = (to_schema(info["model"], GraphModelConfig, "model"), to_schema(info["data"], GraphDataConfig, "data"),
                   to_schema(info["sampler"], GraphSamplerConfig, "sampler"))
    except ConfigError as e:
        raise ValueError(f"{run} is not a graph.train run: its run.json's settings are not GDSS's ({e})") from None
    return (info, *configs)


def load_run(run: str | Path, ckpt: str | Path | None = None, ema: bool = False):
    """``(model, data config, sampler config, checkpoint step)`` of a run directory; the model in eval mode
    with the checkpoint's raw weights, or its first EMA shadow with ``ema=True``. A checkpoint whose weights
    do not fit the run's model (another run's, another domain's) is a CheckpointError naming it."""
    run = Path(run)
    _, model_cfg, data_cfg, sampler = read_run(run)
    if ckpt is None:
        found = list_checkpoints(run / "checkpoints")
        if not found:
            raise ValueError(f"{run / 'checkpoints'} holds no checkpoint")
        ckpt = found[-1][1]
    state = load_checkpoint(ckpt)
    if not isinstance(state.get("model"), dict) or "step" not in state:
        raise CheckpointError(f"{ckpt} holds no model weights and step: not a checkpoint of the engine's Trainer")
    weights = state["model"]
    if ema:
        if not state.get("ema"):
            raise CheckpointError(f"{ckpt} holds no EMA weights")
        weights = state["ema"]["shadows"][decay_key(state["ema"]["decays"][0])]  # the first decay, as the engine
    model = GDSSModel(model_cfg, data_cfg.max_node_num, data_cfg.max_feat_num)
    misfit = state_dict_misfit(model.state_dict(), weights)
    if misfit:  # load_state_dict's RuntimeError before: another run's model, another domain's checkpoint
        raise CheckpointError(f"{ckpt} does not fit the model of {run}'s run.json (graph.train, GDSS): {misfit}")
    model.load_state_dict(weights, strict=True)
    return model.eval(), data_cfg, sampler, int(state["step"])


def _group_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def official_configs(data: str, sampler: str | None = None,
                     overrides: Sequence[str] = ()) -> tuple[GraphDataConfig, GraphSamplerConfig, str]:
    """``(data config, sampler config, sampler name)`` that ``python -m graph.train data=<data>
    sampler=<sampler> <overrides>`` would use (the same config groups, composed by Hydra and checked against
    their schemas), for sampling an official checkpoint. ``sampler`` defaults to the data's own sampler
    config where ``configs/graph/sampler/<data>.yaml`` exists, else ``community_small`` (graph.train's
    default). ``overrides``: ``data.KEY=VALUE`` / ``sampler.KEY=VALUE`` only. Raises
    :class:`~core.engine.config.ConfigError` naming a bad name, key or value."""
    datas, samplers = _group_names("data"), _group_names("sampler")
    if data not in datas:
        raise ConfigError(f"--data {data!r} is not a data config (configs/graph/data/); choose one of {datas}")
    if sampler is None:
        sampler = data if data in samplers else "community_small"
    elif sampler not in samplers:
        raise ConfigError(f"--sampler {sampler!r} is not a sampler config (configs/graph/sampler/); choose one of "
                          f"{samplers}")
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" not in o or not key.startswith(("data.", "sampler.")):
            raise ConfigError(f"override {o!r}: only data.KEY=VALUE and sampler.KEY=VALUE apply to an official "
                              f"checkpoint (its model comes from the checkpoint)")
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("config", overrides=[f"data={data}", f"sampler={sampler}", *overrides])
    except Exception as e:  # Hydra's override grammar and composition errors: keep their message
        raise ConfigError(f"data={data} sampler={sampler} with overrides {list(overrides)}: {e}") from None
    data_cfg, sampler_cfg = typed_group(cfg, "data"), typed_group(cfg, "sampler")
    try:
        data_cfg.validate()
        sampler_cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return data_cfg, sampler_cfg, sampler


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m graph.sample", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="output directory of python -m graph.train")
    source.add_argument("--official", metavar="CKPT",
                        help="official GDSS checkpoint (.pth as harryjo97/GDSS saves it, e.g. gdss_qm9.pth); needs --data")
    p.add_argument("--data", default=None,
                   help=f"with --official: the data config, as graph.train data=NAME: {_group_names('data')}")
    p.add_argument("--sampler", default=None,
                   help="with --official: the sampler config (default: the data's own where it exists, else "
                        f"community_small): {_group_names('sampler')}")
    p.add_argument("--out", default=None, help="with --official: output folder (default outputs/graph/official_<data>)")
    p.add_argument("--ckpt", default=None, help="with --run: checkpoint file (default: the run's newest)")
    p.add_argument("--ema", action="store_true", help="sample with the EMA weights (default: the sampler's setting)")
    p.add_argument("--raw", action="store_true", help="sample with the raw weights")
    p.add_argument("--num", type=int, default=None, help="graphs to generate (default: the sampler's setting)")
    p.add_argument("--solver", choices=("pc", "s4"), default=None)
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the SDE's num_scales)")
    p.add_argument("--snr", type=float, default=None)
    p.add_argument("--scale-eps", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--protocol", choices=("gdss", "spectre"), default=None)
    p.add_argument("--tag", default="sample", help="output folder name under the run directory (or --out)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE | sampler.KEY=VALUE",
                   help="with --official: overrides of the data and sampler configs, as on graph.train's command line")
    a = p.parse_intermixed_args(argv)
    if a.ema and a.raw:
        p.error("--ema and --raw exclude each other")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.run is not None:
        extra = [f for f, v in (("--data", a.data), ("--sampler", a.sampler), ("--out", a.out)) if v is not None]
        if a.overrides:
            extra.append(f"overrides {a.overrides}")
        if extra:
            p.error(f"{', '.join(extra)} only apply with --official (a run's data and sampler come from its run.json)")
    else:
        if a.ckpt is not None:
            p.error("--ckpt applies to --run; with --official the checkpoint is --official's")
        if a.data is None:
            p.error(f"--official needs --data NAME, the data to sample for: one of {_group_names('data')}")
    for flag, value, ok, rule in (("--num", a.num, lambda v: v >= 1, ">= 1"), ("--snr", a.snr, lambda v: v > 0, "> 0"),
                                  ("--scale-eps", a.scale_eps, lambda v: v >= 0, ">= 0"),
                                  ("--steps", a.steps, lambda v: v >= 1, ">= 1")):
        if value is not None and not ok(value):  # named as the user typed it, not as the config key it sets
            p.error(f"{flag} must be {rule}, got {value}")
    torch.set_num_threads(a.threads)
    info: dict = {}
    if a.run is not None:
        # Weights first: the run's sampler says which (GDSS's community-small samples with the raw ones).
        try:
            _, run_model, _, run_sampler = read_run(a.run)
            use_ema = a.ema or (not a.raw and run_sampler.use_ema)
            model, data_cfg, sampler, step = load_run(a.run, a.ckpt, ema=use_ema)
        except (ValueError, CheckpointError) as e:
            p.error(str(e))
        num_scales = run_model.sde_adj.num_scales
        out_dir = Path(a.run)
        info["checkpoint_step"] = step
    else:
        try:
            data_cfg, sampler, sampler_name = official_configs(a.data, a.sampler, a.overrides)
            use_ema = a.ema or (not a.raw and sampler.use_ema)
            # The model before the data: a checkpoint of other sizes fails before QM9 / MOSES are encoded.
            model, model_cfg = load_official(a.official, data_cfg.max_node_num, data_cfg.max_feat_num, ema=use_ema)
            # a null size in the data config is the checkpoint's (the data must fit it)
            data_cfg = dataclasses.replace(data_cfg, max_node_num=model.max_node_num, max_feat_num=model.max_feat_num)
        except ValueError as e:
            p.error(str(e))
        num_scales = model_cfg.sde_adj.num_scales
        out_dir = Path(a.out or f"outputs/graph/official_{a.data}")
        info.update(checkpoint=str(a.official), data_config=a.data, sampler_config=sampler_name)
    changes = {k: v for k, v in {"num_samples": a.num, "solver": a.solver, "snr": a.snr, "scale_eps": a.scale_eps,
                                 "seed": a.seed, "protocol": a.protocol}.items() if v is not None}
    sampler = dataclasses.replace(sampler, use_ema=use_ema, **changes)
    try:
        sampler.validate()
    except ValueError as e:
        p.error(str(e))
    steps = a.steps if a.steps is not None else num_scales
    try:
        data = load_data(data_cfg)
    except ValueError as e:  # e.g. graphs larger than data.max_node_num, a missing SMILES file
        p.error(str(e))
    g = torch.Generator().manual_seed(sampler.seed)
    with torch.no_grad():
        metrics = evaluate(model, data, sampler, steps, out_dir, g, tag=a.tag)
    metrics.update({**info, "weights": "ema" if use_ema else "raw"})
    atomic_write(out_dir / a.tag / "metrics.json", lambda f: f.write(json.dumps(metrics, indent=1).encode()))
    print(json.dumps(metrics), flush=True)
    return metrics


if __name__ == "__main__":
    main()
