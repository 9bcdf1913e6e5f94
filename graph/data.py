"""Generic graph data sets, generated offline from a seed, and conversions between graph containers.

Data sets (:data:`GENERATORS`; :func:`load_graph_dataset` builds one with its benchmark split):

- ``community_small`` (GraphRNN, You et al. 2018, as GDSS's ``data/data_generators.py`` generates it):
  100 graphs of two communities; ``max_nodes`` drawn from 12..20 gives two communities of
  ``max_nodes // 2`` nodes (12-20 nodes in all), each ``G(k, 0.7)`` drawn with networkx seed 0 and 1 (the
  reference fixes these seeds, so equal sizes share their communities); every pair of connected
  components gets an edge with probability ``0.05 * 2 / k`` per node pair (at least one). GDSS's split:
  test = the first 20 %, train = the rest (here after a seeded shuffle).
- ``grid`` (GraphRNN): the 100 2-D grids ``m x n`` with ``m, n in 10..19`` (100-361 nodes), same split.
- ``planar`` (SPECTRE, Martinkus et al. 2022): 200 Delaunay triangulations of 64 uniform points in the
  unit square; ``sbm``: 200 stochastic block models with 2-5 communities of 20-40 nodes, ``p_intra = 0.3``,
  ``p_inter = 0.005`` (SPECTRE's ``data.py``; its paper's text says 0.05, its code and released data
  0.005). SPECTRE's GRAN-like split: 40 test, 128 train, 32 validation, by
  ``torch.utils.data.random_split`` with ``torch.Generator().manual_seed(1234)``.
- ``ego_small`` (citeseer ego networks) needs the citeseer citation graph, which cannot be downloaded
  here: :func:`load_graph_dataset` raises a ValueError saying so, unless the graphs come from a file.

Graphs from a file (:func:`read_graphs`; ``load_graph_dataset(..., graph_file=path)``): graph6 / sparse6
(``.g6`` / ``.s6``, one graph a line, networkx's readers) or a pickled list of networkx graphs as GraphRNN
and GDSS ship their data sets (``.pkl``; e.g. GDSS's ``data/community_small.pkl`` and ``ego_small.pkl``),
read with an unpickler that admits only ``networkx.Graph`` and plain containers, so nothing pickled is
executed. The file's graphs replace the generator and get the data set's split; ``split_seed=None`` keeps
the file order (GDSS: the first 20 % are the test set).

Containers: a list of networkx graphs, torch-geometric ``Data`` / ``Batch`` (or a list of ``Data``), and
GDSS's dense padded triple ``(x (B, N, F), adj (B, N, N), flags (B, N))``. :func:`to_dense` accepts all
three and reports which it got; :func:`from_dense` returns that kind again. Node features of generic
graphs are GDSS's one-hot degrees (``init="deg"``, :func:`graph.utils.init_features`).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GENERATORS",
    "GraphDataset",
    "community_small_graphs",
    "grid_graphs",
    "planar_graphs",
    "sbm_graphs",
    "load_graph_dataset",
    "read_graphs",
    "write_graphs",
    "graph_kind",
    "to_dense",
    "from_dense",
    "dense_to_networkx",
    "degree_features",
]


# ------------------------------------------------------------------------------------ generators


def _rng(seed) -> np.random.RandomState:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return np.random.RandomState(int(seed))


def _count(num_graphs, name="num_graphs") -> int:
    if isinstance(num_graphs, bool) or not isinstance(num_graphs, (int, np.integer)) or num_graphs < 1:
        raise ValueError(f"{name} must be a positive integer, got {num_graphs!r}")
    return int(num_graphs)


def n_community(num_communities: int, max_nodes: int, rng: np.random.RandomState, p_inter: float = 0.05,
                p_intra: float = 0.7) -> nx.Graph:
    """GDSS's / Niu et al. 2020's ``n_community``: ``num_communities`` copies of ``G(k, p_intra)``
    (``k = max_nodes // num_communities``, networkx seeds ``0, 1, ...`` as in the reference), then each pair of
    connected components is bridged: every node pair with probability ``p_inter * 2 / ((C - 1) k)``, and by its
    first nodes if no pair was drawn."""
    if num_communities < 2:
        raise ValueError(f"num_communities must be >= 2, got {num_communities!r}")
    k = max_nodes // num_communities
    if k < 1:
        raise ValueError(f"max_nodes={max_nodes} is too small for {num_communities} communities")
    p_bridge = p_inter * 2 / ((num_communities - 1) * k)
    g = nx.disjoint_union_all([nx.gnp_random_graph(k, p_intra, seed=i) for i in range(num_communities)])
    comps = [list(c) for c in nx.connected_components(g)]
    for i in range(len(comps)):
        for j in range(i + 1, len(comps)):
            bridged = False
            for u in comps[i]:
                for v in comps[j]:
                    if rng.rand() < p_bridge:
                        g.add_edge(u, v)
                        bridged = True
            if not bridged:
                g.add_edge(comps[i][0], comps[j][0])
    return g


def community_small_graphs(num_graphs: int = 100, seed: int = 0) -> list[nx.Graph]:
    """GDSS's community-small: ``max_nodes ~ U{12..20}``, two communities (see the module docstring)."""
    rng, num_graphs = _rng(seed), _count(num_graphs)
    graphs = []
    while len(graphs) < num_graphs:
        rng.choice([2])  # GDSS draws every parameter, num_communities included, from the one stream
        max_nodes = int(rng.choice(np.arange(12, 21)))
        g = nx.convert_node_labels_to_integers(n_community(2, max_nodes, rng))
        if g.number_of_nodes() > 1:
            graphs.append(g)
    return graphs


def grid_graphs(low: int = 10, high: int = 20) -> list[nx.Graph]:
    """GraphRNN's grid data set: ``nx.grid_2d_graph(m, n)`` for ``m, n in range(low, high)``, nodes relabelled."""
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low < high):
        raise ValueError(f"grid sizes need integers 1 <= low < high, got low={low!r}, high={high!r}")
    return [nx.convert_node_labels_to_integers(nx.grid_2d_graph(m, n)) for m in range(low, high)
            for n in range(low, high)]


