"""graph.data: benchmark generators reproduce their definitions; splits; container conversions round trip."""

import networkx as nx
import numpy as np
import pytest
import torch

from graph.data import (
    community_small_graphs,
    dense_to_networkx,
    from_dense,
    graph_kind,
    grid_graphs,
    load_graph_dataset,
    planar_graphs,
    read_graphs,
    sbm_graphs,
    to_dense,
    write_graphs,
)


def test_community_small_is_gdss_generator():
    graphs = community_small_graphs(100, seed=3)
    assert len(graphs) == 100
    sizes = {g.number_of_nodes() for g in graphs}
    assert sizes <= {12, 14, 16, 18, 20} and len(sizes) >= 4  # 2 * (max_nodes // 2), max_nodes in 12..20
    bridges = []
    for g in graphs:
        k = g.number_of_nodes() // 2
        # the two communities are G(k, 0.7) drawn with networkx seeds 0 and 1 (GDSS's n_community)
        for i, part in enumerate((range(k), range(k, 2 * k))):
            ref = nx.gnp_random_graph(k, 0.7, seed=i)
            sub = nx.convert_node_labels_to_integers(g.subgraph(part))
            assert sorted(sub.edges()) == sorted(ref.edges())
        cross = sum(1 for u, v in g.edges() if (u < k) != (v < k))
        assert cross >= 1 and nx.is_connected(g)
        bridges.append(cross / (k * k))
    # inter-community pairs are bridged with probability 0.05 * 2 / k (at least one bridge per graph)
    ks = np.array([g.number_of_nodes() // 2 for g in graphs])
    assert np.mean(bridges) == pytest.approx(np.mean(np.maximum(0.1 / ks, 1 / ks**2)), rel=0.35)
    intra = [nx.density(nx.gnp_random_graph(k, 0.7, seed=i)) for k in range(6, 11) for i in (0, 1)]
    assert 0.55 < np.mean(intra) < 0.85


def test_community_small_seeded_and_split():
    a = load_graph_dataset("community_small", seed=1)
    b = load_graph_dataset("community_small", seed=1)
    assert len(a.train) == 80 and len(a.test) == 20 and not a.val
    assert [sorted(g.edges()) for g in a.test] == [sorted(g.edges()) for g in b.test]
    assert a.max_degree <= 9  # seed 1 fits GDSS's 10 one-hot degree features
    c = load_graph_dataset("community_small", seed=1, split_seed=5)
    key = lambda gs: sorted(tuple(sorted(g.edges())) for g in gs)  # noqa: E731
    assert key(c.train + c.test) == key(a.train + a.test) and key(c.test) != key(a.test)


def test_grid_graphs():
    graphs = grid_graphs()
    assert len(graphs) == 100
    dims = [(m, n) for m in range(10, 20) for n in range(10, 20)]
    for g, (m, n) in zip(graphs, dims):
        assert g.number_of_nodes() == m * n and g.number_of_edges() == m * (n - 1) + n * (m - 1)
        assert max(d for _, d in g.degree()) == 4
    ds = load_graph_dataset("grid")
    assert len(ds.train) == 80 and len(ds.test) == 20 and ds.max_node_num <= 361


def test_planar_graphs_and_spectre_split():
    graphs = planar_graphs(10, seed=0)
    for g in graphs:
        n, e = g.number_of_nodes(), g.number_of_edges()
        assert n == 64 and nx.check_planarity(g)[0] and nx.is_connected(g)
        assert 2 * n - 3 <= e <= 3 * n - 6  # a triangulation of a point set: 3n - 3 - (hull size) edges
    ds = load_graph_dataset("planar")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (128, 32, 40)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1234)).tolist()
    split = torch.utils.data.random_split(range(200), [128, 32, 40], generator=torch.Generator().manual_seed(1234))
    assert list(split[2].indices) == perm[160:]


