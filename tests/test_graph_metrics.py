"""graph.metrics: ORCA orbit counts against brute-force enumeration, kernels against hand-computed values
and scipy's 1-D Wasserstein distance, MMD invariants (zero on equal sets, growing with perturbation)."""

import math

import networkx as nx
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from graph.metrics import (
    clustering_histogram,
    clustering_mmd,
    compute_mmd,
    degree_mmd,
    evaluate_graphs,
    gaussian_emd_kernel,
    gaussian_kernel,
    gaussian_tv_kernel,
    orbit_counts,
    orbit_counts_bruteforce,
    orbit_mmd,
    orbit_statistic,
    structure_stats,
)


@pytest.mark.parametrize("seed", range(12))
def test_orbit_counts_match_bruteforce(seed):
    rng = np.random.default_rng(seed)
    n, p = int(rng.integers(5, 11)), float(rng.uniform(0.15, 0.85))
    g = nx.gnp_random_graph(n, p, seed=seed)
    assert np.array_equal(orbit_counts(g), orbit_counts_bruteforce(g))


def test_orbit_counts_bruteforce_on_structured_graphs():
    for g in (nx.petersen_graph(), nx.grid_2d_graph(3, 4), nx.barbell_graph(4, 2), nx.wheel_graph(7), nx.empty_graph(3)):
        assert np.array_equal(orbit_counts(g), orbit_counts_bruteforce(g))


def test_orbit_numbering_on_single_graphlets():
    """Each 4-node graphlet puts its nodes in the orbits of ORCA's numbering (Przulj's figure)."""
    def row_orbits(g):  # the 4-node orbit (4..14) each node sits in, in node order
        c = orbit_counts(g)[:, 4:]
        assert (c.sum(1) == 1).all()
        return (c.argmax(1) + 4).tolist()

    assert row_orbits(nx.path_graph(4)) == [4, 5, 5, 4]
    assert row_orbits(nx.star_graph(3)) == [7, 6, 6, 6]
    assert row_orbits(nx.cycle_graph(4)) == [8] * 4
    paw = nx.Graph([(0, 1), (1, 2), (2, 0), (2, 3)])
    assert row_orbits(paw) == [10, 10, 11, 9]
    diamond = nx.Graph([(0, 1), (1, 2), (2, 3), (3, 0), (0, 2)])
    assert row_orbits(diamond) == [13, 12, 13, 12]
    assert row_orbits(nx.complete_graph(4)) == [14] * 4
    tri = orbit_counts(nx.complete_graph(3))
    assert tri[:, 3].tolist() == [1, 1, 1] and tri[:, 0].tolist() == [2, 2, 2]
    path3 = orbit_counts(nx.path_graph(3))
    assert path3[:, 1].tolist() == [1, 0, 1] and path3[:, 2].tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="symmetric"):
        orbit_counts(np.array([[0, 1], [0, 0]]))


def test_kernels_against_hand_computed_values():
    e0, e1 = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    assert gaussian_emd_kernel(e0, e1)[0, 0] == pytest.approx(math.exp(-0.5))  # EMD 1, sigma 1
    # GDSS's clustering kernel: bins 0.01 apart in clustering units, sigma 0.1
    assert gaussian_emd_kernel(e0, e1, sigma=0.1, distance_scaling=100)[0, 0] == pytest.approx(math.exp(-0.005))
    assert gaussian_kernel(e0, e1)[0, 0] == pytest.approx(math.exp(-1.0))  # ||.||^2 = 2
    assert gaussian_tv_kernel(e0, e1)[0, 0] == pytest.approx(math.exp(-0.5))  # TV = 1
    assert gaussian_kernel(np.array([[3.0, 0.0]]), np.array([[0.0, 4.0]]), sigma=30)[0, 0] == pytest.approx(
        math.exp(-25 / 1800))
    # MMD of two one-element sets: k(a, a) + k(b, b) - 2 k(a, b); histograms of different lengths are padded
    assert compute_mmd([np.array([2.0])], [np.array([0.0, 3.0])], "gaussian_emd") == pytest.approx(
        2 - 2 * math.exp(-0.5))
    assert compute_mmd([np.array([1.0, 1.0])], [np.array([1.0, 1.0, 2.0])], "gaussian_tv") == pytest.approx(
        2 - 2 * math.exp(-(0.5**2) / 2))  # pmfs (.5, .5, 0) and (.25, .25, .5): TV = 0.5


