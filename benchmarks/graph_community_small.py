"""Multi-seed community-small comparison for GDSS (Jo et al. 2022, seed 184; issue 6).

    python -m benchmarks.graph_community_small --run outputs/graph/community_small \\
        --official /tmp/gdss_ckpt/gdss_community_small.pth --seeds 10

GDSS's community-small protocol (its Table 1: degree / clustering / orbit MMD 0.045 / 0.086 / 0.007)
compares 20 generated graphs with the 20 test graphs. At that size the statistic is mostly noise, so one
sampling seed says little. This script repeats the protocol over ``K = --seeds`` independent sampling
seeds ``s = seed_start .. seed_start + K - 1`` and reports the spread:

- models: the run's raw weights (GDSS's community-small sampler uses the raw ones), the run's EMA weights,
  and the official GDSS checkpoint (``--official``, read with :func:`graph.official.official_model`),
  all through the run's sampler settings (PC, the run's steps, snr, scale_eps);
- chunk ``s`` of a model is exactly what ``python -m graph.sample --run RUN --seed s`` evaluates: a
  generator seeded with ``s`` draws the node counts and runs the solver (:func:`graph.train.sample_graphs`,
  :func:`graph.gdss.gdss_sample`), and the quantised graphs are scored against the test split with GDSS's
  kernels (:func:`graph.metrics.evaluate_graphs`);
- a "perfect generator" as the noise floor: chunk ``s`` is as many training graphs as the chunk holds
  (20 for community-small), drawn without replacement
  with a generator seeded with ``s`` (the training and test graphs come from the same distribution);
- per model and statistic: mean, standard deviation (ddof 1), standard error, median, min, max over the K
  chunks, and how many chunks are <= GDSS's published figure; and the MMD of the pooled K x 20 graphs
  against the test set (a lower-variance estimate; the biased V-statistic of :mod:`graph.metrics` shrinks
  with the sample size, so compare pooled figures only with the perfect generator's pooled figure, not
  with the published 20-graph numbers).

The name is historical: any generic-graph run works (ego-small from GDSS's pickle, grid, a user's graph
file); the published figures of :data:`PUBLISHED_BY_DATA` are shown where GDSS gives them for the run's data.

Sampler settings other than the run's (``--set snr=0.1 --set solver=s4``, :data:`SAMPLER_KEYS`) and the
training graphs as the reference (``--reference train``; the graphs the model was fitted on, a reference for
choosing sampler settings without looking at the test graphs; the perfect generator, drawn from the same
training graphs, is then left out) make the script a sampler sweep.

Writes ``<out>/results.json`` (every chunk's MMDs, the summaries, timings and load) and ``<out>/table.md``,
and prints the table. Wall and CPU time are measured per model (CPU time of this process: run it with one
thread, ``--threads 1``, the default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from tqdm import tqdm

from core.engine.checkpoint import atomic_write
from core.engine.config import to_schema
from graph.data import dense_to_networkx
from graph.metrics import evaluate_graphs
from graph.official import official_model  # re-exported: it lived here before graph.official
from graph.sample import load_run
from graph.train import (
    MOLECULE_DATASETS,
    GDSSModel,
    GraphData,
    GraphSamplerConfig,
    load_data,
    sample_graphs,
)
from graph.utils import quantize

__all__ = [
    "PUBLISHED",
    "PUBLISHED_BY_DATA",
    "STAT_NAMES",
    "official_model",
    "sample_chunks",
    "perfect_chunks",
    "chunk_mmds",
    "summarize",
    "paired_differences",
    "markdown_table",
    "run_benchmark",
    "parse_sampler_set",
    "SAMPLER_KEYS",
    "main",
]

# GDSS (Jo et al. 2022) Table 1: MMD of degree, clustering and orbit statistics, per data set. A run on
# other data (grid, planar, a user's graph file) is benchmarked the same way, without published figures.
PUBLISHED_BY_DATA = {"community_small": {"degree": 0.045, "cluster": 0.086, "orbit": 0.007},
                     "ego_small": {"degree": 0.021, "cluster": 0.024, "orbit": 0.007}}
PUBLISHED = PUBLISHED_BY_DATA["community_small"]
STAT_NAMES = {"degree": "degree", "cluster": "clustering", "orbit": "orbit"}
MODELS = ("raw", "ema", "official", "perfect")
REFERENCES = ("test", "train")
# GraphSamplerConfig fields a sweep may set (``--set KEY=VALUE``); the others are the benchmark's own (seed, sizes)
SAMPLER_KEYS = ("solver", "predictor", "corrector", "snr", "scale_eps", "n_steps", "noise_removal", "eps", "use_ema")
LABELS = {"raw": "polydiff, raw weights", "ema": "polydiff, EMA weights", "official": "official GDSS checkpoint",
          "perfect": "perfect generator (training graphs)"}


def sample_chunks(model: GDSSModel, data: GraphData, sampler: GraphSamplerConfig, steps: int, seeds: list[int],
                  size: int, progress: bool = True, desc: str = "") -> tuple[list[list[nx.Graph]], int]:
    """One chunk of ``size`` generated graphs per seed, each drawn as ``graph.sample --seed s`` draws it (a
    generator seeded with ``s``, node counts from the training graphs, the GDSS solver). Returns the chunks
    (networkx, adjacency quantised at 0.5) and the NFE per chunk."""
    train_flags = data.flags[data.train_idx]
    chunks, nfe = [], 0
    for s in tqdm(seeds, desc=desc or "chunks", disable=None if progress else True):
        g = torch.Generator().manual_seed(int(s))
        with torch.no_grad():
            _, adj, flags, nfe = sample_graphs(model, sampler, steps, train_flags, size, g, progress=progress)
        chunks.append(dense_to_networkx(quantize(adj), flags))
    return chunks, nfe


def perfect_chunks(pool: list[nx.Graph], seeds: list[int], size: int) -> list[list[nx.Graph]]:
    """The perfect generator's chunks: ``size`` graphs of ``pool`` drawn without replacement per seed."""
    if not 1 <= size <= len(pool):
        raise ValueError(f"chunk size {size} must lie in [1, {len(pool)}] (the pool's graphs)")
    out = []
    for s in seeds:
        idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(s)))[:size]
        out.append([pool[i] for i in idx.tolist()])
    return out