def planar_graphs(num_graphs: int = 200, n_nodes: int = 64, seed: int = 0) -> list[nx.Graph]:
    """SPECTRE's planar graphs: the Delaunay triangulation of ``n_nodes`` uniform points in ``[0, 1]^2``."""
    from scipy.spatial import Delaunay

    rng, num_graphs = _rng(seed), _count(num_graphs)
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 3:
        raise ValueError(f"n_nodes must be an integer >= 3, got {n_nodes!r}")
    graphs = []
    for _ in range(num_graphs):
        tri = Delaunay(rng.rand(n_nodes, 2))
        g = nx.empty_graph(n_nodes)
        for s in tri.simplices:
            g.add_edges_from([(int(s[0]), int(s[1])), (int(s[1]), int(s[2])), (int(s[2]), int(s[0]))])
        graphs.append(g)
    return graphs


def sbm_graphs(num_graphs: int = 200, seed: int = 0, p_intra: float = 0.3, p_inter: float = 0.005,
               min_communities: int = 2, max_communities: int = 5, min_size: int = 20,
               max_size: int = 40) -> list[nx.Graph]:
    """SPECTRE's SBM graphs: ``C ~ U{2..5}`` communities of ``U{20..40}`` nodes each; graph ``i`` is drawn by
    ``nx.stochastic_block_model`` with seed ``seed * num_graphs + i`` (SPECTRE: ``i``)."""
    rng, num_graphs = _rng(seed), _count(num_graphs)
    for name, p in (("p_intra", p_intra), ("p_inter", p_inter)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {p!r}")
    graphs = []
    for i in range(num_graphs):
        c = int(rng.randint(min_communities, max_communities + 1))
        sizes = rng.randint(min_size, max_size + 1, size=c).tolist()
        probs = np.full((c, c), p_inter)
        np.fill_diagonal(probs, p_intra)
        g = nx.stochastic_block_model(sizes, probs.tolist(), seed=int(seed) * num_graphs + i)
        graphs.append(g)  # nodes keep their ``block``; ``g.graph["partition"]`` lists the blocks
    return graphs


GENERATORS = {
    "community_small": community_small_graphs,
    "grid": grid_graphs,
    "planar": planar_graphs,
    "sbm": sbm_graphs,
}


# ------------------------------------------------------------------------------------ graph files

GRAPH6_SUFFIXES = (".g6", ".graph6")
SPARSE6_SUFFIXES = (".s6", ".sparse6")
PICKLE_SUFFIXES = (".pkl", ".pickle")


class _GraphUnpickler(pickle.Unpickler):
    """Unpickles lists of networkx graphs (GraphRNN / GDSS data files) and nothing else: a global outside
    :attr:`ALLOWED` and networkx's view classes (which a graph pickled after ``g.nodes`` was read carries) is
    refused before it is looked up, so no pickled callable can run."""

    ALLOWED = {("networkx.classes.graph", "Graph"), ("builtins", "dict"), ("builtins", "list"),
               ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "tuple"), ("builtins", "object"),
               ("copyreg", "_reconstructor")}  # pickle protocols 0 / 1 rebuild objects with it
    VIEW_MODULES = ("networkx.classes.reportviews", "networkx.classes.coreviews")

    def find_class(self, module: str, name: str):
        allowed = (module, name) in self.ALLOWED or (module in self.VIEW_MODULES and not name.startswith("_"))
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: a graph file may hold only "
                                         "networkx.Graph objects in lists and dicts")
        obj = super().find_class(module, name)
        if module in self.VIEW_MODULES and not isinstance(obj, type):
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not a networkx view class")
        return obj