def test_sbm_graphs_statistics():
    graphs = sbm_graphs(20, seed=0)
    intra_e = intra_p = inter_e = inter_p = 0
    for g in graphs:
        blocks = g.graph["partition"]
        assert 2 <= len(blocks) <= 5 and all(20 <= len(b) <= 40 for b in blocks)
        block = {v: i for i, b in enumerate(blocks) for v in b}
        for u, v in g.edges():
            if block[u] == block[v]:
                intra_e += 1
            else:
                inter_e += 1
        sizes = np.array([len(b) for b in blocks])
        intra_p += int((sizes * (sizes - 1) // 2).sum())
        inter_p += int((sizes.sum() ** 2 - (sizes**2).sum()) // 2)
    assert intra_e / intra_p == pytest.approx(0.3, abs=0.02)
    assert inter_e / inter_p == pytest.approx(0.005, abs=0.003)


def test_ego_small_and_bad_names():
    with pytest.raises(ValueError, match="cannot be downloaded.*graph_file=.*ego_small.pkl"):
        load_graph_dataset("ego_small")
    with pytest.raises(ValueError, match="unknown graph data set"):
        load_graph_dataset("lobster")
    with pytest.raises(ValueError, match="seed"):
        community_small_graphs(10, seed=-1)
    with pytest.raises(ValueError, match="num_graphs"):
        load_graph_dataset("grid", num_graphs=5)


def _edges(g):
    return sorted(tuple(sorted(e)) for e in g.edges())


def _same_graph(a, b):
    """Equal node order and adjacency (what to_dense sees), not only isomorphic."""
    return list(a.nodes) == list(b.nodes) and np.array_equal(nx.to_numpy_array(a), nx.to_numpy_array(b))


def test_graph_files_round_trip_graph6_sparse6_and_gdss_pickles(tmp_path):
    import pickle

    graphs = community_small_graphs(12, seed=2)
    graphs[3].add_node(99)  # an isolated node survives (graph6 keeps the node count)
    path = write_graphs(graphs, tmp_path / "g.g6")
    back = read_graphs(path)
    assert len(back) == 12 and all(_same_graph(nx.convert_node_labels_to_integers(a), b) for a, b in zip(graphs, back))
    assert back[3].number_of_nodes() == graphs[3].number_of_nodes() and nx.number_of_isolates(back[3]) >= 1
    assert back == nx.read_graph6(path) or all(_same_graph(a, b) for a, b in zip(back, nx.read_graph6(path)))
    s6 = tmp_path / "g.s6"
    with open(s6, "wb") as f:
        for g in graphs:
            nx.write_sparse6(nx.convert_node_labels_to_integers(g), f, header=False)
    assert all(_same_graph(a, b) for a, b in zip(read_graphs(s6), back))
    # GraphRNN / GDSS pickles: a list of networkx graphs with arbitrary node labels, read in order, labels kept
    ego = nx.relabel_nodes(nx.ego_graph(nx.karate_club_graph(), 0, radius=1), lambda v: 1000 + 7 * v)
    pkl = tmp_path / "g.pkl"
    pkl.write_bytes(pickle.dumps([*graphs[:5], ego]))
    got = read_graphs(pkl)
    assert all(_same_graph(a, b) for a, b in zip([*graphs[:5], ego], got)) and list(got[5].nodes) == list(ego.nodes)
    # The file's order is the split's order when split_seed is None (GDSS: the first 20 % are the test set)
    ds = load_graph_dataset("graph_file", split_seed=None, graph_file=path, test_split=0.25)
    assert len(ds.test) == 3 and all(_same_graph(a, b) for a, b in zip(ds.test + ds.train, back))
    shuffled = load_graph_dataset("graph_file", split_seed=0, graph_file=path, test_split=0.25)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    assert all(_same_graph(a, back[i]) for a, i in zip(shuffled.test + shuffled.train, perm))
    ego_ds = load_graph_dataset("ego_small", split_seed=None, graph_file=pkl)  # ego_small: from a file only
    assert len(ego_ds.test) == 1 and _same_graph(ego_ds.test[0], graphs[0])


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):  # unpickling this would create the file
        return (open, (str(self.target), "w"))


def test_graph_files_refuse_code_and_bad_graphs_naming_them(tmp_path):
    import pickle

    evil = tmp_path / "evil.pkl"
    marker = tmp_path / "pwned"
    evil.write_bytes(pickle.dumps([nx.path_graph(3), _Payload(marker)]))
    with pytest.raises(ValueError, match=r"evil\.pkl.*refusing to unpickle (io|builtins)\.open"):
        read_graphs(evil)
    assert not marker.exists()  # nothing was executed
    cases = {
        "directed.pkl": ([nx.DiGraph([(0, 1)])], r"refusing to unpickle networkx\.classes\.digraph\.DiGraph"),
        "multi.pkl": ([nx.path_graph(2), nx.MultiGraph([(0, 1)])], r"networkx\.classes\.multigraph\.MultiGraph"),
        "dict.pkl": ([nx.path_graph(2), {"edges": [(0, 1)]}], "item 1 is a dict, not an undirected simple"),
        "loop.pkl": ([nx.path_graph(3), nx.Graph([(0, 0), (0, 1)])], "graph 1 has 1 self-loop"),
        "empty_graph.pkl": ([nx.Graph()], "graph 0 has no nodes"),
        "none.pkl": ([], "holds no graphs"),
    }
    for name, (obj, msg) in cases.items():
        (tmp_path / name).write_bytes(pickle.dumps(obj))
        with pytest.raises(ValueError, match=msg):
            read_graphs(tmp_path / name)
    (tmp_path / "bad.g6").write_text("this is not graph6\n")
    with pytest.raises(ValueError, match="bad.g6.*not valid g6"):
        read_graphs(tmp_path / "bad.g6")
    (tmp_path / "g.txt").write_text("0 1\n")
    with pytest.raises(ValueError, match="unknown suffix '.txt'"):
        read_graphs(tmp_path / "g.txt")
    with pytest.raises(FileNotFoundError, match="nope.g6"):
        read_graphs(tmp_path / "nope.g6")
    with pytest.raises(ValueError, match="write_graphs writes graph6"):
        write_graphs([nx.path_graph(2)], tmp_path / "out.pkl")
    with pytest.raises(ValueError, match="graph 1 is not an undirected simple graph"):
        write_graphs([nx.path_graph(2), nx.Graph([(0, 0)])], tmp_path / "out.g6")
    assert not (tmp_path / "out.g6").exists()
    with pytest.raises(ValueError, match="needs the path of a graph file"):
        load_graph_dataset("graph_file")
    with pytest.raises(ValueError, match="num_graphs=5 applies to generated"):
        load_graph_dataset("community_small", num_graphs=5, graph_file=write_graphs([nx.path_graph(3)] * 5,
                                                                                  tmp_path / "five.g6"))


def test_networkx_dense_round_trip_and_degree_features():
    graphs = load_graph_dataset("community_small", seed=1).test
    (x, adj, flags), kind = to_dense(graphs, max_node_num=20, max_feat_num=10)
    assert kind == "networkx" and x.shape == (20, 20, 10) and adj.shape == (20, 20, 20)
    for i, g in enumerate(graphs):
        n = g.number_of_nodes()
        assert flags[i].sum() == n and flags[i, :n].all()
        degs = torch.tensor([g.degree(v) for v in g.nodes])
        assert torch.equal(x[i, :n].argmax(-1), degs) and x[i, n:].abs().sum() == 0
        assert torch.equal(adj[i], adj[i].T) and adj[i, n:].abs().sum() == 0
    back = from_dense(x, adj, flags, kind)
    assert [_edges(a) for a in back] == [_edges(b) for b in graphs]
    (x2, adj2, flags2), _ = to_dense(back, max_node_num=20, max_feat_num=10)
    assert torch.equal(x2, x) and torch.equal(adj2, adj) and torch.equal(flags2, flags)


def test_pyg_round_trips():
    from torch_geometric.data import Batch, Data

    g = torch.Generator().manual_seed(0)
    datas = []
    for n in (3, 5, 4):
        a = torch.triu((torch.rand(n, n, generator=g) < 0.6).float(), 1)
        a = a + a.T
        datas.append(Data(x=torch.randn(n, 2, generator=g), edge_index=torch.nonzero(a).t(), num_nodes=n))
    batch = Batch.from_data_list(datas)
    for obj, kind in ((batch, "pyg_batch"), (datas, "pyg_list"), (datas[1], "pyg")):
        (x, adj, flags), k = to_dense(obj, init="data")
        assert k == kind == graph_kind(obj) and x.shape[:2] == (len(flags), 5)
        back = from_dense(x, adj, flags, k)
        if kind == "pyg_batch":
            assert isinstance(back, Batch) and torch.equal(back.edge_index, batch.edge_index)
            assert torch.equal(back.x, batch.x) and torch.equal(back.batch, batch.batch)
        else:
            pairs = zip(back, datas) if kind == "pyg_list" else [(back, datas[1])]
            for b, d in pairs:
                assert torch.equal(b.x, d.x) and torch.equal(b.edge_index, d.edge_index)
    # weighted adjacency (bond orders) travels as 1-D edge_attr and back
    (x, adj, flags), _ = to_dense(batch, init="ones", max_feat_num=1)
    adj = adj * 2.0
    again, _ = to_dense(from_dense(x, adj, flags, "pyg_list"), init="ones", max_feat_num=1)
    assert torch.equal(again[1], adj)
    # networkx <-> PyG via the dense form
    nxg = from_dense(x, adj, flags, "networkx")
    for h, d in zip(nxg, datas):
        weights = nx.get_edge_attributes(h, "weight")
        assert h.number_of_edges() == d.num_edges // 2 and set(weights.values()) <= {2.0}
        assert len(weights) == h.number_of_edges()


def test_pyg_batch_keeps_bond_orders_whichever_graph_comes_first():
    # a Batch takes its keys from its first graph: every graph needs edge_attr when any has a weight
    x = torch.ones(2, 3, 1)
    single = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float32)
    double = torch.tensor([[0, 2, 0], [2, 0, 0], [0, 0, 0]], dtype=torch.float32)
    f3, f2 = torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 1, 0])
    for adj, flags in ((torch.stack([single, double]), torch.stack([f3, f2])),
                       (torch.stack([double, single]), torch.stack([f2, f3]))):
        batch = from_dense(x, adj, flags, "pyg_batch")
        (_, back, _), _ = to_dense(batch, max_node_num=3, init="ones")
        assert torch.equal(back, adj)