def chunk_mmds(ref: list[nx.Graph], chunks: list[list[nx.Graph]], protocol: str = "gdss") -> tuple[list[dict], dict]:
    """``(per-chunk MMDs, MMD of the pooled chunks)`` against ``ref`` with :func:`graph.metrics.evaluate_graphs`."""
    if not chunks:
        raise ValueError("no chunks to evaluate")
    per = [evaluate_graphs(ref, c, protocol=protocol) for c in chunks]
    pooled = evaluate_graphs(ref, [g for c in chunks for g in c], protocol=protocol)
    return per, pooled


def summarize(per_chunk: list[dict], pooled: dict, published: dict[str, float] = PUBLISHED) -> dict:
    """Mean, standard deviation (ddof 1; 0 for one chunk), standard error, median, min, max over the chunks
    and the count of chunks ``<=`` the published figure, per statistic; with the pooled MMD."""
    out: dict[str, Any] = {}
    k = len(per_chunk)
    for stat in per_chunk[0]:
        v = np.array([c[stat] for c in per_chunk], dtype=float)
        std = float(v.std(ddof=1)) if k > 1 else 0.0
        out[stat] = {"mean": float(v.mean()), "std": std, "sem": std / math.sqrt(k), "median": float(np.median(v)),
                     "min": float(v.min()), "max": float(v.max()), "values": v.tolist(), "pooled": pooled[stat]}
        if stat in published:
            out[stat]["published"] = published[stat]
            out[stat]["n_le_published"] = int((v <= published[stat]).sum())
    out["chunks"] = k
    return out