def read_graphs(path: str | Path) -> list[nx.Graph]:
    """The graphs of a graph6 (``.g6``), sparse6 (``.s6``) or pickle (``.pkl``, a list of ``networkx.Graph``)
    file, in file order. Node order and labels are kept (:func:`to_dense` follows ``g.nodes``, as GDSS's
    ``nx.to_numpy_matrix`` does). Raises a ValueError naming the file and graph for what GDSS's model cannot
    take: an empty file, a directed or multi-graph, a graph without nodes, a self-loop."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"graph file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        try:
            with open(path, "rb") as f:
                obj = _GraphUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise ValueError(f"graph file {str(path)!r} is not a pickled list of networkx graphs: {e}") from e
    elif suffix in GRAPH6_SUFFIXES + SPARSE6_SUFFIXES:
        read = nx.read_graph6 if suffix in GRAPH6_SUFFIXES else nx.read_sparse6
        try:
            obj = read(path)
        except (nx.NetworkXError, ValueError, TypeError, IndexError) as e:
            raise ValueError(f"graph file {str(path)!r} is not valid {suffix[1:]}: {e}") from e
    else:
        raise ValueError(f"graph file {str(path)!r}: unknown suffix {path.suffix!r}; use "
                         f"{', '.join(GRAPH6_SUFFIXES + SPARSE6_SUFFIXES + PICKLE_SUFFIXES)}")
    graphs = obj if isinstance(obj, list) else [obj]
    if not graphs:
        raise ValueError(f"graph file {str(path)!r} holds no graphs")
    for i, g in enumerate(graphs):
        if not isinstance(g, nx.Graph) or g.is_directed() or g.is_multigraph():
            raise ValueError(f"graph file {str(path)!r}: item {i} is a {type(g).__name__}, not an undirected "
                             "simple networkx.Graph")
        if g.number_of_nodes() == 0:
            raise ValueError(f"graph file {str(path)!r}: graph {i} has no nodes")
        loops = nx.number_of_selfloops(g)
        if loops:
            raise ValueError(f"graph file {str(path)!r}: graph {i} has {loops} self-loop(s), which GDSS's "
                             "adjacency (zero diagonal) cannot hold; remove them first")
    return graphs


def write_graphs(graphs: list[nx.Graph], path: str | Path) -> Path:
    """Write ``graphs`` as graph6 (one line each, nodes in ``g.nodes`` order; :func:`read_graphs` reads it
    back). The file is written to a temporary name and moved into place."""
    path = Path(path)
    if path.suffix.lower() not in GRAPH6_SUFFIXES:
        raise ValueError(f"write_graphs writes graph6; give a path ending in .g6, got {str(path)!r}")
    lines = []
    for i, g in enumerate(graphs):
        if g.is_directed() or g.is_multigraph() or nx.number_of_selfloops(g):
            raise ValueError(f"graph {i} is not an undirected simple graph without self-loops; graph6 cannot hold it")
        lines.append(nx.to_graph6_bytes(g, nodes=list(g.nodes), header=False).decode().rstrip("\n"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------ data sets


@dataclass
class GraphDataset:
    """A benchmark's graphs and split: ``train`` / ``val`` / ``test`` lists of networkx graphs."""

    name: str
    train: list[nx.Graph]
    test: list[nx.Graph]
    val: list[nx.Graph] = field(default_factory=list)

    @property
    def max_node_num(self) -> int:
        return max(g.number_of_nodes() for g in self.train + self.val + self.test)

    @property
    def max_degree(self) -> int:
        return max(max((d for _, d in g.degree()), default=0) for g in self.train + self.val + self.test)


