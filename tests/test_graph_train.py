"""graph.train through Hydra on community-small with a tiny model: trains, evaluates (metrics JSON, PNGs),
resumes to the same weights, graph.sample reproduces the run's samples, bad configs fail at start, and the
molecule interface (graph.molecules / graph.mol_metrics) is called as documented."""

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from core.engine.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
TINY = ("model.depth=2", "model.nhid=8", "model.adim=8", "model.num_layers=2", "model.c_hid=4", "model.c_final=2",
        "model.sde_x.num_scales=8", "model.sde_adj.num_scales=8", "trainer=smoke", "trainer.progress=false",
        "sampler.num_samples=6", "sampler.max_draw=4")


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import graph.train  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(REPO / "configs" / "graph"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def run(out, *overrides):
    from graph.train import train

    return train(compose(f"trainer.out_dir={out}", *TINY, *overrides))


def weights(out, step=6):
    from core.engine.checkpoint import load_checkpoint

    return load_checkpoint(Path(out) / "checkpoints" / f"ckpt_{step:08d}.pt")["model"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, run(out)


def test_train_writes_metrics_and_drawings(full_run):
    out, result = full_run
    assert result["step"] == 6 and torch.isfinite(torch.tensor(result["loss"]))
    assert {"loss_x", "loss_adj"} <= set(result)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics == result["eval"]
    assert metrics["num_samples"] == 6 and metrics["steps"] == 8 and metrics["nfe"] == 16  # Euler + Langevin
    for k in ("degree", "cluster", "orbit"):
        assert isinstance(metrics[k], float) and metrics[k] > -1e-9
    for png in ("samples.png", "test.png"):
        assert (out / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = torch.load(out / "eval" / "samples.pt", weights_only=True)
    adj, flags = samples["adj"], samples["flags"]
    assert adj.shape == (6, 20, 20) and torch.equal(adj, adj.transpose(1, 2))
    assert (adj * (1 - flags[:, :, None])).abs().sum() == 0  # padded nodes have no edges
    import networkx as nx

    from graph.data import dense_to_networkx, read_graphs
    from graph.utils import quantize

    g6 = read_graphs(out / "eval" / "samples.g6")  # the same graphs the metrics scored, as graph6
    want = [nx.convert_node_labels_to_integers(g) for g in dense_to_networkx(quantize(adj), flags)]  # in order
    assert len(g6) == 6 and all(list(a.nodes) == list(b.nodes) and set(map(frozenset, a.edges)) ==
                                set(map(frozenset, b.edges)) for a, b in zip(g6, want))
    from graph.metrics import structure_stats

    assert metrics["structure"] == structure_stats(g6) and metrics["structure"]["graphs"] == 6
    assert metrics["test_structure"]["graphs"] == 20 and metrics["test_structure"]["connected"] == 1.0
    info = json.loads((out / "run.json").read_text())
    assert info["train_graphs"] == 80 and info["test_graphs"] == 20 and info["model"]["x"] == "ScoreNetworkX"


def test_resume_gives_the_same_weights(tmp_path, full_run):
    full_dir, _ = full_run
    part = run(tmp_path / "part", "trainer.stop_at=3")
    assert part["step"] == 3 and "eval" not in part
    done = run(tmp_path / "part")
    assert done["step"] == 6 and "eval" in done
    a, b = weights(full_dir), weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sample_cli_reproduces_the_run(full_run):
    from graph.sample import main

    out, result = full_run
    main(["--run", str(out), "--tag", "again"])
    again = json.loads((out / "again" / "metrics.json").read_text())
    first = torch.load(out / "eval" / "samples.pt", weights_only=True)
    second = torch.load(out / "again" / "samples.pt", weights_only=True)
    assert torch.equal(first["adj"], second["adj"]) and torch.equal(first["flags"], second["flags"])
    assert {k: again[k] for k in ("degree", "cluster", "orbit")} == {k: result["eval"][k] for k in
                                                                      ("degree", "cluster", "orbit")}
    assert again["weights"] == "raw" and again["checkpoint_step"] == 6
    main(["--run", str(out), "--tag", "ema_s4", "--ema", "--solver", "s4", "--num", "3", "--steps", "4"])
    ema = json.loads((out / "ema_s4" / "metrics.json").read_text())
    assert ema["weights"] == "ema" and ema["nfe"] == 4 and ema["num_samples"] == 3


def _sample_error(capsys, argv):
    from graph.sample import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_sample_cli_names_another_runs_directory_or_checkpoint(full_run, tmp_path, capsys):
    # a text / image run was a KeyError 'sampler', another model's checkpoint load_state_dict's RuntimeError
    from core.engine.checkpoint import save_checkpoint

    out, _ = full_run
    text = tmp_path / "text_run"
    text.mkdir()
    (text / "run.json").write_text(json.dumps({"model": {"kind": "mdlm", "dim": 64}, "data": {"name": "files"},
                                               "tokenizer": {"kind": "char"}}))
    assert f"{text} is not a graph.train run: its run.json has no ['sampler']" in \
        _sample_error(capsys, ["--run", str(text)])
    image = tmp_path / "image_run"
    image.mkdir()
    (image / "run.json").write_text(json.dumps({"model": {"kind": "sit", "patch_size": 2}, "data": {"name": "digits"},
                                                "sampler": {"sampler": "euler"}}))
    assert f"{image} is not a graph.train run: its run.json's settings are not GDSS's" in \
        _sample_error(capsys, ["--run", str(image)])
    ckpt = save_checkpoint({"model": {"embed.weight": torch.zeros(5, 4)}, "step": 3}, tmp_path / "ckpt_00000003.pt")
    msg = _sample_error(capsys, ["--run", str(out), "--ckpt", str(ckpt)])
    assert f"{ckpt} does not fit the model of {out}'s run.json (graph.train, GDSS): missing " in msg
    assert "unexpected 1 (['embed.weight'])" in msg
    other = torch.load(out / "checkpoints" / "ckpt_00000006.pt", weights_only=True)
    other["model"] = {k: v[..., :1] if v.ndim else v for k, v in other["model"].items()}  # same names, other shapes
    ckpt = save_checkpoint(other, tmp_path / "ckpt_00000006.pt")
    msg = _sample_error(capsys, ["--run", str(out), "--ckpt", str(ckpt)])
    assert "does not fit the model of" in msg and "other shapes" in msg and "missing" not in msg
    ckpt = save_checkpoint({"weights": {}}, tmp_path / "ckpt_00000007.pt")
    assert "holds no model weights and step" in _sample_error(capsys, ["--run", str(out), "--ckpt", str(ckpt)])


@pytest.mark.parametrize("overrides, match", [
    (("data.name=ego_small",), "cannot be downloaded"),
    (("data=ego_small",), "cannot be downloaded.*graph_file"),
    (("data=graph_file",), "needs the path of a graph file"),
    (("data=graph_file", "data.graph_file=/nonexistent/g.g6"), "data.graph_file='/nonexistent/g.g6' is not a file"),
    (("data.graph_file=/nonexistent/g.g6",), "data.graph_file="),
    (("data=qm9", "data.graph_file=/nonexistent/g.g6"), "data.graph_file is for generic graphs"),
    (("data=qm9", "data.test_split=0.3"), "data.test_split=0.3 applies to generic graphs.*data.options"),
    (("data=moses", "data.seed=3", "data.init=ones"), "data.seed=3, data.init='ones' applies to generic graphs"),
    (("data.name=lobster",), "data.name"),
    (("trainer.batch_size=96",), "batch_size"),
    (("model.x=GIN",), "model.x"),
    (("trainer.strategy=fsdp",), "trainer.strategy=fsdp is not supported by graph.train"),
    (("sampler.solver=ddim",), "sampler.solver"),
    (("data.max_feat_num=5",), "max_feat_num"),
    (("model.sde_adj.type=XYZ",), "sde_adj.type"),
    (("trainer.ema_decays=[]", "sampler.use_ema=true"), "sampler.use_ema=true but trainer.ema_decays is empty"),
])
def test_bad_configs_fail_at_start(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        run(tmp_path / "bad", *overrides)
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize("overrides, match", [
    (("data=qm9", "+data.options.test_fracton=0.2"),
     r"data.options \['test_fracton'\] are not options of graph.molecules.load_molecule_dataset; it takes \["),
    (("data=qm9", "+data.options.name=moses"), r"data.options \['name'\] are not options.*data set is data.name"),
    (("data=qm9", "+data.options.test_fraction=1.5"), r"data.options.test_fraction=1.5 must be a number in \(0, 1\)"),
    (("data=qm9", "data.options.seed=abc"), r"data.options.seed='abc' must be an integer"),
    (("data=qm9", "+data.options.limit=0"), r"data.options.limit=0 must be a positive integer or null"),
    (("data=qm9", "+data.options.max_atoms=12"), r"data.options.max_atoms=12 pads molecules to 12 atoms, but "
                                                 r"data.max_node_num=9"),
    (("data=qm9", "+data.options.atoms=[C,N]"), r"data.options.atoms=\['C', 'N'\] has 2 elements, but "
                                                r"data.max_feat_num=4"),
    (("data=qm9", "+data.options.progress=maybe"), r"data.options.progress='maybe' must be true or false"),
    (("data=qm9", "data.options.split_file=/nonexistent/valid_idx_qm9.json"),
     r"data.options.split_file='/nonexistent/valid_idx_qm9.json' is not a file"),
    (("data=moses", "+data.options.split_file=/nonexistent/v.json"), r"split_file=.* is for data.name=qm9 only"),
    (("data=qm9", "+data.options.path=/nonexistent/my.smi"), r"data.options.path=.* is for data.name=file"),
    (("data=smiles", "data.options.path=/nonexistent/my.smi"), r"data.options.path='/nonexistent/my.smi' is not a file"),
])
def test_molecule_options_fail_at_start(tmp_path, monkeypatch, overrides, match):
    # they were checked by the loader: a TypeError / ValueError traceback, or after every SMILES was encoded
    pytest.importorskip("rdkit")
    import graph.sample  # noqa: F401  (imports the real loader before it is replaced here)
    import graph.train

    monkeypatch.setattr(graph.train, "load_data", lambda cfg: pytest.fail("the data were loaded before the check"))
    with pytest.raises(ConfigError, match=match):
        run(tmp_path / "bad", *overrides)


def test_a_misspelt_molecule_option_exits_2(tmp_path):
    pytest.importorskip("rdkit")
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "graph.train", "data=qm9", "+data.options.test_fracton=0.2",
                           f"trainer.out_dir={tmp_path / 'o'}", f"hydra.run.dir={tmp_path / 'h'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: data.options ['test_fracton'] are not options" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_graphs_from_a_file_train_with_the_files_split(tmp_path, monkeypatch):
    """data=graph_file: a user's graph6 file trains through the same entry point; split_seed=null keeps the
    file order (GDSS's split of its pickles: the first 20 % are the test set), which run.json records and
    graph.sample reads back; too small max_node_num / max_feat_num name the value needed."""
    import networkx as nx

    from graph.data import read_graphs, write_graphs
    from graph.sample import load_run
    from graph.train import load_data

    graphs = [nx.cycle_graph(n) for n in range(5, 15)] + [nx.path_graph(n) for n in range(5, 15)]
    path = write_graphs(graphs, tmp_path / "mine.g6")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # a path relative to where training starts ...
    result = run(out, "data=graph_file", "data.graph_file=mine.g6", "data.split_seed=null", "data.max_node_num=14",
                 "data.max_feat_num=3")
    monkeypatch.chdir(REPO)  # ... is found again from elsewhere: run.json records it resolved
    assert json.loads((out / "run.json").read_text())["data"]["graph_file"] == str(path.resolve())
    assert result["step"] == 6 and len(read_graphs(out / "eval" / "samples.g6")) == 6
    info = json.loads((out / "run.json").read_text())
    assert info["train_graphs"] == 16 and info["test_graphs"] == 4
    data = load_data(load_run(out)[1])  # what graph.sample and the benchmarks evaluate against
    assert [g.number_of_nodes() for g in data.test_graphs] == [5, 6, 7, 8]  # the first 20 % of the file
    assert all(nx.is_isomorphic(g, nx.cycle_graph(g.number_of_nodes())) for g in data.test_graphs)
    # data=graph_file's own sizes are null: the file's largest graph and max degree + 1, recorded in run.json
    auto = tmp_path / "auto"
    run(auto, "data=graph_file", f"data.graph_file={path}", "trainer.steps=2", "sampler.num_samples=2")
    recorded = json.loads((auto / "run.json").read_text())["data"]
    assert (recorded["max_node_num"], recorded["max_feat_num"]) == (14, 3)
    model, dcfg, _, _ = load_run(auto)
    assert (model.max_node_num, model.max_feat_num) == (14, 3) and load_data(dcfg).adj.shape[-1] == 14
    with pytest.raises(ConfigError, match="max_node_num=10 is below the largest graph_file graph \\(14 nodes\\)"):
        run(tmp_path / "small", "data=graph_file", f"data.graph_file={path}", "data.max_node_num=10")
    with pytest.raises(ConfigError, match="max_feat_num >= 3"):
        run(tmp_path / "feat", "data=graph_file", f"data.graph_file={path}", "data.max_node_num=14",
            "data.max_feat_num=2")


def test_molecule_interface(tmp_path, monkeypatch):
    """``data.name=qm9`` reads graph.molecules.load_molecule_dataset and evaluates with
    graph.mol_metrics.evaluate_molecules, with the documented arguments (stand-in modules here)."""
    calls = {}
    g = torch.Generator().manual_seed(0)
    m, n, f = 24, 9, 4
    flags = torch.zeros(m, n)
    for i in range(m):
        flags[i, : 3 + i % 6] = 1
    atoms = torch.randint(0, f, (m, n), generator=g)
    x = torch.nn.functional.one_hot(atoms, f).float() * flags[..., None]
    bonds = torch.triu(torch.randint(0, 4, (m, n, n), generator=g).float(), 1)
    adj = (bonds + bonds.transpose(1, 2)) * flags[:, :, None] * flags[:, None, :]
    smiles = [f"C{i}" for i in range(m)]

    def load_molecule_dataset(name, **options):
        calls["load"] = (name, options)
        return {"x": x, "adj": adj, "flags": flags, "train_idx": list(range(16)), "test_idx": list(range(16, 24)),
                "smiles": smiles}

    def evaluate_molecules(x, adj, flags, train_smiles, test_smiles, out_dir=None):
        calls["eval"] = (x.shape, adj.shape, flags.shape, list(train_smiles), list(test_smiles), out_dir)
        return {"validity": 0.5}

    monkeypatch.setitem(sys.modules, "graph.molecules", types.SimpleNamespace(load_molecule_dataset=load_molecule_dataset))
    monkeypatch.setitem(sys.modules, "graph.mol_metrics", types.SimpleNamespace(evaluate_molecules=evaluate_molecules))
    result = run(tmp_path / "mol", "data.name=qm9", "data.max_node_num=9", "data.max_feat_num=4",
                 "+data.options={kekulize: true}", "trainer.batch_size=8", "sampler.num_samples=5")
    assert calls["load"] == ("qm9", {"kekulize": True})
    xs, adjs, fls, tr, te, out_dir = calls["eval"]
    assert xs == (5, 9, 4) and adjs == (5, 9, 9) and fls == (5, 9)
    assert tr == smiles[:16] and te == smiles[16:] and Path(out_dir) == tmp_path / "mol" / "eval"
    assert result["eval"]["validity"] == 0.5
    with pytest.raises(ConfigError, match="max_node_num"):
        run(tmp_path / "mol2", "data.name=qm9", "data.max_feat_num=4", "trainer.batch_size=8")


def test_a_users_smiles_file_trains_and_is_evaluated(tmp_path, monkeypatch):
    # data=smiles: a user's file goes through the same entry point; the invalid line is skipped with a
    # count, the file's own three elements are the vocabulary, and the molecule outputs are written.
    pytest.importorskip("rdkit")
    import graph.mol_metrics as mm

    monkeypatch.setattr(mm, "STATS_CACHE", tmp_path / "stats")  # the test-set statistics stay in tmp_path
    smi = tmp_path / "my.smi"
    smi.write_text("\n".join(["CCO", "c1ccccc1", "CC(=O)O", "not_a_smiles", "CCN", "COC", "CC(C)O", "OCCO",
                              "CCCC", "C1CC1", "CN", "CC#N", "NCCO", "CCOC", "OC=O", "CC=C"]) + "\n")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # relative paths where training starts ...
    with pytest.warns(UserWarning, match="1 of 16 SMILES are invalid"):
        result = run(out, "data=smiles", "data.options.path=my.smi", "data.options.cache_dir=c",  # sizes: the file's
                     "trainer.batch_size=8", "sampler.num_samples=6")
    monkeypatch.chdir(REPO)  # ... are found again from elsewhere: run.json records them resolved
    options = json.loads((out / "run.json").read_text())["data"]["options"]
    assert options["path"] == str(smi.resolve()) and options["cache_dir"] == str((tmp_path / "c").resolve())
    recorded = json.loads((out / "run.json").read_text())["data"]
    assert (recorded["max_node_num"], recorded["max_feat_num"]) == (6, 3)
    from graph.sample import load_run
    from graph.train import load_data

    assert load_data(load_run(out)[1]).train_smiles is not None
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["data"] == "file" and metrics["n_samples"] == 6 and 0.0 <= metrics["validity"] <= 1.0
    assert result["eval"]["n_samples"] == 6
    for name in ("smiles.txt", "molecules.sdf", "grid.png"):
        assert (out / "eval" / name).exists()
    # Round trip: the saved samples, decoded with the file's own vocabulary, give the reported metrics.
    from graph.mol_metrics import evaluate_molecules
    from graph.molecules import load_molecule_dataset

    ds = load_molecule_dataset("file", path=smi, cache_dir=tmp_path / "c", progress=False)
    assert sorted(ds["atoms"]) == ["C", "N", "O"] and len(ds["smiles"]) == 15 and ds["max_atoms"] == 6
    s = torch.load(out / "eval" / "samples.pt", weights_only=True)
    again = evaluate_molecules(s["x"], s["adj"], s["flags"], [ds["smiles"][i] for i in ds["train_idx"].tolist()],
                               [], atoms=ds["atoms"], nspdk=False, fcd_metric=False)
    for key in ("validity_wo_correction", "validity", "uniqueness", "novelty"):
        assert again[key] == pytest.approx(metrics[key], nan_ok=True), key
    assert len(list((tmp_path / "stats").glob("mol_test_*.pt"))) == 2  # NSPDK and FCD statistics
    with pytest.raises(ConfigError, match="max_node_num"):
        run(tmp_path / "bad", "data=smiles", f"data.options.path={smi}", f"data.options.cache_dir={tmp_path / 'c'}",
            "data.max_node_num=9", "data.max_feat_num=3", "trainer.batch_size=8")
    with pytest.raises(ConfigError, match="data.options.path="):
        run(tmp_path / "missing", "data=smiles", f"data.options.path={tmp_path / 'missing.smi'}",
            "data.max_node_num=6", "data.max_feat_num=3", "trainer.batch_size=8")


@pytest.mark.parametrize("trainer", ["community_small", "qm9", "qm9_cpu", "qm9_cpu_long"])
def test_gdss_trainer_configs_clip_each_network_on_its_own(trainer):
    # GDSS clips each network's gradient separately (two optimisers); the shipped recipes name both networks,
    # and the names are GDSSModel's modules, so the Trainer accepts them.
    from omegaconf import OmegaConf

    from core.engine import Trainer
    from core.engine.config import TrainerConfig, to_schema
    from graph.train import GDSSModel, GraphModelConfig

    cfg = compose(f"trainer={trainer}", "model=qm9")
    assert list(cfg.trainer.grad_clip_groups) == ["model_x", "model_adj"] and cfg.trainer.grad_clip == 1.0
    tcfg = to_schema(OmegaConf.to_container(cfg.trainer, resolve=False) | {"out_dir": "unused"}, TrainerConfig,
                     "trainer")
    model = GDSSModel(to_schema(OmegaConf.to_container(cfg.model), GraphModelConfig, "model"), 9, 4)
    groups = Trainer._clip_groups(model, list(tcfg.grad_clip_groups))
    assert [len(g) for g in groups] == [len(list(model.model_x.parameters())), len(list(model.model_adj.parameters()))]
    if trainer == "qm9_cpu_long":
        assert (cfg.trainer.steps, cfg.trainer.batch_size) == (30000, 256)


@pytest.mark.parametrize("trainer,epochs", [("community_small", 5000), ("qm9", 300)])
def test_gdss_recipes_decay_lr_and_ema_as_gdss(trainer, epochs):
    # GDSS: ExponentialLR(0.999) stepped once an epoch, and score_sde's EMA with its num_updates warm-up.
    from core.engine import lr_factor

    t = compose(f"trainer={trainer}", "model=qm9").trainer
    assert t.schedule == "exponential" and t.ema_warmup and list(t.ema_decays) == [0.999]
    steps_per_epoch = t.steps / epochs
    for epoch in (0, 1, epochs // 3, epochs):
        step = round(epoch * steps_per_epoch)
        assert lr_factor(step, t.warmup_steps, t.steps, t.schedule, t.min_lr_ratio) == pytest.approx(
            0.999**epoch, rel=1e-4)


def test_two_rank_ddp_trains_through_the_unused_last_layer_and_resumes(tmp_path):
    """GDSS's last adjacency layer has parameters its output never uses: DDP (2 gloo ranks) must let
    them go without a gradient (it stopped at step 2); stopped at 3 and resumed, the run finishes and
    evaluates once."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "graph.train",
           f"trainer.out_dir={tmp_path / 'ddp'}", *TINY, "trainer.batch_size=16", "trainer.steps=6",
           "trainer.ckpt_every=3"]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    for extra in (["trainer.stop_at=3"], []):
        proc = subprocess.run(cmd + extra, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    from core.engine.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(tmp_path / "ddp" / "checkpoints")][-1] == 6
    assert json.loads((tmp_path / "ddp" / "eval" / "metrics.json").read_text())["num_samples"] == 6