def test_gaussian_emd_is_the_wasserstein_distance():
    rng = np.random.default_rng(0)
    p, q = rng.random((4, 7)), rng.random((5, 7))
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    k = gaussian_emd_kernel(p, q, sigma=2.0, distance_scaling=3.0)
    support = np.arange(7)
    for i in range(4):
        for j in range(5):
            w = wasserstein_distance(support, support, p[i], q[j]) / 3.0
            assert k[i, j] == pytest.approx(math.exp(-w * w / 8.0), rel=1e-10)


def _perturb(graphs, frac, seed):
    rng = np.random.default_rng(seed)
    out = []
    for g in graphs:
        h = g.copy()
        edges = list(h.edges())
        drop = rng.choice(len(edges), int(frac * len(edges)), replace=False)
        h.remove_edges_from([edges[i] for i in drop])
        out.append(h)
    return out


def test_mmd_zero_on_equal_sets_and_grows_with_perturbation():
    ref = [nx.gnp_random_graph(int(n), 0.5, seed=i) for i, n in enumerate(np.linspace(10, 16, 12))]
    for fn in (degree_mmd, clustering_mmd, orbit_mmd):
        assert fn(ref, ref) == pytest.approx(0.0, abs=1e-12)
        vals = [fn(ref, _perturb(ref, f, 0)) for f in (0.1, 0.3, 0.6)]
        assert 0 < vals[0] < vals[1] < vals[2], (fn.__name__, vals)
    out = evaluate_graphs(ref, _perturb(ref, 0.3, 1))
    assert set(out) == {"degree", "cluster", "orbit"} and all(v > 0 for v in out.values())
    tv = evaluate_graphs(ref, ref, protocol="spectre")
    assert all(abs(v) < 1e-9 for v in tv.values())


def test_statistics_and_errors():
    g = nx.complete_graph(4)
    assert clustering_histogram(g)[-1] == 4  # clustering 1.0 falls in the last bin
    assert orbit_statistic(g)[14] == 1 and orbit_statistic(nx.empty_graph(0)).shape == (15,)
    with pytest.raises(ValueError, match="protocol"):
        evaluate_graphs([g], [g], protocol="nope")
    with pytest.raises(ValueError, match="statistic"):
        evaluate_graphs([g], [g], methods=("spectral",))
    with pytest.raises(TypeError, match="networkx"):
        degree_mmd([g], [np.eye(3)])
    with pytest.raises(ValueError, match="empty"):
        degree_mmd([], [g])


def test_structure_stats_by_hand():
    # K3 + P3 (two components), the star K1,3, two isolated nodes; and a graph without nodes, left out
    a = nx.disjoint_union(nx.complete_graph(3), nx.path_graph(3))
    b = nx.star_graph(3)
    c = nx.empty_graph(2)
    s = structure_stats([a, b, c, nx.Graph()])
    assert s == {"nodes": 4.0, "edges": round(8 / 3, 4), "triangles": round(1 / 3, 4), "components": round(5 / 3, 4),
                 "connected": round(1 / 3, 4), "clustering": round(0.5 / 3, 4), "isolated_nodes": round(2 / 12, 4),
                 "clustering_0_nodes": round(2 / 12, 4), "clustering_1_nodes": round(3 / 12, 4), "graphs": 3}
    with pytest.raises(ValueError, match="without nodes"):
        structure_stats([nx.Graph()])
    with pytest.raises(TypeError, match=r"graphs\[0\]"):
        structure_stats([[(0, 1)]])

