"""Molecule generation metrics of GDSS (Jo et al. 2022, seed 184, Table 3) and a sampling command.

- validity without correction: the fraction of samples that RDKit sanitises as decoded (GDSS
  ``gen_mol``'s ``num_no_correct``); validity: the fraction giving a non-empty molecule after the
  GDSS/MoFlow valency correction; uniqueness: distinct canonical SMILES among the valid ones;
  novelty: the fraction of those not in the training set (MOSES ``novelty``);
- NSPDK MMD (Costa & De Grave 2010, "Fast neighborhood subgraph pairwise distance kernel"): GDSS
  vectorises molecules with EDeN (``complexity=4``: radius ``r`` and distance ``d`` up to 4, 2^16 hashed
  features, per-(r, d) then global L2 normalisation, linear kernel) and reports
  ``mean K(X,X) + mean K(Y,Y) - 2 mean K(X,Y)``. EDeN is not installed: :func:`nspdk_features` is a
  NumPy/networkx re-implementation of its discrete vectoriser with a deterministic hash (EDeN uses
  Python's ``hash``, so its feature indices change between processes; the kernel values do not,
  up to collisions). With a linear kernel that MMD is exactly ``|mean phi(X) - mean phi(Y)|^2``.
- FCD (Preuer et al. 2018) with ``fcd_torch`` and the ChemNet weights it ships, against the test set
  (MOSES ``FCD/Test``, which GDSS reports).

``python -m graph.mol_metrics --checkpoint gdss_qm9.pth`` samples a GDSS checkpoint on QM9 and
writes the metrics, SMILES, SDF and a molecule grid to ``--out``/``--tag``: it is ``python -m graph.sample
--official gdss_qm9.pth --data qm9`` under older argument names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rdkit import Chem

from core.engine.checkpoint import atomic_write_text, save_checkpoint

from .molecules import (
    MOSES_ATOMS,
    QM9_ATOMS,
    ZINC250K_ATOMS,
    canonical_smiles,
    decode_molecules,
    draw_grid,
    mols_to_nx,
    write_sdf,
    write_smiles,
)

__all__ = [
    "validity_uniqueness_novelty",
    "nspdk_features",
    "nspdk_mean_embedding",
    "nspdk_mmd",
    "fcd_stats",
    "fcd",
    "evaluate_molecules",
    "stats_cache",
]

_M64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A deterministic 64-bit hash of a tuple of integers (splitmix64 steps)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _M64)) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h


_LABEL_CACHE: dict = {}


def _label_hash(label) -> int:
    if label not in _LABEL_CACHE:
        _LABEL_CACHE[label] = int.from_bytes(hashlib.blake2b(repr(label).encode(), digest_size=8).digest(), "little")
    return _LABEL_CACHE[label]


def _as_graph(g):
    if isinstance(g, Chem.Mol):
        return mols_to_nx([g])[0]
    return g


def _graph_features(g, r: int, d: int, bitmask: int) -> dict[int, float]:
    """EDeN's discrete NSPDK features of one labelled graph (``Vectorizer._transform``).

    Each edge becomes a vertex carrying the edge label (so graph distances double); a vertex's
    neighbourhood of radius ``rho`` is hashed from the sorted (label, degree) hashes of each BFS layer
    up to ``2 rho``; every pair of atoms at distance ``2 delta <= 2d`` gives, for ``rho <= r``, the feature
    (both neighbourhood hashes, rho, delta) and the "half" feature (the second neighbourhood alone).
    """
    nodes = list(g.nodes())
    if not nodes:
        raise ValueError("NSPDK features of an empty graph are undefined (GDSS drops empty samples)")
    index = {v: i for i, v in enumerate(nodes)}
    n = len(nodes)
    labels = [_label_hash(g.nodes[v].get("label")) for v in nodes]
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for u, v, data in g.edges(data=True):
        if u == v:
            continue
        e = len(labels)
        labels.append(_label_hash(data.get("label")))
        nbrs.append([index[u], index[v]])
        nbrs[index[u]].append(e)
        nbrs[index[v]].append(e)
    vhash = [_mix(lab, len(nb)) for lab, nb in zip(labels, nbrs)]
    depth = 2 * max(r, d)
    layers, nhash = [], []
    for root in range(n):
        seen, layer, out = {root}, [root], []
        while layer and len(out) <= depth:
            out.append(layer)
            nxt = []
            for u in layer:
                for w in nbrs[u]:
                    if w not in seen:
                        seen.add(w)
                        nxt.append(w)
            layer = nxt
        layers.append(out)
        running, hashes = 0xAAAAAAAA, []
        for k, lay in enumerate(out):
            running = _mix(running, _mix(*sorted(vhash[v] for v in lay)), k)
            hashes.append(running)
        nhash.append(hashes)
    buckets: dict = defaultdict(lambda: defaultdict(float))
    for v in range(n):
        for dist in range(0, 2 * d + 1, 2):
            if dist >= len(layers[v]):
                break
            for u in layers[v][dist]:
                if u >= n:
                    continue
                for rad in range(0, 2 * r + 1, 2):
                    if rad >= len(nhash[v]) or rad >= len(nhash[u]):
                        continue
                    hv, hu = nhash[v][rad], nhash[u][rad]
                    lo, hi = (hv, hu) if hv < hu else (hu, hv)
                    b = buckets[(rad, dist)]
                    b[(_mix(lo, hi, rad, dist) & bitmask) + 1] += 1.0
                    b[(_mix(hu, rad, dist) & bitmask) + 1] += 1.0
    feats: dict[int, float] = defaultdict(float)
    for b in buckets.values():
        norm = np.sqrt(sum(c * c for c in b.values()))
        for k, c in b.items():
            feats[k] += c / norm
    total = np.sqrt(sum(c * c for c in feats.values()))
    return {k: c / total for k, c in feats.items()}


def nspdk_features(graphs: Sequence, r: int = 4, d: int = 4, nbits: int = 16):
    """NSPDK feature vectors, a scipy CSR matrix ``(len(graphs), 2^nbits + 2)`` of unit rows.

    ``graphs``: networkx graphs with node and edge attribute ``label`` (:func:`graph.molecules.mols_to_nx`)
    or RDKit molecules. ``r = d = 4`` and ``nbits = 16`` are EDeN's ``vectorize(complexity=4)`` as GDSS calls it.
    """
    from scipy.sparse import csr_matrix

    for name, v in (("r", r), ("d", d), ("nbits", nbits)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (name == "nbits" and not 1 <= v <= 30):
            raise ValueError(f"{name} must be a non-negative integer (nbits 1-30), got {v!r}")
    bitmask = (1 << nbits) - 1
    rows, cols, vals = [], [], []
    for i, g in enumerate(graphs):
        for k, c in _graph_features(_as_graph(g), r, d, bitmask).items():
            rows.append(i)
            cols.append(k)
            vals.append(c)
    return csr_matrix((vals, (rows, cols)), shape=(len(graphs), bitmask + 2), dtype=np.float64)


def nspdk_mean_embedding(graphs: Sequence, **options) -> np.ndarray:
    """The mean NSPDK feature vector of a set of graphs (empty graphs dropped, as GDSS does)."""
    graphs = [_as_graph(g) for g in graphs]
    graphs = [g for g in graphs if g.number_of_nodes() > 0]
    if not graphs:
        raise ValueError("NSPDK MMD needs at least one non-empty graph")
    return np.asarray(nspdk_features(graphs, **options).mean(axis=0)).ravel()


def nspdk_mmd(graphs_x: Sequence | np.ndarray, graphs_y: Sequence | np.ndarray, **options) -> float:
    """GDSS's NSPDK MMD ``mean K_XX + mean K_YY - 2 mean K_XY`` with the linear kernel on the
    normalised NSPDK features, computed as ``|mean phi(X) - mean phi(Y)|^2`` (the same number).
    Either argument may be a precomputed :func:`nspdk_mean_embedding`."""
    mx = graphs_x if isinstance(graphs_x, np.ndarray) else nspdk_mean_embedding(graphs_x, **options)
    my = graphs_y if isinstance(graphs_y, np.ndarray) else nspdk_mean_embedding(graphs_y, **options)
    return float(np.sum((mx - my) ** 2))


# ------------------------------------------------------------------------------------------- FCD

_FCD_MODELS: dict = {}


def _fcd_model(batch_size: int = 128):
    from fcd_torch import FCD

    if batch_size not in _FCD_MODELS:
        _FCD_MODELS[batch_size] = FCD(device="cpu", n_jobs=1, batch_size=batch_size)
    return _FCD_MODELS[batch_size]


def fcd_stats(smiles: Sequence[str], batch_size: int = 128) -> dict:
    """ChemNet activation mean and covariance ``{"mu", "sigma"}`` of a SMILES set (fcd_torch ``precalc``)."""
    smiles = [s for s in smiles if s]
    if len(smiles) < 2:
        raise ValueError(f"FCD needs at least 2 molecules, got {len(smiles)}")
    return _fcd_model(batch_size).precalc(list(smiles))


def fcd(gen: Sequence[str] | dict, ref: Sequence[str] | dict, batch_size: int = 128) -> float:
    """Frechet ChemNet Distance between two SMILES sets (or their :func:`fcd_stats`)."""
    model = _fcd_model(batch_size)
    pg = gen if isinstance(gen, dict) else fcd_stats(gen, batch_size)
    pr = ref if isinstance(ref, dict) else fcd_stats(ref, batch_size)
    return float(model.metric(pr, pg))


# --------------------------------------------------------------------------------------- metrics


def validity_uniqueness_novelty(
    smiles: Sequence[str | None], valid_wo_correction: Sequence[bool] | None, train_smiles, canonicalize: bool = True
) -> dict:
    """Validity (w/o correction), uniqueness and novelty of generated SMILES (``None`` = failed sample).

    ``train_smiles`` is canonicalised (non-isomeric) unless ``canonicalize=False`` says it already is.
    Uniqueness is over the valid samples, novelty over the unique valid ones (MOSES definitions)."""
    n = len(smiles)
    if n == 0:
        raise ValueError("no generated molecules to evaluate")
    canon = [canonical_smiles(s) if s else None for s in smiles]
    valid = [s for s in canon if s]
    unique = set(valid)
    train = set(canonical_smiles(s) for s in train_smiles) if canonicalize else set(train_smiles)
    out = {
        "n_samples": n,
        "validity": len(valid) / n,
        "uniqueness": len(unique) / len(valid) if valid else 0.0,
        "novelty": len(unique - train) / len(unique) if unique else 0.0,
    }
    if valid_wo_correction is not None:
        if len(valid_wo_correction) != n:
            raise ValueError(f"valid_wo_correction has {len(valid_wo_correction)} entries for {n} samples")
        out["validity_wo_correction"] = float(np.mean(np.asarray(valid_wo_correction, dtype=bool)))
    return out


def evaluate_molecules(
    x: torch.Tensor,
    adj: torch.Tensor,
    flags: torch.Tensor | None,
    train_smiles: Sequence[str],
    test_smiles: Sequence[str],
    *,
    atoms: Sequence[str] | None = None,
    quantize: bool = True,
    nspdk: bool = True,
    fcd_metric: bool = True,
    test_nspdk: np.ndarray | None = None,
    test_fcd: dict | None = None,
    canonical_train: bool = False,
    out_dir: str | Path | None = None,
    return_smiles: bool = False,
) -> dict:
    """GDSS's molecule metrics for sampled dense molecules ``x (B, N, F), adj (B, N, N), flags (B, N)``.

    ``atoms``: the vocabulary of ``x``'s features; by default QM9's (4 features), MOSES's (7) or ZINC250k's (9).
    ``quantize``: the samples are continuous SDE outputs (read out by
    :func:`graph.molecules.quantize_molecules`), else already one-hot / integer bond orders.
    ``test_nspdk`` / ``test_fcd``: precomputed test-set statistics (:func:`nspdk_mean_embedding` of the
    test molecules, :func:`fcd_stats`); otherwise they are computed once per test set and process.
    ``out_dir``: also write ``smiles.txt``, ``molecules.sdf``, ``grid.png`` and ``metrics.json`` there.

    Returns ``validity_wo_correction``, ``validity``, ``uniqueness``, ``novelty``, ``nspdk_mmd``, ``fcd``,
    ``n_samples`` and, with ``return_smiles``, ``smiles`` (per sample, ``None`` where no valid molecule came out).
    """
    if atoms is None:
        by_width = {len(a): a for a in (QM9_ATOMS, MOSES_ATOMS, ZINC250K_ATOMS)}
        if x.shape[-1] not in by_width:
            raise ValueError(f"x has {x.shape[-1]} atom features; pass atoms= (known widths {sorted(by_width)})")
        atoms = by_width[x.shape[-1]]
    dec = decode_molecules(x, adj, flags, atoms, quantize=quantize)
    out = validity_uniqueness_novelty(dec["smiles"], dec["valid_wo_correction"], train_smiles, not canonical_train)
    mols = [m for m in dec["mols"] if m is not None]
    gen = [s for s in dec["smiles"] if s]
    if nspdk:
        ref = test_nspdk if test_nspdk is not None else _cached(test_smiles, "nspdk")
        out["nspdk_mmd"] = nspdk_mmd(mols, ref) if mols else float("nan")
    if fcd_metric:
        if len(gen) < 2 or (test_fcd is None and len(test_smiles) < 2):
            out["fcd"] = float("nan")  # a covariance needs two molecules on each side
        else:
            ref = test_fcd if test_fcd is not None else _cached(test_smiles, "fcd")
            out["fcd"] = fcd(gen, ref)
    if out_dir is not None:
        out_dir = Path(out_dir)
        write_smiles(out_dir / "smiles.txt", dec["smiles"])
        write_sdf(out_dir / "molecules.sdf", dec["mols"])
        if mols:
            draw_grid(out_dir / "grid.png", mols)
        atomic_write_text(out_dir / "metrics.json", json.dumps(out, indent=2))
    if return_smiles:
        out["smiles"] = dec["smiles"]
    return out


_TEST_STATS: dict = {}
# Test-set statistics (NSPDK mean embedding, ChemNet mean/covariance) take minutes for QM9's 13k test
# molecules on a CPU, so they are kept on disk, named by a hash of the test SMILES.
DEFAULT_CACHE = "outputs/cache/molecules"
# Set to a folder to override $POLYDIFF_MOL_CACHE for this process (tests point it at a temporary folder).
STATS_CACHE: Path | None = None


def stats_cache() -> Path:
    """The folder of the cached test-set statistics (and the CLI's default ``--cache``): :data:`STATS_CACHE`
    when set, else ``$POLYDIFF_MOL_CACHE``, else ``outputs/cache/molecules``; read at each call, so the
    environment variable takes effect whenever it is set, not only before the import."""
    if STATS_CACHE is not None:
        return Path(STATS_CACHE)
    return Path(os.environ.get("POLYDIFF_MOL_CACHE") or DEFAULT_CACHE)


def _cached(test_smiles: Sequence[str], kind: str, cache: Path | None = None):
    """``kind`` = ``"nspdk"`` (mean embedding) or ``"fcd"`` (ChemNet statistics) of a test set, computed once
    per process and kept as ``mol_test_<kind>_<hash>.pt`` under ``cache`` (default :func:`stats_cache`)."""
    digest = hashlib.sha1("\n".join(test_smiles).encode()).hexdigest()
    if (kind, digest) in _TEST_STATS:
        return _TEST_STATS[(kind, digest)]
    path = Path(cache or stats_cache()) / f"mol_test_{kind}_{digest[:16]}.pt"
    if path.is_file():
        saved = {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}
    else:
        if kind == "nspdk":
            saved = {"mean": nspdk_mean_embedding([Chem.MolFromSmiles(s) for s in test_smiles])}
        else:
            saved = dict(fcd_stats(test_smiles))
        save_checkpoint({k: torch.as_tensor(v) for k, v in saved.items()}, path)  # atomic: runs may share it
    value = saved["mean"] if kind == "nspdk" else {"mu": saved["mu"], "sigma": saved["sigma"]}
    _TEST_STATS[(kind, digest)] = value
    return value


# --------------------------------------------------------------------------------------- command


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m graph.mol_metrics --checkpoint gdss_qm9.pth``: the QM9 case of ``python -m graph.sample
    --official CKPT --data qm9`` under this module's older argument names. The arguments are checked here and
    passed on; the molecules, metrics and files are graph.sample's (``<--out>/<--tag>/``)."""
    from . import sample

    p = argparse.ArgumentParser(prog="python -m graph.mol_metrics",
                                description="Sample an official GDSS QM9 checkpoint and compute GDSS's molecule "
                                            "metrics (python -m graph.sample --official CKPT --data qm9).")
    p.add_argument("--checkpoint", required=True, help="official GDSS checkpoint (checkpoints/QM9/gdss_qm9.pth)")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--n", type=int, default=1000, help="molecules to sample")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--steps", type=int, default=1000, help="discretisation steps (GDSS: 1000)")
    p.add_argument("--solver", choices=("pc", "s4"), default="pc")
    p.add_argument("--snr", type=float, default=0.2)
    p.add_argument("--scale-eps", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split-file", default=None, help="GDSS/MoFlow valid_idx_qm9.json (else a seeded split)")
    p.add_argument("--cache", default=None,
                   help="folder of the encoded data and the test-set statistics (default: $POLYDIFF_MOL_CACHE, "
                        f"else {DEFAULT_CACHE})")
    p.add_argument("--out", default="outputs/graph/qm9_pretrained")
    p.add_argument("--tag", default="sample", help="output folder under --out")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.n < 1 or args.batch < 1 or args.steps < 1:
        p.error(f"--n, --batch and --steps must be positive, got {args.n}, {args.batch}, {args.steps}")  # exit 2
    cache = args.cache or str(stats_cache())  # resolved now, not at import: the environment may change
    forward = ["--official", args.checkpoint, "--data", "qm9", "--ema" if args.ema else "--raw",
               "--num", str(args.n), "--steps", str(args.steps), "--solver", args.solver, "--snr", str(args.snr),
               "--scale-eps", str(args.scale_eps), "--seed", str(args.seed), "--out", args.out, "--tag", args.tag,
               "--threads", str(args.threads), f"sampler.batch_size={args.batch}", f"data.options.cache_dir={cache}"]
    if args.split_file is not None:
        forward.append(f"data.options.split_file={args.split_file}")
    global STATS_CACHE
    saved = STATS_CACHE
    STATS_CACHE = Path(cache)  # the test-set statistics go where the encoded data goes
    try:
        return sample.main(forward)
    finally:
        STATS_CACHE = saved


if __name__ == "__main__":
    main()