def paired_differences(results: dict) -> dict:
    """Paired differences between the sampled models, chunk by chunk. The chunks of one seed share the node
    counts and, for networks of one architecture, the prior noise (the generator is consumed identically),
    so the paired difference has less variance than the difference of the two means. For each pair
    ``"a-b"`` and statistic: mean and standard error of ``a - b`` and the chunks where ``a`` is lower."""
    names = [n for n in ("raw", "ema", "official") if n in results["models"]]
    out: dict[str, Any] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pair = {}
            for stat in STAT_NAMES:
                va = np.array(results["models"][a]["summary"][stat]["values"])
                vb = np.array(results["models"][b]["summary"][stat]["values"])
                d = va - vb
                se = float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else 0.0
                pair[stat] = {"mean": float(d.mean()), "sem": se, "a_lower": int((d < 0).sum()), "chunks": len(d)}
            out[f"{a}-{b}"] = pair
    return out


def markdown_table(results: dict) -> str:
    """Two markdown tables: the per-chunk summaries (mean +- sd (se), chunks <= GDSS) and the pooled MMDs."""
    models = results["models"]
    stats = [s for s in STAT_NAMES if all(s in m["summary"] for m in models.values())]
    k = results["seeds"]
    published = results.get("published", PUBLISHED)  # older result files: community-small's
    head = "| model | " + " | ".join(f"{STAT_NAMES[s]}: mean ± sd (se) | ≤ {published.get(s, '(none)')}"
                                    for s in stats) + " |"
    ref = results.get("reference", "test")
    changed = "".join(f", {k}={v}" for k, v in results.get("sampler_set", {}).items())
    lines = [f"MMD of {results['chunk_size']} graphs against the {results.get('reference_graphs', results['test_graphs'])} "
             f"{ref} graphs, "
             f"{k} sampling seeds {results['seed_start']}..{results['seed_start'] + k - 1} "
             f"({results['protocol']} protocol, {results['steps']} steps{changed}):", "", head,
             "|---|" + "---|---|" * len(stats)]
    if published:
        lines.append("| GDSS published (one seed) | " + " | ".join(f"{published.get(s, '')} | " for s in stats) + " |")
    for name, m in models.items():
        cells = []
        for s in stats:
            q = m["summary"][s]
            le = f"{q['n_le_published']}/{k}" if "n_le_published" in q else ""
            cells.append(f"{q['mean']:.4f} ± {q['std']:.4f} ({q['sem']:.4f}) | {le}")
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines += ["", f"Pooled: MMD of all {k} x {results['chunk_size']} graphs against the {ref} graphs:", "",
              "| model | " + " | ".join(STAT_NAMES[s] for s in stats) + " |", "|---|" + "---|" * len(stats)]
    for name, m in models.items():
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(f"{m['summary'][s]['pooled']:.4f}" for s in stats)
                     + " |")
    paired = paired_differences(results)
    if paired:
        lines += ["", "Paired differences a - b over the same seeds: mean ± se (chunks where a is lower):", "",
                  "| a - b | " + " | ".join(STAT_NAMES[s] for s in stats) + " |", "|---|" + "---|" * len(stats)]
        for pair, d in paired.items():
            a, b = pair.split("-")
            lines.append(f"| {a} - {b} | " + " | ".join(
                f"{d[s]['mean']:+.4f} ± {d[s]['sem']:.4f} ({d[s]['a_lower']}/{d[s]['chunks']})" for s in stats) + " |")
    lines += ["", "| model | wall s | CPU s | NFE per chunk | load average (start, end) |", "|---|---|---|---|---|"]
    for name, m in models.items():
        lines.append(f"| {LABELS.get(name, name)} | {m['wall_seconds']:.1f} | {m['cpu_seconds']:.1f} | {m['nfe']} | "
                     f"{m['load_start']:.2f}, {m['load_end']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_sampler_set(items: list[str]) -> dict[str, Any]:
    """``["snr=0.1", "solver=s4"]`` -> ``{"snr": 0.1, "solver": "s4"}`` for :data:`SAMPLER_KEYS`, the values read
    as graph.train's command line reads them (the typed sampler schema); a ValueError names an unknown key or an
    unreadable value."""
    raw: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in SAMPLER_KEYS:
            raise ValueError(f"sampler setting {item!r}: expected KEY=VALUE with KEY one of {list(SAMPLER_KEYS)}")
        raw[key] = value
    if not raw:
        return {}
    typed = to_schema(raw, GraphSamplerConfig, "sampler")
    return {k: getattr(typed, k) for k in raw}


def run_benchmark(run: str | Path, official: str | Path | None = None, seeds: int = 10, seed_start: int = 0,
                  models: tuple[str, ...] = MODELS, steps: int | None = None, chunk_size: int | None = None,
                  out: str | Path | None = None, progress: bool = True, sampler_set: dict[str, Any] | None = None,
                  reference: str = "test") -> dict:
    """Sample and score ``seeds`` chunks per model (see the module docstring); write ``results.json`` and
    ``table.md`` to ``out`` when given and return the results. ``sampler_set`` overrides the run's sampler
    settings (:data:`SAMPLER_KEYS`); ``reference`` is ``"test"`` (GDSS's protocol) or ``"train"``."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {list(REFERENCES)}, got {reference!r}")
    if reference == "train" and "perfect" in models:
        raise ValueError("the perfect generator draws training graphs; with reference='train' it would score the "
                         "training graphs against themselves: leave 'perfect' out of models")
    unknown_keys = set(sampler_set or {}) - set(SAMPLER_KEYS)
    if unknown_keys:
        raise ValueError(f"sampler_set: unknown {sorted(unknown_keys)}; choose from {sorted(SAMPLER_KEYS)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds!r}")
    unknown = set(models) - set(MODELS)
    if unknown or not models:
        raise ValueError(f"models must be a non-empty subset of {list(MODELS)}, got {list(models)}")
    if "official" in models and official is None:
        raise ValueError("model 'official' needs the path of the official checkpoint (official=...)")
    raw, data_cfg, sampler, ckpt_step = load_run(run)
    if data_cfg.name in MOLECULE_DATASETS:
        raise ValueError(f"the run {run} is on molecules ({data_cfg.name!r}); this benchmark scores generic graphs")
    run_info = json.loads((Path(run) / "run.json").read_text())
    steps = int(steps or run_info["model"]["sde_adj"]["num_scales"])
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if sampler_set:  # typed and checked by the sampler schema, as on the command line ("0.1" -> 0.1)
        sampler = to_schema({**dataclasses.asdict(sampler), **sampler_set}, GraphSamplerConfig, "sampler")
    sampler.validate()
    data = load_data(data_cfg)
    ref = list(data.test_graphs) if reference == "test" else _train_graphs(data)
    size = int(chunk_size or len(data.test_graphs))
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size!r}")
    # A chunk is sampled in one solver call (as graph.sample does with num_samples <= batch_size).
    sampler = dataclasses.replace(sampler, num_samples=size, batch_size=max(sampler.batch_size, size))
    seed_list = list(range(seed_start, seed_start + seeds))
    results: dict[str, Any] = {
        "run": str(run), "checkpoint_step": ckpt_step, "official": None if official is None else str(official),
        "data": data.name, "test_graphs": len(ref), "chunk_size": size, "seeds": seeds, "seed_start": seed_start,
        "protocol": sampler.protocol, "steps": steps, "sampler": dataclasses.asdict(sampler),
        "sampler_set": dict(sampler_set or {}), "reference": reference, "reference_graphs": len(ref),
        "published": PUBLISHED_BY_DATA.get(data.name, {}), "threads": torch.get_num_threads(), "models": {},
    }
    for name in models:
        load0, wall0, cpu0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
        nfe = 0
        if name == "perfect":
            chunks = perfect_chunks(_train_graphs(data), seed_list, size)
        else:
            if name == "raw":
                model = raw
            elif name == "ema":
                model = load_run(run, ema=True)[0]
            else:
                model = official_model(official, data_cfg.max_node_num, data_cfg.max_feat_num)
            chunks, nfe = sample_chunks(model, data, sampler, steps, seed_list, size, progress, desc=name)
        per, pooled = chunk_mmds(ref, chunks, sampler.protocol)
        results["models"][name] = {
            "per_chunk": [{"seed": s, **m} for s, m in zip(seed_list, per)],
            "summary": summarize(per, pooled, results["published"]),
            "nfe": nfe, "wall_seconds": time.perf_counter() - wall0, "cpu_seconds": time.process_time() - cpu0,
            "load_start": load0, "load_end": os.getloadavg()[0],
        }
        if out is not None:  # written after each model: a long job that stops keeps what it measured
            _write(results, Path(out))
    return results


def _train_graphs(data: GraphData) -> list[nx.Graph]:
    """The training graphs as networkx graphs (from the dense data, so exactly what the model was fitted on)."""
    i = data.train_idx
    return dense_to_networkx(data.adj[i], data.flags[i])


def _write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["paired"] = paired_differences(results)
    atomic_write(out / "results.json", lambda f: f.write(json.dumps(results, indent=1).encode()))
    table = markdown_table(results)
    atomic_write(out / "table.md", lambda f: f.write(table.encode()))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.graph_community_small",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="output directory of python -m graph.train (data=community_small, ego_small, ...)")
    p.add_argument("--official", default=None, help="official GDSS checkpoint (gdss_community_small.pth)")
    p.add_argument("--seeds", type=int, default=10, help="K: sampling seeds (chunks) per model")
    p.add_argument("--seed-start", type=int, default=0, help="first sampling seed (seeds seed_start..+K-1)")
    p.add_argument("--models", default=None,
                   help=f"comma-separated subset of {','.join(MODELS)} (default: all; 'official' only with --official)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default: the run's num_scales)")
    p.add_argument("--chunk-size", type=int, default=None, help="graphs per chunk (default: the test graphs)")
    p.add_argument("--out", default="outputs/graph/community_small_seeds", help="output folder")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"a sampler setting other than the run's, repeatable; KEY one of {', '.join(SAMPLER_KEYS)}")
    p.add_argument("--reference", choices=REFERENCES, default="test",
                   help="score against the test graphs (GDSS's protocol) or the training graphs (for choosing sampler "
                        "settings without the test graphs; leaves the perfect generator out)")
    a = p.parse_args(argv)
    try:
        sampler_set = parse_sampler_set(a.set)
    except ValueError as e:
        p.error(f"--set: {e}")
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    if a.models is None:
        models = tuple(m for m in MODELS if (m != "official" or a.official is not None)
                       and (m != "perfect" or a.reference == "test"))
    else:
        models = tuple(m.strip() for m in a.models.split(",") if m.strip())
        bad = [m for m in models if m not in MODELS]
        if bad:
            p.error(f"--models: unknown {bad}; choose from {list(MODELS)}")
        if "official" in models and a.official is None:
            p.error("--models official needs --official PATH")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    torch.set_num_threads(a.threads)
    results = run_benchmark(a.run, a.official, a.seeds, a.seed_start, models, a.steps, a.chunk_size, a.out,
                            sampler_set=sampler_set, reference=a.reference)
    print(markdown_table(results), flush=True)
    print(f"wrote {Path(a.out) / 'results.json'} and {Path(a.out) / 'table.md'}", flush=True)
    return results


if __name__ == "__main__":
    main()
