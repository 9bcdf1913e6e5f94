"""Official GDSS checkpoints through polydiff: graph.official and ``python -m graph.sample --official``.

Checkpoints are written here in the official format (trainer.py's ``torch.save`` of ``model_config`` as an
``easydict.EasyDict``, ``params_x`` / ``params_adj``, ``x_state_dict`` / ``adj_state_dict`` and GDSS's EMA
state ``{"decay", "num_updates", "shadow_params"}``) and read back ``weights_only``. The samples that
graph.sample writes must equal those drawn by calling the networks (built here from the saved parameters)
and the GDSS sampler directly with the same seed: node counts from the training graphs, then the solver
with the sampler config's settings. A tiny random model covers community-small, EMA and bad input; the
fixture's seed-0 networks of the official community-small and QM9 architectures
(``../shared/fixtures/gdss_reference.pt``) cover the full-size networks and the molecule outputs; with
GDSS_CHECKPOINTS set, the released checkpoints give the fixture's recorded outputs of the official code.
Also: graph.mol_metrics's ``--cache`` default follows ``$POLYDIFF_MOL_CACHE`` when the command runs.
"""

import dataclasses
import json
import os
import sys
import types
from pathlib import Path
from unittest import mock

import pytest
import torch

from graph.gdss import gdss_sample, gdss_system
from graph.model import build_network
from graph.official import load_official, official_model
from graph.sample import main, official_configs
from graph.train import GraphDataConfig, load_data
from tests.conftest import load_fixture

STEPS = 4
VP = {"type": "VP", "beta_min": 0.1, "beta_max": 1.0, "num_scales": STEPS}
TINY = {"x": "ScoreNetworkX", "adj": "ScoreNetworkA", "conv": "GCN", "num_heads": 2, "depth": 2, "adim": 8,
        "nhid": 8, "num_layers": 2, "num_linears": 2, "c_init": 2, "c_hid": 4, "c_final": 2}
# GDSS config/community_small.yaml and config/qm9.yaml: model sections (the fixture's seed-0 networks)
CS_MODEL = {**TINY, "num_heads": 4, "depth": 3, "adim": 32, "nhid": 32, "num_layers": 5, "c_hid": 8, "c_final": 4}
QM9_MODEL = {**CS_MODEL, "depth": 2, "adim": 16, "nhid": 16, "num_layers": 3, "num_linears": 3}


class EasyDict(dict):
    """Pickles as ``easydict.EasyDict`` does (a dict subclass whose keys are also attributes), the class of
    GDSS's ``model_config``; the reader must get it through ``weights_only`` without the package."""

    def __init__(self, d):
        super().__init__()
        for k, v in d.items():
            v = EasyDict(v) if isinstance(v, dict) else v
            self[k] = v
            setattr(self, k, v)


EasyDict.__module__ = "easydict"
_EASYDICT = types.ModuleType("easydict")
_EASYDICT.EasyDict = EasyDict


def gdss_params(model: dict, n: int, f: int) -> tuple[dict, dict]:
    """GDSS ``load_model_params``: the constructor arguments of the two networks, with ``model_type``."""
    px = {"model_type": model["x"], "max_feat_num": f, "depth": model["depth"], "nhid": model["nhid"]}
    pa = {"model_type": model["adj"], "max_feat_num": f, "max_node_num": n, "nhid": model["nhid"],
          "num_layers": model["num_layers"], "num_linears": model["num_linears"], "c_init": model["c_init"],
          "c_hid": model["c_hid"], "c_final": model["c_final"], "adim": model["adim"],
          "num_heads": model["num_heads"], "conv": model["conv"]}
    return px, pa


def fresh(params: dict):
    """An official network built from GDSS's parameters (``model_type`` names the class)."""
    params = dict(params)
    return build_network(params.pop("model_type"), **params)


def networks(px: dict, pa: dict, sd_x: dict, sd_adj: dict):
    """The official networks from their parameters and state dicts (not through graph.official)."""
    nets = [fresh(px), fresh(pa)]
    for net, sd in zip(nets, (sd_x, sd_adj)):
        net.load_state_dict(sd, strict=True)
    return [net.eval() for net in nets]