def load_graph_dataset(name: str, seed: int = 0, split_seed: int | None = 0, num_graphs: int | None = None,
                       test_split: float = 0.2, graph_file: str | Path | None = None) -> GraphDataset:
    """Generate data set ``name`` from ``seed`` (or read its graphs from ``graph_file``) and split it as its
    benchmark does.

    GDSS's data sets (``community_small``, ``grid``, and ``ego_small`` or ``graph_file`` from a file): a
    permutation from ``split_seed`` (``None``: the generated or file order) then the first
    ``int(test_split * n)`` graphs are the test set, the rest the training set (GDSS takes the first 20 % of
    its pickle). SPECTRE's (``planar``, ``sbm``): ``random_split`` with generator seed 1234 into 20 % test, then
    80 % / 20 % of the rest train / validation (``split_seed`` and ``test_split`` are not used).
    ``num_graphs`` overrides the benchmark's count (not for ``grid``, whose 100 graphs are fixed, nor for a file).
    """
    if graph_file is None and name in ("ego_small", "graph_file"):
        if name == "graph_file":
            raise ValueError("data set 'graph_file' needs the path of a graph file (graph_file=...)")
        raise ValueError(
            "ego_small is made of ego networks of the citeseer citation graph, which is not available offline "
            "(it cannot be downloaded here); use community_small, grid, planar or sbm, or give the graphs as a "
            "file (graph_file=..., e.g. GDSS's data/ego_small.pkl)"
        )
    if name not in GENERATORS and name not in ("ego_small", "graph_file"):
        raise ValueError(f"unknown graph data set {name!r}; choose one of "
                         f"{sorted([*GENERATORS, 'ego_small', 'graph_file'])}")
    if not 0.0 < test_split < 1.0:
        raise ValueError(f"test_split must lie in (0, 1), got {test_split!r}")
    if graph_file is not None:
        if num_graphs is not None:
            raise ValueError(f"num_graphs={num_graphs} applies to generated data sets; a graph file gives its own "
                             "graphs (num_graphs must be None)")
        graphs = read_graphs(graph_file)
    elif name == "grid":
        if num_graphs is not None:
            raise ValueError("the grid data set has its fixed 100 graphs; num_graphs must be None")
        graphs = grid_graphs()
    else:
        kwargs = {} if num_graphs is None else {"num_graphs": num_graphs}
        graphs = GENERATORS[name](seed=seed, **kwargs)
    n = len(graphs)
    if name in ("planar", "sbm"):
        test_len = int(round(n * 0.2))
        train_len = int(round((n - test_len) * 0.8))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1234)).tolist()  # random_split's draw
        train = [graphs[i] for i in perm[:train_len]]
        val = [graphs[i] for i in perm[train_len: n - test_len]]
        test = [graphs[i] for i in perm[n - test_len:]]
        return GraphDataset(name, train=train, test=test, val=val)
    if split_seed is None:
        perm = list(range(n))
    else:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(split_seed))).tolist()
    test_size = int(test_split * n)
    if test_size < 1 or test_size >= n:
        raise ValueError(f"test_split={test_split} leaves {test_size} of {n} graphs for the test set")
    shuffled = [graphs[i] for i in perm]
    return GraphDataset(name, train=shuffled[test_size:], test=shuffled[:test_size])


