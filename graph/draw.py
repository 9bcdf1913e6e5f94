"""PNG drawings of graphs: a grid of networkx graphs with spring layouts (GDSS ``utils/plot.py`` style)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import networkx as nx

__all__ = ["draw_graphs"]


def draw_graphs(graphs: Sequence[nx.Graph], path: str | Path, title: str | None = None, max_num: int = 16,
                ncols: int | None = None, seed: int = 0, node_size: float = 12.0, dpi: int = 150) -> Path:
    """Draw up to ``max_num`` graphs in a grid (``ncols`` columns, default ``ceil(sqrt(n))``) and save a PNG.

    Each panel shows one graph (isolated nodes dropped, as GDSS plots them) in a spring layout seeded with
    ``seed``, titled with its edge and node counts. Returns the written path.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    graphs = list(graphs)[:max_num]
    if not graphs:
        raise ValueError("draw_graphs needs at least one graph")
    for i, g in enumerate(graphs):
        if not isinstance(g, nx.Graph):
            raise TypeError(f"graphs[{i}] must be a networkx graph, got {type(g).__name__}")
    n = len(graphs)
    cols = ncols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows + (0.4 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, g in zip(axes.flat, graphs):
        g = g.copy()
        g.remove_nodes_from(list(nx.isolates(g)))
        loops = nx.number_of_selfloops(g)
        pos = nx.spring_layout(g, seed=seed)
        nx.draw_networkx_edges(g, pos, ax=ax, width=0.6, edge_color="black")
        nx.draw_networkx_nodes(g, pos, ax=ax, node_size=node_size, node_color="tab:blue")
        ax.set_title(f"e={g.number_of_edges() - loops}, n={g.number_of_nodes()}", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