def save_official(path: Path, model: dict, sde: dict, n: int, f: int, sd_x: dict, sd_adj: dict,
                  ema: tuple[list, list] | None = None, data: str = "community_small") -> Path:
    """A checkpoint as GDSS's trainer.py writes it (its config sections as in config/<data>.yaml)."""
    px, pa = gdss_params(model, n, f)
    config = {"data": {"data": data, "batch_size": 128, "max_node_num": n, "max_feat_num": f, "init": "deg"},
              "sde": {"x": sde, "adj": sde}, "model": model,
              "train": {"name": "test", "num_epochs": 1, "lr": 0.01, "ema": 0.999, "eps": 1.0e-5,
                        "reduce_mean": False},
              "sampler": {"predictor": "Euler", "corrector": "Langevin", "snr": 0.05, "scale_eps": 0.7, "n_steps": 1},
              "sample": {"use_ema": False, "noise_removal": True, "probability_flow": False, "eps": 1.0e-4,
                         "seed": 42}, "seed": 42}
    state = {"model_config": None, "params_x": px, "params_adj": pa, "x_state_dict": sd_x, "adj_state_dict": sd_adj}
    if ema is not None:
        state.update({k: {"decay": 0.999, "num_updates": 3, "shadow_params": v} for k, v in zip(("ema_x", "ema_adj"), ema)})
    with mock.patch.dict(sys.modules, {"easydict": _EASYDICT}):
        state["model_config"] = EasyDict(config)
        torch.save(state, path)
    return path


def direct(nets, sde: dict, data_flags: torch.Tensor, n_feat: int, num: int, seed: int, steps: int, **options):
    """GDSS's sampling called directly: ``num`` node counts drawn from the training graphs with a generator
    seeded with ``seed``, then the solver with the same generator."""
    g = torch.Generator().manual_seed(seed)
    flags = data_flags[torch.randint(0, data_flags.shape[0], (num,), generator=g)]
    x, adj, _ = gdss_sample(*nets, gdss_system(sde, sde), flags, n_feat, solver="pc", steps=steps, eps=1e-4,
                            generator=g, corrector="langevin", n_corrector=1, last_step="mean", **options)
    return x, adj, flags