# ------------------------------------------------------------------------------------ conversions


def degree_features(adj: Tensor, flags: Tensor, max_feat_num: int) -> Tensor:
    """GDSS's ``init="deg"``: one-hot node degrees ``(B, N, max_feat_num)``, zero on padded nodes."""
    deg = adj.sum(-1).round().long()
    if deg.numel() and int(deg.max()) >= max_feat_num:
        raise ValueError(f"a node has degree {int(deg.max())}, which needs max_feat_num > {int(deg.max())}, "
                         f"got max_feat_num={max_feat_num}")
    return F.one_hot(deg, max_feat_num).to(adj.dtype) * flags.unsqueeze(-1).to(adj.dtype)


def _is_pyg(obj) -> bool:
    if not any(c.__module__.startswith("torch_geometric") for c in type(obj).__mro__):
        return False  # a cheap test first: torch_geometric is imported only for PyG objects
    from torch_geometric.data import Data

    return isinstance(obj, Data)


def _is_pyg_batch(obj) -> bool:
    from torch_geometric.data import Batch

    return isinstance(obj, Batch)


def graph_kind(graphs) -> str:
    """``"networkx"`` (a list of networkx graphs), ``"pyg_batch"``, ``"pyg_list"`` (a list of ``Data``), ``"pyg"``
    (one ``Data``) or ``"dense"`` (a triple ``(x, adj, flags)`` of tensors)."""
    if isinstance(graphs, nx.Graph):
        raise TypeError("give a list of networkx graphs, not a single graph")
    if _is_pyg(graphs):
        return "pyg_batch" if _is_pyg_batch(graphs) else "pyg"
    if isinstance(graphs, (tuple, list)) and len(graphs) == 3 and all(isinstance(t, Tensor) for t in graphs):
        return "dense"
    if isinstance(graphs, (list, tuple)) and graphs:
        if all(isinstance(g, nx.Graph) for g in graphs):
            return "networkx"
        if all(_is_pyg(g) for g in graphs):
            return "pyg_list"
    raise TypeError(
        "graphs must be a non-empty list of networkx graphs, a torch_geometric Data / Batch / list of Data, or "
        f"a dense triple (x, adj, flags) of tensors; got {type(graphs).__name__}"
    )


def _check_dense(x: Tensor, adj: Tensor, flags: Tensor) -> None:
    if adj.ndim != 3 or adj.shape[1] != adj.shape[2]:
        raise ValueError(f"adj must have shape (B, N, N), got {tuple(adj.shape)}")
    b, n = adj.shape[:2]
    if x.ndim != 3 or x.shape[:2] != (b, n):
        raise ValueError(f"x must have shape ({b}, {n}, F), got {tuple(x.shape)}")
    if flags.shape != (b, n):
        raise ValueError(f"flags must have shape ({b}, {n}), got {tuple(flags.shape)}")


