"""Graph-statistics MMD of generated graphs (GraphRNN, You et al. 2018; GDSS, Jo et al. 2022, seed 184).

The evaluation compares two sets of graphs by the maximum mean discrepancy of one statistic per graph:

- ``degree``: the degree histogram (``nx.degree_histogram``), normalised to a pmf;
- ``cluster``: the histogram of local clustering coefficients in 100 bins on ``[0, 1]``, as a pmf;
- ``orbit``: the mean over nodes of the 15 node-orbit counts of graphlets of 2-4 nodes (ORCA's output,
  Hocevar & Demsar 2014), *not* normalised.

``MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y)`` with all pairs (the biased V-statistic, self-pairs
included, as GraphRNN's ``compute_mmd``), so the MMD of a set with itself is exactly 0. Kernels:

- ``gaussian_emd``: ``exp(-EMD(p, q)^2 / (2 sigma^2))`` with the earth mover's distance between two pmfs on
  the bins ``0, 1, 2, ...`` with ground distance ``|i - j| / distance_scaling``; in one dimension it is
  ``sum_i |P_i - Q_i| / distance_scaling`` over the cumulative sums (what ``pyemd.emd`` returns for
  equal-mass histograms on this Toeplitz distance matrix);
- ``gaussian``: ``exp(-||x - y||_2^2 / (2 sigma^2))``;
- ``gaussian_tv``: ``exp(-TV(x, y)^2 / (2 sigma^2))`` with ``TV = sum |x - y| / 2`` (GRAN / SPECTRE).

Two protocols (``PROTOCOLS``): ``"gdss"`` (GDSS ``load_eval_settings`` + ``evaluation/stats.py``: degree
``gaussian_emd`` sigma 1; cluster ``gaussian_emd`` sigma 0.1 on ``distance_scaling=100``; orbit ``gaussian``
sigma 30) and ``"spectre"`` (GRAN/SPECTRE ``eval_helper``: ``gaussian_tv`` with sigma 1, 0.1, 30).

Orbit counts are computed without the compiled ORCA tool: :func:`orbit_counts` evaluates ORCA's own
system of equations (``orca.cpp`` stage 3) with dense matrix products, for every node at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import networkx as nx
import numpy as np

__all__ = [
    "KERNELS",
    "PROTOCOLS",
    "STATS",
    "gaussian_emd_kernel",
    "gaussian_kernel",
    "gaussian_tv_kernel",
    "compute_mmd",
    "degree_histogram",
    "clustering_histogram",
    "orbit_counts",
    "orbit_counts_bruteforce",
    "orbit_statistic",
    "degree_mmd",
    "clustering_mmd",
    "orbit_mmd",
    "evaluate_graphs",
    "structure_stats",
]


# ------------------------------------------------------------------------------------ kernels


def _pad(xs: Sequence[np.ndarray], width: int | None = None) -> np.ndarray:
    """Stack 1-D vectors of different lengths, zero-padded on the right to a common length."""
    width = max(len(v) for v in xs) if width is None else width
    out = np.zeros((len(xs), width), dtype=np.float64)
    for i, v in enumerate(xs):
        out[i, : len(v)] = v
    return out


def gaussian_emd_kernel(
    x: np.ndarray, y: np.ndarray, sigma: float = 1.0, distance_scaling: float = 1.0
) -> np.ndarray:
    """Pairwise ``exp(-EMD^2 / (2 sigma^2))`` between the rows of ``x`` ``(n, L)`` and ``y`` ``(m, L)`` (pmfs).

    The 1-D EMD between equal-mass histograms on bins at ``0, 1/s, 2/s, ...`` is the L1 distance of their
    cumulative sums divided by ``s = distance_scaling``.
    """
    cx, cy = np.cumsum(x, axis=1), np.cumsum(y, axis=1)
    emd = np.abs(cx[:, None, :] - cy[None, :, :]).sum(-1) / distance_scaling
    return np.exp(-(emd**2) / (2.0 * sigma * sigma))


def gaussian_kernel(x: np.ndarray, y: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Pairwise ``exp(-||x - y||^2 / (2 sigma^2))`` between rows."""
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2.0 * sigma * sigma))


