"""Dense graph batches: node masks, masking, noise, adjacency powers and quantisation (GDSS's ``graph_utils``).

A batch of graphs padded to ``N`` nodes is node features ``x`` ``(B, N, F)``, adjacency ``adj`` ``(B, N, N)``
(or a stack of channels ``(B, C, N, N)``) and ``flags`` ``(B, N)``, 1 for real nodes and 0 for padding.
The masking and noise functions are the generic ones of :mod:`core.system` under GDSS's names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from core.system import iid_noise, mask_nodes, mask_pairs, symmetric_noise

__all__ = [
    "node_flags",
    "mask_x",
    "mask_adjs",
    "gen_noise",
    "pow_tensor",
    "init_features",
    "graphs_to_tensor",
    "init_flags",
    "quantize",
    "quantize_mol",
]


def node_flags(adj: Tensor, eps: float = 1e-5) -> Tensor:
    """``(B, N)`` float flags of nodes with at least one edge: ``sum_j |adj_ij| > eps``.

    A ``(B, C, N, N)`` stack uses its first channel. Isolated nodes count as padding, as in GDSS.
    """
    flags = adj.abs().sum(-1).gt(eps).to(adj.dtype if adj.is_floating_point() else torch.float32)
    return flags[:, 0, :] if flags.ndim == 3 else flags


def mask_x(x: Tensor, flags: Tensor | None) -> Tensor:
    """Zero the feature rows of padded nodes: ``x`` ``(B, N, F)``."""
    return mask_nodes(x, flags)


def mask_adjs(adjs: Tensor, flags: Tensor | None) -> Tensor:
    """Zero rows and columns of padded nodes: ``adjs`` ``(B, N, N)`` or ``(B, C, N, N)``."""
    return mask_pairs(adjs, flags)


def gen_noise(x: Tensor, flags: Tensor | None, sym: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """GDSS's ``gen_noise``: symmetric zero-diagonal noise for adjacency (``sym=True``), else i.i.d. node noise.

    Both draw one ``randn`` of ``x``'s shape first, so a seeded call matches GDSS's random stream.
    """
    return symmetric_noise(x, flags, generator) if sym else iid_noise(x, flags, generator)


def pow_tensor(adj: Tensor, cnum: int) -> Tensor:
    """Powers ``[A, A^2, ..., A^cnum]`` of ``(B, N, N)`` adjacency stacked as ``(B, cnum, N, N)`` channels."""
    if isinstance(cnum, bool) or not isinstance(cnum, int) or cnum < 1:
        raise ValueError(f"cnum must be a positive integer, got {cnum!r}")
    powers = [adj]
    for _ in range(cnum - 1):
        powers.append(torch.bmm(powers[-1], adj))
    return torch.stack(powers, dim=1)


def init_features(init: str, adjs: Tensor, nfeat: int = 10) -> Tensor:
    """Initial node features ``(B, N, nfeat)``: ``"zeros"``, ``"ones"`` or ``"deg"`` (one-hot degree), masked."""
    b, n = adjs.shape[0], adjs.shape[1]
    if init == "zeros":
        feature = adjs.new_zeros(b, n, nfeat, dtype=torch.float32)
    elif init == "ones":
        feature = adjs.new_ones(b, n, nfeat, dtype=torch.float32)
    elif init == "deg":
        deg = adjs.sum(dim=-1).to(torch.long)
        if int(deg.max()) >= nfeat:
            raise ValueError(
                f"a node has degree {int(deg.max())}, which needs nfeat > {int(deg.max())}, got nfeat={nfeat}"
            )
        feature = F.one_hot(deg, num_classes=nfeat).to(torch.float32)
    else:
        raise ValueError(f"unknown feature init {init!r}; choose 'zeros', 'ones' or 'deg'")
    return mask_x(feature, node_flags(adjs))


def _dense(graph) -> Tensor:
    """A square adjacency of one graph: a tensor, an array, or a networkx graph (in node order)."""
    if hasattr(graph, "nodes") and hasattr(graph, "edges"):
        import networkx as nx  # only needed for networkx input

        return torch.as_tensor(nx.to_numpy_array(graph, nodelist=list(graph.nodes)), dtype=torch.float32)
    a = torch.as_tensor(graph, dtype=torch.float32)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"a graph must be a square adjacency matrix, got shape {tuple(a.shape)}")
    return a


def graphs_to_tensor(graphs: Sequence, max_node_num: int) -> Tensor:
    """Stack graphs (adjacency matrices or networkx graphs) zero-padded to ``(len, max_node_num, max_node_num)``."""
    out = torch.zeros(len(graphs), max_node_num, max_node_num)
    for i, g in enumerate(graphs):
        a = _dense(g)
        if a.shape[0] > max_node_num:
            raise ValueError(f"graph {i} has {a.shape[0]} nodes, more than max_node_num={max_node_num}")
        out[i, : a.shape[0], : a.shape[0]] = a
    return out


def init_flags(
    graphs: Sequence,
    max_node_num: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    idx: Tensor | None = None,
) -> Tensor:
    """Node flags ``(batch_size, max_node_num)`` of graphs drawn with replacement from the training set.

    GDSS samples the sizes of generated graphs this way. ``idx`` fixes the picks (GDSS draws them with
    ``np.random.randint(0, len(graphs), batch_size)``); otherwise they come from ``generator``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if idx is None:
        idx = torch.randint(0, len(graphs), (batch_size,), generator=generator)
    idx = torch.as_tensor(idx, dtype=torch.long)
    if idx.shape != (batch_size,) or bool((idx < 0).any()) or bool((idx >= len(graphs)).any()):
        raise ValueError(f"idx must be {batch_size} indices into {len(graphs)} graphs, got {idx.tolist()}")
    return node_flags(graphs_to_tensor(graphs, max_node_num)[idx])


def quantize(adjs: Tensor, thr: float = 0.5) -> Tensor:
    """Binarise generated adjacency: 1 where ``adjs >= thr``, else 0."""
    return torch.where(adjs < thr, torch.zeros_like(adjs), torch.ones_like(adjs))


def quantize_mol(adjs: Tensor) -> Tensor:
    """Bond orders of generated molecules as int64.

    ``[0.5, 1.5) -> 1``, ``[1.5, 2.5) -> 2``, ``>= 2.5 -> 3``, anything below 0.5 -> 0 (GDSS ``quantize_mol``).
    """
    adjs = torch.as_tensor(adjs)
    out = torch.zeros(adjs.shape, dtype=torch.int64, device=adjs.device)
    for order, lo in ((1, 0.5), (2, 1.5), (3, 2.5)):
        out[adjs >= lo] = order
    return out