def to_dense(graphs, max_node_num: int | None = None, max_feat_num: int | None = None, init: str = "deg",
             dtype: torch.dtype = torch.float32) -> tuple[tuple[Tensor, Tensor, Tensor], str]:
    """``((x, adj, flags), kind)`` of ``graphs`` in any supported container (see :func:`graph_kind`).

    ``adj`` holds edge weights (networkx ``weight``, PyG ``edge_attr`` when 1-D, else 1); ``flags`` marks the
    graph's nodes (isolated ones included). Node features: a dense input keeps its ``x``; PyG ``Data.x`` and
    the networkx node attribute ``x`` (as :func:`from_dense` writes it) are kept with ``init="data"``;
    otherwise ``init`` is ``"deg"`` (one-hot degree, ``max_feat_num`` classes, default max degree + 1),
    ``"ones"`` or ``"zeros"`` (``max_feat_num`` default 1). ``max_node_num`` defaults to the largest graph.
    The graphs must be undirected (GDSS's adjacency is symmetric): a networkx ``DiGraph`` or multigraph, or
    a PyG ``edge_index`` that holds an edge in one direction only, is refused naming the graph.
    """
    kind = graph_kind(graphs)
    if kind == "dense":
        x, adj, flags = graphs
        _check_dense(x, adj, flags)
        return (x, adj, flags), kind
    if init not in ("deg", "ones", "zeros", "data"):
        raise ValueError(f"unknown node feature init {init!r}; choose 'deg', 'ones', 'zeros' or 'data'")
    feats: list[Tensor | None] = []
    if kind == "networkx":
        for i, g in enumerate(graphs):
            if g.is_directed() or g.is_multigraph():
                raise ValueError(f"graph {i} is a {type(g).__name__}: GDSS models simple undirected graphs "
                                 f"(convert with nx.Graph(g) or g.to_undirected())")
        adjs = [torch.as_tensor(nx.to_numpy_array(g, nodelist=list(g.nodes)), dtype=dtype) for g in graphs]
        if init == "data":
            for i, g in enumerate(graphs):
                lacking = [v for v in g.nodes if "x" not in g.nodes[v]]
                if lacking:
                    raise ValueError(f"init='data' but node {lacking[0]!r} of graph {i} has no attribute 'x'")
                feats.append(torch.as_tensor([g.nodes[v]["x"] for v in g.nodes], dtype=dtype).reshape(len(g), -1))
        else:
            feats = [None] * len(adjs)
    else:
        datas = graphs.to_data_list() if kind == "pyg_batch" else ([graphs] if kind == "pyg" else list(graphs))
        adjs = []
        for d in datas:
            n = int(d.num_nodes)
            a = torch.zeros(n, n, dtype=dtype)
            ei = d.edge_index
            w = getattr(d, "edge_attr", None)
            w = w.to(dtype) if w is not None and w.ndim == 1 else torch.ones(ei.shape[1], dtype=dtype)
            a[ei[0], ei[1]] = w
            if not torch.equal(a, a.T):
                raise ValueError(f"graph {len(adjs)}'s edge_index holds an edge in one direction only: GDSS models "
                                 f"undirected graphs (give both directions, e.g. torch_geometric.utils.to_undirected)")
            adjs.append(a)
            if init == "data" and getattr(d, "x", None) is None:
                raise ValueError("init='data' but a Data object has no x")
            feats.append(d.x.to(dtype) if init == "data" else None)
    sizes = [a.shape[0] for a in adjs]
    n_max = max(sizes) if max_node_num is None else int(max_node_num)
    if max(sizes) > n_max:
        raise ValueError(f"a graph has {max(sizes)} nodes, more than max_node_num={n_max}")
    b = len(adjs)
    adj = torch.zeros(b, n_max, n_max, dtype=dtype)
    flags = torch.zeros(b, n_max, dtype=dtype)
    for i, a in enumerate(adjs):
        adj[i, : sizes[i], : sizes[i]] = a
        flags[i, : sizes[i]] = 1
    if init == "data":
        f = feats[0].shape[-1]
        x = torch.zeros(b, n_max, f, dtype=dtype)
        for i, v in enumerate(feats):
            x[i, : sizes[i]] = v
    elif init == "deg":
        deg_max = int((adj != 0).sum(-1).max()) if b else 0
        x = degree_features((adj != 0).to(dtype), flags, deg_max + 1 if max_feat_num is None else max_feat_num)
    else:
        f = 1 if max_feat_num is None else max_feat_num
        x = (torch.ones if init == "ones" else torch.zeros)(b, n_max, f, dtype=dtype) * flags.unsqueeze(-1)
    return (x, adj, flags), kind