def gaussian_tv_kernel(x: np.ndarray, y: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Pairwise ``exp(-TV^2 / (2 sigma^2))``, ``TV = sum |x - y| / 2``, between rows."""
    tv = np.abs(x[:, None, :] - y[None, :, :]).sum(-1) / 2.0
    return np.exp(-(tv**2) / (2.0 * sigma * sigma))


KERNELS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian_emd": gaussian_emd_kernel,
    "gaussian": gaussian_kernel,
    "gaussian_tv": gaussian_tv_kernel,
}


def compute_mmd(
    samples1: Sequence[np.ndarray],
    samples2: Sequence[np.ndarray],
    kernel: str | Callable[..., np.ndarray] = "gaussian_emd",
    is_hist: bool = True,
    **kernel_args,
) -> float:
    """Squared MMD (biased, all pairs) between two sets of 1-D vectors of possibly different lengths.

    ``is_hist`` normalises each vector to sum 1 first (GraphRNN ``compute_mmd``); vectors are zero-padded
    to a common support. Returns ``mean k(s1, s1') + mean k(s2, s2') - 2 mean k(s1, s2)``.
    """
    k = KERNELS[kernel] if isinstance(kernel, str) else kernel
    if len(samples1) == 0 or len(samples2) == 0:
        raise ValueError(f"compute_mmd needs two non-empty sets, got {len(samples1)} and {len(samples2)} vectors")
    vecs = [np.asarray(v, dtype=np.float64).ravel() for v in [*samples1, *samples2]]
    if is_hist:
        sums = [v.sum() for v in vecs]
        if any(not s > 0 for s in sums):
            raise ValueError("compute_mmd(is_hist=True) got a histogram with zero mass")
        vecs = [v / s for v, s in zip(vecs, sums)]
    stacked = _pad(vecs)
    a, b = stacked[: len(samples1)], stacked[len(samples1):]
    return float(k(a, a, **kernel_args).mean() + k(b, b, **kernel_args).mean() - 2.0 * k(a, b, **kernel_args).mean())


# ------------------------------------------------------------------------------------ statistics


def degree_histogram(g: nx.Graph) -> np.ndarray:
    """``nx.degree_histogram``: counts of nodes of degree 0, 1, ..., max degree."""
    return np.asarray(nx.degree_histogram(g), dtype=np.float64)


def clustering_histogram(g: nx.Graph, bins: int = 100) -> np.ndarray:
    """Histogram of the local clustering coefficients in ``bins`` equal bins on ``[0, 1]``."""
    coeffs = list(nx.clustering(g).values())
    hist, _ = np.histogram(coeffs, bins=bins, range=(0.0, 1.0), density=False)
    return hist.astype(np.float64)


def _adjacency(g) -> np.ndarray:
    if isinstance(g, nx.Graph):
        a = nx.to_numpy_array(g, nodelist=list(g.nodes), dtype=np.float64)
    else:
        a = np.asarray(g, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected a networkx graph or a square adjacency matrix, got shape {a.shape}")
    a = (a != 0).astype(np.float64)
    np.fill_diagonal(a, 0.0)  # ORCA ignores self-loops (GDSS removes them before counting)
    if not np.array_equal(a, a.T):
        raise ValueError("orbit counts need an undirected graph: the adjacency matrix is not symmetric")
    return a


def orbit_counts(g) -> np.ndarray:
    """ORCA's node-orbit counts of graphlets with 2-4 nodes: ``(n, 15)`` int64, one row per node.

    Orbits (induced graphlets, Przulj's numbering, as ORCA writes them): 0 edge (degree); 1 / 2 end /
    middle of a 3-path; 3 triangle; 4 / 5 end / inner node of a 4-path; 6 / 7 leaf / centre of a 3-star;
    8 4-cycle; 9 / 10 / 11 pendant / degree-2 / degree-3 node of a paw (tailed triangle); 12 / 13
    degree-2 / degree-3 node of a diamond; 14 4-clique.

    ORCA (``orca.cpp``, stage 3) counts, for each node ``x``, sums ``f`` over its neighbourhood that mix
    orbits, and solves a triangular system for the orbits. The sums are written here as matrix
    expressions in ``A``, ``A^2`` (common neighbours; on an edge, the triangles through it) and the
    degrees, so all nodes are counted at once; the 4-cliques through ``x`` are the triangles of the
    subgraph induced by its neighbours. Accepts a networkx graph (node order ``g.nodes``) or an
    adjacency matrix.
    """
    a = _adjacency(g)
    n = a.shape[0]
    out = np.zeros((n, 15), dtype=np.int64)
    if n == 0:
        return out
    d = a.sum(1)
    a2 = a @ a
    tri = a * a2  # tri[x, y]: triangles through the edge x-y
    non = 1.0 - a - np.eye(n)  # non[x, z]: z is neither x nor a neighbour of x

    orbit1 = (a2 * non).sum(1)  # x at the end of an induced 3-path
    orbit2 = (a * (d[:, None] - 1.0 - a2)).sum(1) / 2.0  # x in the middle
    orbit3 = tri.sum(1) / 2.0

    # x in the middle (x-y, x-z): triangles x,y,z and induced paths y-x-z
    w12 = a * (a2 - 1.0)
    f_12_14 = 0.5 * ((a @ w12) * a).sum(1)
    w10 = a * (d[:, None] - 1.0 - a2)
    f_10_13 = ((a @ w10) * a).sum(1)
    f_13_14 = (tri * (tri - 1.0)).sum(1)
    f_11_13 = (tri * (d[:, None] - 1.0 - tri)).sum(1)
    free = a * (d[:, None] - 1.0 - tri)  # neighbours z of x, z != y, not adjacent to y
    f_7_11 = (free * (d[:, None] - 2.0 - tri)).sum(1)
    f_5_8 = (free * (d[None, :] - 1.0 - tri)).sum(1)
    # x at the side (x-y-z, z not adjacent to x)
    f_6_9 = (a * (d[None, :] - 2.0 - tri) * (d[None, :] - 1.0 - tri)).sum(1)
    f_9_12 = ((a @ tri) * non).sum(1)
    f_4_8 = ((a @ (a * (d[None, :] - 1.0 - a2))) * non).sum(1)
    f_8_12 = (non * a2 * (a2 - 1.0)).sum(1)
    f_14 = np.zeros(n)
    for x in range(n):
        nb = np.flatnonzero(a[x])
        if len(nb) >= 3:
            sub = a[np.ix_(nb, nb)]
            f_14[x] = np.trace(sub @ sub @ sub) / 6.0

    cols = {
        0: d,
        1: orbit1,
        2: orbit2,
        3: orbit3,
        14: f_14,
        13: (f_13_14 - 6 * f_14) / 2,
        12: f_12_14 - 3 * f_14,
        11: (f_11_13 - f_13_14 + 6 * f_14) / 2,
        10: f_10_13 - f_13_14 + 6 * f_14,
        9: (f_9_12 - 2 * f_12_14 + 6 * f_14) / 2,
        8: (f_8_12 - 2 * f_12_14 + 6 * f_14) / 2,
        7: (f_13_14 + f_7_11 - f_11_13 - 6 * f_14) / 6,
        6: (2 * f_12_14 + f_6_9 - f_9_12 - 6 * f_14) / 2,
        5: 2 * f_12_14 + f_5_8 - f_8_12 - 6 * f_14,
        4: 2 * f_12_14 + f_4_8 - f_8_12 - 6 * f_14,
    }
    for k, v in cols.items():
        out[:, k] = np.rint(v).astype(np.int64)
    return out


# Orbit of each node of an induced connected graphlet, keyed by (number of nodes, sorted degrees): on 3 and
# 4 nodes the degree sequence names the graphlet (a disconnected one has a degree 0 or the sequence
# 1, 1, 1, 1, not listed), and inside each graphlet the node's degree names its orbit.
_BY_DEGREE = {
    (3, (1, 1, 2)): {1: 1, 2: 2},
    (3, (2, 2, 2)): {2: 3},
    (4, (1, 1, 2, 2)): {1: 4, 2: 5},
    (4, (1, 1, 1, 3)): {1: 6, 3: 7},
    (4, (2, 2, 2, 2)): {2: 8},
    (4, (1, 2, 2, 3)): {1: 9, 2: 10, 3: 11},
    (4, (2, 2, 3, 3)): {2: 12, 3: 13},
    (4, (3, 3, 3, 3)): {3: 14},
}


def orbit_counts_bruteforce(g) -> np.ndarray:
    """The same ``(n, 15)`` counts by enumerating every 3- and 4-node subset (for tests; ``O(n^4)``)."""
    from itertools import combinations

    a = _adjacency(g).astype(np.int64)
    n = a.shape[0]
    out = np.zeros((n, 15), dtype=np.int64)
    out[:, 0] = a.sum(1)
    for size in (3, 4):
        for nodes in combinations(range(n), size):
            sub = a[np.ix_(nodes, nodes)]
            degs = sub.sum(1)
            key = (size, tuple(sorted(degs.tolist())))
            if key not in _BY_DEGREE:  # disconnected subsets are no graphlet
                continue
            for i, v in enumerate(nodes):
                out[v, _BY_DEGREE[key][int(degs[i])]] += 1
    return out


def orbit_statistic(g) -> np.ndarray:
    """GDSS's per-graph orbit statistic: the 15 orbit counts summed over nodes, divided by the node count."""
    counts = orbit_counts(g)
    return counts.sum(0) / counts.shape[0] if counts.shape[0] else np.zeros(15)


# ------------------------------------------------------------------------------------ MMDs


def _nonempty(graphs: Sequence[nx.Graph]) -> list[nx.Graph]:
    return [g for g in graphs if g.number_of_nodes() > 0]


def _check_graphs(graphs, name: str) -> list[nx.Graph]:
    graphs = list(graphs)
    for i, g in enumerate(graphs):
        if not isinstance(g, nx.Graph):
            raise TypeError(f"{name}[{i}] must be a networkx graph, got {type(g).__name__}")
    if not graphs:
        raise ValueError(f"{name} is empty")
    return graphs


def degree_mmd(ref, pred, kernel: str = "gaussian_emd", sigma: float = 1.0) -> float:
    """MMD^2 of degree pmfs (GDSS ``degree_stats``; empty predicted graphs are dropped)."""
    ref, pred = _check_graphs(ref, "ref"), _nonempty(_check_graphs(pred, "pred"))
    return compute_mmd([degree_histogram(g) for g in ref], [degree_histogram(g) for g in pred], kernel, sigma=sigma)


def clustering_mmd(ref, pred, kernel: str = "gaussian_emd", sigma: float = 0.1, bins: int = 100) -> float:
    """MMD^2 of clustering-coefficient pmfs in ``bins`` bins (GDSS ``clustering_stats``: EMD ground distance
    in clustering units, ``distance_scaling = bins``)."""
    ref, pred = _check_graphs(ref, "ref"), _nonempty(_check_graphs(pred, "pred"))
    extra = {"distance_scaling": float(bins)} if kernel == "gaussian_emd" else {}
    return compute_mmd(
        [clustering_histogram(g, bins) for g in ref],
        [clustering_histogram(g, bins) for g in pred],
        kernel,
        sigma=sigma,
        **extra,
    )


def orbit_mmd(ref, pred, kernel: str = "gaussian", sigma: float = 30.0) -> float:
    """MMD^2 of mean orbit counts, not normalised (GDSS ``orbit_stats_all``: all 15 ORCA columns)."""
    ref, pred = _check_graphs(ref, "ref"), _check_graphs(pred, "pred")
    return compute_mmd([orbit_statistic(g) for g in ref], [orbit_statistic(g) for g in pred], kernel,
                       is_hist=False, sigma=sigma)


PROTOCOLS = {
    "gdss": {"degree": ("gaussian_emd", 1.0), "cluster": ("gaussian_emd", 0.1), "orbit": ("gaussian", 30.0)},
    "spectre": {"degree": ("gaussian_tv", 1.0), "cluster": ("gaussian_tv", 0.1), "orbit": ("gaussian_tv", 30.0)},
}
STATS = {"degree": degree_mmd, "cluster": clustering_mmd, "orbit": orbit_mmd}


def evaluate_graphs(ref, pred, protocol: str = "gdss", methods: Sequence[str] = ("degree", "cluster", "orbit")) -> dict:
    """``{method: MMD^2}`` between reference and generated networkx graphs, rounded to 6 digits as GDSS does."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown MMD protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    out = {}
    for m in methods:
        if m not in STATS:
            raise ValueError(f"unknown graph statistic {m!r}; choose from {sorted(STATS)}")
        kernel, sigma = PROTOCOLS[protocol][m]
        out[m] = round(STATS[m](ref, pred, kernel=kernel, sigma=sigma), 6)
    return out


def structure_stats(graphs: Sequence[nx.Graph]) -> dict:
    """Plain structural averages a person can read beside the MMDs: per graph, nodes, edges, triangles,
    connected components, the share of connected graphs and mean clustering; per node (pooled over all
    graphs), the shares of isolated nodes and of nodes with clustering coefficient exactly 0 (degree >= 2)
    and exactly 1. Graphs without nodes are left out (``graphs`` counts the rest). Rounded to 4 digits."""
    graphs = _nonempty(_check_graphs(graphs, "graphs"))
    if not graphs:
        raise ValueError("graphs holds only graphs without nodes")
    per_graph = np.array([(g.number_of_nodes(), g.number_of_edges(), sum(nx.triangles(g).values()) / 3,
                           nx.number_connected_components(g), nx.is_connected(g), nx.average_clustering(g))
                          for g in graphs], dtype=float)
    deg = np.concatenate([[d for _, d in g.degree()] for g in graphs])
    clus = np.concatenate([list(nx.clustering(g).values()) for g in graphs])
    keys = ("nodes", "edges", "triangles", "components", "connected", "clustering")
    out = {k: float(v) for k, v in zip(keys, per_graph.mean(0))}
    out.update(isolated_nodes=float(np.mean(deg == 0)), clustering_0_nodes=float(np.mean((clus == 0) & (deg >= 2))),
               clustering_1_nodes=float(np.mean(clus == 1)), graphs=len(graphs))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
