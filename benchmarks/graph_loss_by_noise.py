"""GDSS denoising loss by noise level: several QM9 (or other) models on the same molecules and noise (issue 6).

    python -m benchmarks.graph_loss_by_noise --run outputs/graph/qm9_cpu --run outputs/graph/qm9_gdss_cpu \\
        --official /tmp/gdss_ckpt/gdss_qm9.pth

Sample quality says whether training worked; this says where it did not. Every model gets the same
``--n`` training graphs of the first run's data (``train_idx[:n]``), the same diffusion times and the
same noise (generators seeded ``0 .. --repeats-1`` per time bin), and GDSS's loss
(:func:`graph.gdss.gdss_loss`, ``reduce_mean=False``: summed over entries, averaged over graphs) is
reported per network (x, adjacency) and per bin of ``t``, with ``t`` uniform inside the bin. The last row
is the whole range, which is the training objective. A model behind in the small-``t`` bins (little
noise) loses the fine structure that validity, novelty and FCD measure.

Models: ``--run DIR`` (a ``graph.train`` run: its EMA weights unless ``--raw``) and ``--official CKPT``
(a GDSS checkpoint as harryjo97/GDSS saves it: its raw weights, as GDSS samples them). Writes nothing;
prints a table (markdown with ``--markdown``).
"""

from __future__ import annotations

import argparse
import time

import torch

BINS = ((1e-5, 0.05), (0.05, 0.2), (0.2, 0.5), (0.5, 1.0), (1e-5, 1.0))


def loss_table(models: dict, x, adj, flags, repeats: int = 2, bins=BINS) -> dict:
    """``{model: [(loss_x, loss_adj) per bin]}``: each bin's times and noise drawn from generators seeded
    ``0 .. repeats-1``, the same for every model."""
    from graph.gdss import gdss_loss

    out: dict = {name: [] for name in models}
    with torch.no_grad():
        for lo, hi in bins:
            for name, m in models.items():
                lx = la = 0.0
                for seed in range(repeats):
                    g = torch.Generator().manual_seed(seed)
                    t = lo + (hi - lo) * torch.rand(x.shape[0], generator=g)
                    a, b = gdss_loss(m.model_x, m.model_adj, m.system, x, adj, flags, t=t, generator=g,
                                     reduce_mean=False)
                    lx, la = lx + a.item() / repeats, la + b.item() / repeats
                out[name].append((lx, la))
    return out


def main(argv: list[str] | None = None) -> dict:
    from graph.official import official_model
    from graph.sample import load_run
    from graph.train import load_data

    p = argparse.ArgumentParser(prog="python -m benchmarks.graph_loss_by_noise", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", default=[], help="graph.train run directory (repeatable)")
    p.add_argument("--official", action="append", default=[], help="official GDSS checkpoint (repeatable)")
    p.add_argument("--raw", action="store_true", help="runs' raw weights instead of their EMA weights")
    p.add_argument("--n", type=int, default=4096, help="training graphs scored (the first n of the split)")
    p.add_argument("--repeats", type=int, default=2, help="noise draws per bin")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args(argv)
    if not a.run:
        p.error("give at least one --run (its data config chooses the graphs)")
    if a.n < 1 or a.repeats < 1 or a.threads < 1:
        p.error(f"--n, --repeats and --threads must be positive, got {a.n}, {a.repeats}, {a.threads}")
    torch.set_num_threads(a.threads)
    models, data_cfg = {}, None
    for run in a.run:
        try:
            m, dcfg, _, step = load_run(run, ema=not a.raw)
        except ValueError as e:
            p.error(str(e))
        data_cfg = data_cfg or dcfg
        same = ("name", "max_node_num", "max_feat_num", "options")
        if any(getattr(dcfg, k) != getattr(data_cfg, k) for k in same):
            p.error(f"--run {run} was trained on other data ({dcfg.name}, {dcfg.max_node_num} nodes, options "
                    f"{dict(dcfg.options)}) than --run {a.run[0]} ({data_cfg.name}, {data_cfg.max_node_num} nodes, "
                    f"options {dict(data_cfg.options)}): the losses would not be comparable")
        models[f"{run.rstrip('/').split('/')[-1]}@{step}"] = m
    data = load_data(data_cfg)
    for ck in a.official:
        try:
            models[f"official:{ck.rstrip('/').split('/')[-1]}"] = official_model(
                ck, data_cfg.max_node_num, data_cfg.max_feat_num).eval()
        except ValueError as e:
            p.error(str(e))
    idx = data.train_idx[: a.n]
    t0 = time.perf_counter()
    table = loss_table(models, data.x[idx], data.adj[idx], data.flags[idx], a.repeats)
    names = list(models)
    if a.markdown:
        print("| t | " + " | ".join(f"{n} x / adj" for n in names) + " |")
        print("|---|" + "---|" * len(names))
    else:
        print("t".ljust(16) + "".join(n[:30].rjust(32) for n in names))
    for i, (lo, hi) in enumerate(BINS):
        label = f"[{lo:g}, {hi:g}]"
        cells = [f"{table[n][i][0]:.3f} / {table[n][i][1]:.3f}" for n in names]
        print(f"| {label} | " + " | ".join(cells) + " |" if a.markdown else label.ljust(16) + "".join(c.rjust(32) for c in cells))
    print(f"({len(idx)} graphs of {data.name}, {a.repeats} noise draws per bin, {time.perf_counter() - t0:.0f} s)")
    return {"bins": BINS, "losses": table, "n": len(idx)}


if __name__ == "__main__":
    main()