# GDSS's community-small sampler (configs/graph/sampler/community_small.yaml) and sample_qm9.yaml's
CS_SAMPLER = {"predictor": "euler_maruyama", "snr": 0.05, "scale_eps": 0.7}
QM9_SAMPLER = {"predictor": "reverse_diffusion", "snr": 0.2, "scale_eps": 0.7}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model of the community-small sizes (20 nodes, 10 features) in the official format,
    with EMA shadows that differ from the raw weights."""
    root = tmp_path_factory.mktemp("official")
    px, pa = gdss_params(TINY, 20, 10)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        nets = [fresh(px).eval(), fresh(pa).eval()]
    g = torch.Generator().manual_seed(1)
    shadows = [[p.detach() + 0.05 * torch.randn(p.shape, generator=g) for p in net.parameters()] for net in nets]
    path = save_official(root / "gdss_tiny.pth", TINY, VP, 20, 10, nets[0].state_dict(), nets[1].state_dict(),
                         ema=tuple(shadows))
    return root, path, nets, shadows


def test_checkpoint_is_read_weights_only_with_its_config(tiny):
    _, path, nets, shadows = tiny
    with pytest.raises(Exception, match="easydict"):  # the file really pickles GDSS's config class
        torch.load(path, weights_only=True)
    model, cfg = load_official(path, 20, 10)
    assert (cfg.depth, cfg.nhid, cfg.num_layers, cfg.c_hid, cfg.num_heads) == (2, 8, 2, 4, 2)
    assert cfg.sde_adj.num_scales == STEPS and cfg.sde_x.type == "VP" and cfg.eps == 1e-5
    ref = {**{f"model_x.{k}": v for k, v in nets[0].state_dict().items()},
           **{f"model_adj.{k}": v for k, v in nets[1].state_dict().items()}}
    got = model.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], v) for k, v in ref.items())
    auto = official_model(path, None, None)  # null sizes (data=graph_file's default) take the checkpoint's
    assert (auto.max_node_num, auto.max_feat_num) == (20, 10)
    assert all(torch.equal(auto.state_dict()[k], v) for k, v in got.items())
    with pytest.raises(ValueError, match=r"max_node_num / max_feat_num = \(20, 10\), the data has \(20, 9\)"):
        load_official(path, None, 9)
    ema = official_model(path, 20, 10, ema=True)
    for net, shadow, sub in zip(nets, shadows, (ema.model_x, ema.model_adj)):
        names = [n for n, _ in net.named_parameters()]  # GDSS keeps the shadows in parameters() order
        sd = sub.state_dict()
        assert all(torch.equal(sd[n], s) for n, s in zip(names, shadow))
        assert not all(torch.equal(sd[n], p) for n, p in net.named_parameters())


def test_sample_official_equals_direct_sampling(tiny, tmp_path):
    _, path, nets, shadows = tiny
    out = tmp_path / "out"
    metrics = main(["--official", str(path), "--data", "community_small", "--out", str(out), "--num", "5",
                    "--seed", "3", "sampler.max_draw=3"])
    folder = out / "sample"
    saved = torch.load(folder / "samples.pt", weights_only=True)
    data = load_data(GraphDataConfig())  # community_small's config: the default data config
    x, adj, flags = direct(nets, VP, data.flags[data.train_idx], 10, 5, seed=3, steps=STEPS, **CS_SAMPLER)
    assert torch.equal(saved["flags"], flags) and torch.equal(saved["x"], x) and torch.equal(saved["adj"], adj)
    # the steps are the checkpoint's num_scales, the settings community-small's sampler config
    assert metrics["steps"] == STEPS and metrics["nfe"] == 2 * STEPS and metrics["num_samples"] == 5
    assert metrics["weights"] == "raw" and metrics["checkpoint"] == str(path)
    assert (metrics["data_config"], metrics["sampler_config"]) == ("community_small", "community_small")
    assert json.loads((folder / "metrics.json").read_text()) == metrics
    for k in ("degree", "cluster", "orbit"):
        assert metrics[k] >= -1e-9
    for png in ("samples.png", "test.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The EMA shadows and another seed: each equals its own direct draw, and differs from the first.
    main(["--official", str(path), "--data", "community_small", "--out", str(out), "--num", "5", "--seed", "3",
          "--ema", "--tag", "ema", "sampler.max_draw=0"])
    ema_nets = [fresh(p) for p in gdss_params(TINY, 20, 10)]
    for net, shadow in zip(ema_nets, shadows):
        net.load_state_dict(dict(zip([k for k, _ in net.named_parameters()], shadow)), strict=True)
    saved_ema = torch.load(out / "ema" / "samples.pt", weights_only=True)
    x_ema, adj_ema, _ = direct([n.eval() for n in ema_nets], VP, data.flags[data.train_idx], 10, 5, seed=3,
                               steps=STEPS, **CS_SAMPLER)
    assert torch.equal(saved_ema["x"], x_ema) and torch.equal(saved_ema["adj"], adj_ema)
    assert not torch.equal(saved_ema["adj"], saved["adj"])
    assert json.loads((out / "ema" / "metrics.json").read_text())["weights"] == "ema"


def test_solver_flags_and_overrides_reach_the_sampler(tiny, tmp_path):
    # --solver s4 --snr, and a sampler.* override, each change the draw exactly as the direct call says.
    _, path, nets, _ = tiny
    main(["--official", str(path), "--data", "community_small", "--out", str(tmp_path), "--num", "3",
          "--steps", "2", "--solver", "pc", "sampler.predictor=Reverse", "--snr", "0.1", "sampler.seed=8",
          "sampler.max_draw=0"])
    saved = torch.load(tmp_path / "sample" / "samples.pt", weights_only=True)
    data = load_data(GraphDataConfig())
    x, adj, _ = direct(nets, VP, data.flags[data.train_idx], 10, 3, seed=8, steps=2,
                       predictor="reverse_diffusion", snr=0.1, scale_eps=0.7)
    assert torch.equal(saved["x"], x) and torch.equal(saved["adj"], adj)


def test_official_configs_are_graph_trains():
    data, sampler, name = official_configs("qm9")
    assert (data.name, data.max_node_num, data.max_feat_num, name) == ("qm9", 9, 4, "qm9")
    assert (sampler.predictor, sampler.snr, sampler.seed) == ("Reverse", 0.2, 42)  # GDSS sample_qm9.yaml
    data, sampler, name = official_configs("grid")  # no sampler config of its own: graph.train's default
    assert (data.max_node_num, data.max_feat_num, name, sampler.predictor) == (361, 5, "community_small", "Euler")
    data, sampler, _ = official_configs("qm9", "community_small", ["data.options.seed=7", "sampler.num_samples=3"])
    assert data.options["seed"] == 7 and sampler.num_samples == 3 and sampler.snr == 0.05


def _fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    for n in needles:
        assert n in err, (n, err)


def test_bad_input_exits_2_naming_the_value(tiny, tmp_path, capsys):
    _, path, _, _ = tiny
    ok = ["--official", str(path), "--data", "community_small", "--out", str(tmp_path)]
    missing = tmp_path / "gdss_missing.pth"
    _fails(["--official", str(missing), "--data", "community_small"], capsys, str(missing), "does not exist")
    _fails(["--official", str(path), "--data", "grid"], capsys, "max_node_num", "(20, 10)", "(361, 5)")
    _fails([*ok, "data.max_feat_num=11"], capsys, "(20, 10)", "(20, 11)")
    _fails(["--official", str(path), "--data", "zinc"], capsys, "'zinc'", "community_small")
    _fails(["--official", str(path)], capsys, "--data")
    _fails([*ok, "--sampler", "fast"], capsys, "'fast'")
    _fails([*ok, "model.depth=3"], capsys, "model.depth=3")
    _fails([*ok, "data.nope=1"], capsys, "nope")
    _fails([*ok, "sampler.snr=-1"], capsys, "snr")
    _fails([*ok, "--ckpt", str(path)], capsys, "--ckpt")
    _fails([*ok, "--steps", "0"], capsys, "--steps")
    _fails([*ok, "--num", "0"], capsys, "--num must be >= 1, got 0")  # the flag, not sampler.num_samples
    _fails([*ok, "--snr", "0"], capsys, "--snr must be > 0, got 0.0")
    _fails([*ok, "--scale-eps", "-1"], capsys, "--scale-eps must be >= 0, got -1.0")
    _fails([*ok, "--run", str(tmp_path)], capsys, "--run")  # one source of weights
    _fails(["--run", str(tmp_path), "--data", "community_small"], capsys, "--data", "--official")
    _fails(["--run", str(tmp_path)], capsys, "run.json")
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(2)}, other)
    _fails(["--official", str(other), "--data", "community_small"], capsys, str(other), "'params_x'")
    no_ema = save_official(tmp_path / "no_ema.pth", TINY, VP, 20, 10, *(n.state_dict() for n in tiny[2]))
    _fails(["--official", str(no_ema), "--data", "community_small", "--ema"], capsys, "EMA")
    with pytest.raises(ValueError, match="does not exist"):
        official_model(missing, 20, 10)


# ------------------------------------------------------------------------- the fixture's full-size networks


@pytest.fixture(scope="module")
def ref():
    return load_fixture("gdss_reference.pt")


def test_community_small_architecture(ref, tmp_path):
    px, pa = gdss_params(CS_MODEL, 20, 10)
    sd_x, sd_adj = ref["cs/model_x_state_dict"], ref["cs/model_adj_state_dict"]
    path = save_official(tmp_path / "gdss_community_small.pth", CS_MODEL, {**VP, "num_scales": 1000}, 20, 10,
                         sd_x, sd_adj)
    nets = networks(px, pa, sd_x, sd_adj)
    model = official_model(path, 20, 10)
    with torch.no_grad():  # the loaded networks are the official ones: the fixture's recorded outputs
        torch.testing.assert_close(model.model_x(ref["cs/x"], ref["cs/adj"], ref["cs/flags"]),
                                   ref["cs/model_x(x,adj,flags)"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.model_adj(ref["cs/x"], ref["cs/adj"], ref["cs/flags"]),
                                   ref["cs/model_adj(x,adj,flags)"], rtol=1e-4, atol=1e-5)
    metrics = main(["--official", str(path), "--data", "community_small", "--out", str(tmp_path), "--num", "4",
                    "--steps", "3", "sampler.max_draw=0"])
    saved = torch.load(tmp_path / "sample" / "samples.pt", weights_only=True)
    data = load_data(GraphDataConfig())
    x, adj, _ = direct(nets, VP, data.flags[data.train_idx], 10, 4, seed=11, steps=3, **CS_SAMPLER)  # seed: config
    assert torch.equal(saved["x"], x) and torch.equal(saved["adj"], adj) and metrics["steps"] == 3


def test_qm9_architecture_writes_molecules(ref, tmp_path, monkeypatch):
    # QM9's sizes (9 atoms of C, N, O, F) through a SMILES file of such molecules (data=smiles), so that the
    # test needs no QM9 encoding; the molecule outputs are those of the samples.
    pytest.importorskip("rdkit")
    import graph.mol_metrics as mm
    from graph.molecules import decode_molecules

    monkeypatch.setattr(mm, "STATS_CACHE", tmp_path / "stats")
    smi = tmp_path / "mols.smi"
    smi.write_text("\n".join(["CCO", "CC(=O)O", "CCN", "COC", "CC(C)O", "OCCO", "CCCC", "C1CC1", "CN", "CC#N",
                              "NCCO", "CCOC", "OC=O", "CC=C", "FC(F)F", "CC(F)CO", "c1ccncc1", "OC1CCCCC1",
                              "CCCCCCCCC", "NC(=O)CO"]) + "\n")
    ve = {"type": "VE", "beta_min": 0.1, "beta_max": 1.0, "num_scales": 1000}
    px, pa = gdss_params(QM9_MODEL, 9, 4)
    sd_x, sd_adj = ref["qm9/model_x_state_dict"], ref["qm9/model_adj_state_dict"]
    path = save_official(tmp_path / "gdss_qm9.pth", QM9_MODEL, ve, 9, 4, sd_x, sd_adj, data="QM9")
    out = tmp_path / "out"
    metrics = main(["--official", str(path), "--data", "smiles", "--sampler", "qm9", "--out", str(out),
                    "--num", "6", "--steps", "3", f"data.options.path={smi}", "+data.options.atoms=[C,N,O,F]",
                    "+data.options.max_atoms=9", f"data.options.cache_dir={tmp_path / 'c'}",
                    "data.max_node_num=9", "data.max_feat_num=4"])
    folder = out / "sample"
    saved = torch.load(folder / "samples.pt", weights_only=True)
    data = load_data(dataclasses.replace(GraphDataConfig(), name="file", max_node_num=9, max_feat_num=4,
                                         options={"path": str(smi), "atoms": ["C", "N", "O", "F"], "max_atoms": 9,
                                                  "cache_dir": str(tmp_path / "c")}))
    x, adj, flags = direct(networks(px, pa, sd_x, sd_adj), ve, data.flags[data.train_idx], 4, 6, seed=42, steps=3,
                           **QM9_SAMPLER)
    assert torch.equal(saved["x"], x) and torch.equal(saved["adj"], adj) and torch.equal(saved["flags"], flags)
    assert metrics["data"] == "file" and metrics["n_samples"] == 6 and 0 <= metrics["validity"] <= 1
    smiles = decode_molecules(x, adj, flags, ["C", "N", "O", "F"])["smiles"]
    assert [ln.split() for ln in (folder / "smiles.txt").read_text().splitlines()] == [
        [s, f"sample_{i}"] for i, s in enumerate(smiles) if s]
    assert (folder / "molecules.sdf").read_text().count("$$$$") == sum(1 for s in smiles if s)


# ------------------------------------------------------------------------- graph.mol_metrics --checkpoint


def test_mol_metrics_forwards_to_graph_sample_with_the_cache_of_call_time(tmp_path, monkeypatch):
    # python -m graph.mol_metrics --checkpoint gdss_qm9.pth is graph.sample --official CKPT --data qm9 under the
    # older names. Without --cache, the folder of the encoded data and the test-set statistics is
    # $POLYDIFF_MOL_CACHE as it is when the command runs (as for evaluate_molecules).
    pytest.importorskip("rdkit")
    import graph.mol_metrics as mm
    import graph.sample

    seen = []

    def fake_main(argv):
        seen.append((list(argv), mm.stats_cache()))
        return {"ok": True}

    monkeypatch.setattr(graph.sample, "main", fake_main)
    monkeypatch.setattr(mm, "STATS_CACHE", None)
    monkeypatch.delenv("POLYDIFF_MOL_CACHE", raising=False)
    assert mm.main(["--checkpoint", "ck.pth", "--n", "7", "--batch", "5", "--solver", "s4", "--ema",
                    "--split-file", "valid.json", "--seed", "3", "--steps", "20"]) == {"ok": True}
    argv, cache = seen[-1]
    assert {k: argv[argv.index(k) + 1] for k in ("--official", "--data", "--num", "--solver", "--seed", "--steps")} == {
        "--official": "ck.pth", "--data": "qm9", "--num": "7", "--solver": "s4", "--seed": "3", "--steps": "20"}
    assert "--ema" in argv and "--raw" not in argv and "sampler.batch_size=5" in argv
    assert "data.options.split_file=valid.json" in argv
    assert f"data.options.cache_dir={mm.DEFAULT_CACHE}" in argv and cache == Path(mm.DEFAULT_CACHE)
    assert mm.STATS_CACHE is None  # restored after the call
    env = tmp_path / "env_cache"
    monkeypatch.setenv("POLYDIFF_MOL_CACHE", str(env))
    mm.main(["--checkpoint", "ck.pth"])
    argv, cache = seen[-1]
    assert f"data.options.cache_dir={env}" in argv and cache == env and "--raw" in argv
    assert not any(a.startswith("data.options.split_file") for a in argv)
    mm.main(["--checkpoint", "ck.pth", "--cache", str(tmp_path / "mine")])  # an explicit --cache wins
    argv, cache = seen[-1]
    assert f"data.options.cache_dir={tmp_path / 'mine'}" in argv and cache == tmp_path / "mine"
    # The statistics evaluate_molecules caches land in the environment's folder.
    mm._cached(["CCO", "CCN", "c1ccccc1"], "nspdk")
    assert len(list(env.glob("mol_test_nspdk_*.pt"))) == 1


# ------------------------------------------------------------------------- the official checkpoints themselves


@pytest.mark.parametrize("data,file,sub,n,f", [("cs", "gdss_community_small.pth", "community_small", 20, 10),
                                               ("qm9", "gdss_qm9.pth", "QM9", 9, 4)])
def test_official_pretrained_checkpoints(ref, data, file, sub, n, f):
    # The released files (their EasyDict configs included) load weights_only as GDSSModels whose networks
    # give the fixture's recorded outputs of the official code. Set GDSS_CHECKPOINTS to their folder.
    root = os.environ.get("GDSS_CHECKPOINTS")
    if not root:
        pytest.skip("set GDSS_CHECKPOINTS to the folder of the official GDSS checkpoints")
    path = next((p for p in (Path(root) / sub / file, Path(root) / file) if p.is_file()), None)
    if path is None:
        pytest.skip(f"{file} not found under GDSS_CHECKPOINTS={root}")
    model, cfg = load_official(path, n, f)
    assert cfg.sde_adj.num_scales == 1000 and cfg.sde_x.type == ("VP" if data == "cs" else "VE")
    x, adj, flags = ref[f"{data}/x"], ref[f"{data}/adj"], ref[f"{data}/flags"]
    with torch.no_grad():
        torch.testing.assert_close(model.model_x(x, adj, flags), ref[f"pretrained/{data}/model_x(clean)"],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.model_adj(x, adj, flags), ref[f"pretrained/{data}/model_adj(clean)"],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args", [["--n", "0"], ["--batch", "-1"], ["--steps", "0"]])
def test_mol_metrics_names_a_bad_count_with_exit_2(args, tmp_path, capsys):
    from graph import mol_metrics

    with pytest.raises(SystemExit) as e:  # before the checkpoint is read: it need not exist
        mol_metrics.main(["--checkpoint", str(tmp_path / "absent.pth"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "must be positive" in err and "got " in err and args[1] in err.split("got ")[1]