def test_directed_input_is_refused_naming_the_graph():
    from torch_geometric.data import Data

    with pytest.raises(ValueError, match="graph 1 is a DiGraph"):
        to_dense([nx.path_graph(3), nx.path_graph(3, create_using=nx.DiGraph)])
    with pytest.raises(ValueError, match="graph 0 is a MultiGraph"):
        to_dense([nx.MultiGraph([(0, 1), (0, 1)])])
    one_way = Data(edge_index=torch.tensor([[0, 1, 2], [1, 2, 3]]), num_nodes=4)  # each edge stored once
    with pytest.raises(ValueError, match="graph 0's edge_index holds an edge in one direction only"):
        to_dense([one_way])


def test_networkx_node_features_round_trip_with_init_data():
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    adj = torch.zeros(2, 4, 4)
    adj[:, 0, 1] = adj[:, 1, 0] = 1.0
    flags = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 0]])
    x = x * flags.unsqueeze(-1)
    graphs = from_dense(x, adj, flags, "networkx")
    (x2, adj2, flags2), _ = to_dense(graphs, max_node_num=4, init="data")
    assert torch.equal(x2, x) and torch.equal(adj2, adj) and torch.equal(flags2, flags)
    del graphs[1].nodes[2]["x"]
    with pytest.raises(ValueError, match="node 2 of graph 1 has no attribute 'x'"):
        to_dense(graphs, init="data")