def _graph_sizes(flags: Tensor) -> list[int]:
    """Node counts from ``flags``; the real nodes must come first (GDSS pads at the end)."""
    sizes = flags.gt(0.5).sum(-1).tolist()
    for i, n in enumerate(sizes):
        if bool(flags[i, n:].gt(0.5).any()):
            raise ValueError(f"flags of graph {i} are not a prefix of ones (padding must come last)")
    return [int(s) for s in sizes]


def from_dense(x: Tensor, adj: Tensor, flags: Tensor, kind: str = "networkx"):
    """The dense triple in the container ``kind`` (:func:`graph_kind`'s names): the inverse of :func:`to_dense`.

    networkx graphs get nodes ``0..n-1`` with attribute ``x`` (feature vector) and edges ``{i, j}`` where
    ``adj[i, j] != 0`` (a ``weight`` attribute unless it is 1); PyG ``Data`` get ``x``, ``edge_index`` (both
    directions) and ``edge_attr`` when a weight is not 1 (in a ``pyg_batch`` every graph gets it when any
    graph has one, ones where it has none: a Batch takes its keys from the first graph).
    """
    _check_dense(x, adj, flags)
    if kind == "dense":
        return x, adj, flags
    sizes = _graph_sizes(flags)
    if kind == "networkx":
        out = []
        for i, n in enumerate(sizes):
            g = nx.Graph()
            g.add_nodes_from((v, {"x": x[i, v].tolist()}) for v in range(n))
            a = adj[i, :n, :n]
            for u, v in torch.nonzero(torch.triu(a, diagonal=1) != 0).tolist():
                w = float(a[u, v])
                g.add_edge(u, v, **({} if w == 1.0 else {"weight": w}))
            out.append(g)
        return out
    if kind in ("pyg", "pyg_list", "pyg_batch"):
        from torch_geometric.data import Batch, Data

        datas, weighted = [], []
        for i, n in enumerate(sizes):
            a = adj[i, :n, :n]
            ei = torch.nonzero(a != 0).t().contiguous()
            datas.append(Data(x=x[i, :n].clone(), edge_index=ei, num_nodes=n))
            weighted.append(a[ei[0], ei[1]])
        every = kind == "pyg_batch" and any(bool((w != 1).any()) for w in weighted)
        for d, w in zip(datas, weighted, strict=True):
            if every or bool((w != 1).any()):
                d.edge_attr = w
        if kind == "pyg":
            if len(datas) != 1:
                raise ValueError(f"kind 'pyg' is one Data object, but the batch holds {len(datas)} graphs")
            return datas[0]
        return Batch.from_data_list(datas) if kind == "pyg_batch" else datas
    raise ValueError(f"unknown graph container {kind!r}; choose networkx, pyg, pyg_list, pyg_batch or dense")


def dense_to_networkx(adj: Tensor, flags: Tensor | None = None, threshold: float = 0.5) -> list[nx.Graph]:
    """GDSS's ``adjs_to_graphs`` for evaluation: binarise ``adj >= threshold``, drop self-loops and isolated
    nodes; an empty graph becomes a single node. ``flags`` (optional) zeroes padded nodes first."""
    a = (adj >= threshold).to(torch.float32)
    if flags is not None:
        a = a * flags[:, :, None] * flags[:, None, :]
    out = []
    for m in a.cpu().numpy():
        g = nx.from_numpy_array(m)
        g.remove_edges_from(nx.selfloop_edges(g))
        g.remove_nodes_from(list(nx.isolates(g)))
        if g.number_of_nodes() < 1:
            g.add_node(1)
        out.append(g)
    return out