def test_dense_input_passes_through_and_errors():
    x, adj, flags = torch.zeros(2, 4, 3), torch.zeros(2, 4, 4), torch.ones(2, 4)
    (x2, adj2, fl2), kind = to_dense((x, adj, flags))
    assert kind == "dense" and x2 is x and from_dense(x, adj, flags, "dense")[1] is adj
    with pytest.raises(TypeError, match="networkx"):
        to_dense(nx.path_graph(3))
    with pytest.raises(TypeError):
        to_dense([1, 2])
    with pytest.raises(ValueError, match="max_node_num"):
        to_dense([nx.path_graph(5)], max_node_num=3)
    with pytest.raises(ValueError, match="max_feat_num"):
        to_dense([nx.star_graph(4)], max_feat_num=3)
    with pytest.raises(ValueError, match="flags"):
        from_dense(x, adj, torch.ones(2, 3))
    with pytest.raises(ValueError, match="prefix"):
        from_dense(x, adj, torch.tensor([[1.0, 0, 1, 0], [1, 1, 1, 1]]))


def test_dense_to_networkx_gdss_rules():
    adj = torch.zeros(2, 4, 4)
    adj[0, 0, 1] = adj[0, 1, 0] = 0.7  # one edge above the 0.5 threshold; nodes 2, 3 isolated
    adj[0, 2, 2] = 1.0  # a self-loop is dropped
    adj[1, 0, 1] = adj[1, 1, 0] = 0.3  # below threshold: an empty graph becomes one node
    g0, g1 = dense_to_networkx(adj)
    assert _edges(g0) == [(0, 1)] and g0.number_of_nodes() == 2
    assert g1.number_of_nodes() == 1 and g1.number_of_edges() == 0
