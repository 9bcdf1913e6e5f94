"""benchmarks.graph_community_small on a tiny untrained GDSS run (5 solver steps, 2 seeds): the chunking and
aggregation have the right structure and finite values, each chunk is what graph.train.evaluate gives for
its seed, the official-checkpoint path holding the run's own weights reproduces the raw model exactly, the
perfect generator compared with its own reference set has zero MMD, and bad input fails with clear errors."""

import json
import math

import numpy as np
import pytest
import torch

from benchmarks.graph_community_small import (
    MODELS,
    PUBLISHED,
    _train_graphs,
    chunk_mmds,
    main,
    official_model,
    parse_sampler_set,
    perfect_chunks,
    run_benchmark,
    summarize,
)
from core.engine.checkpoint import save_checkpoint
from graph.train import GDSSModel, GraphDataConfig, GraphModelConfig, GraphSamplerConfig, evaluate, load_data

STEPS = 5
TINY = {"depth": 2, "nhid": 8, "adim": 8, "num_layers": 2, "c_hid": 4, "c_final": 2,
        "sde_x": {"type": "VP", "beta_min": 0.1, "beta_max": 1.0, "num_scales": STEPS},
        "sde_adj": {"type": "VP", "beta_min": 0.1, "beta_max": 1.0, "num_scales": STEPS}}


def _model_cfg() -> GraphModelConfig:
    from core.engine.config import to_schema

    return to_schema(TINY, GraphModelConfig, "model")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A graph.train-style run directory (run.json, one checkpoint with raw and EMA weights) and a checkpoint
    in the official GDSS format holding the same raw weights."""
    import dataclasses

    root = tmp_path_factory.mktemp("seeds")
    run = root / "run"
    cfg, data_cfg, sampler = _model_cfg(), GraphDataConfig(), GraphSamplerConfig()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GDSSModel(cfg, data_cfg.max_node_num, data_cfg.max_feat_num)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    ema = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in raw.items()}
    info = {"model": dataclasses.asdict(cfg), "data": dataclasses.asdict(data_cfg),
            "sampler": dataclasses.asdict(sampler)}
    run.mkdir()
    (run / "run.json").write_text(json.dumps(info))
    save_checkpoint({"model": raw, "step": 3, "ema": {"decays": [0.999], "warmup": False, "num_updates": 3,
                                                      "shadows": {"0.999": ema}}},
                    run / "checkpoints" / "ckpt_00000003.pt")
    official = root / "gdss_tiny.pth"
    x_keys = ("max_feat_num", "depth", "nhid")
    adj_keys = ("max_feat_num", "max_node_num", "nhid", "num_layers", "num_linears", "c_init", "c_hid", "c_final",
                "adim", "num_heads", "conv")
    params = {**dataclasses.asdict(cfg), "max_feat_num": data_cfg.max_feat_num, "max_node_num": data_cfg.max_node_num}
    torch.save({
        "params_x": {"model_type": "ScoreNetworkX", **{k: params[k] for k in x_keys}},
        "x_state_dict": model.model_x.state_dict(),
        "params_adj": {"model_type": "ScoreNetworkA", **{k: params[k] for k in adj_keys}},
        "adj_state_dict": model.model_adj.state_dict(),
        "model_config": {
            "data": {"max_node_num": data_cfg.max_node_num, "max_feat_num": data_cfg.max_feat_num},
            "sde": {"x": TINY["sde_x"], "adj": TINY["sde_adj"]},
            "model": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("sde_x", "sde_adj", "eps",
                                                                                    "reduce_mean")},
            "train": {"eps": 1e-5, "reduce_mean": False},
        },
    }, official)
    out = root / "out"
    results = run_benchmark(run, official, seeds=2, seed_start=4, out=out, progress=False)
    return run, official, out, results, model


def test_structure_and_finite_numbers(tiny):
    run, _, out, res, _ = tiny
    assert list(res["models"]) == list(MODELS)
    assert res["steps"] == STEPS and res["chunk_size"] == res["test_graphs"] == 20 and res["seeds"] == 2
    for name, m in res["models"].items():
        assert [c["seed"] for c in m["per_chunk"]] == [4, 5]
        assert m["nfe"] == (0 if name == "perfect" else 2 * STEPS)  # Euler predictor + one Langevin step
        assert m["wall_seconds"] > 0 and m["cpu_seconds"] >= 0
        s = m["summary"]
        assert s["chunks"] == 2
        for stat, pub in PUBLISHED.items():
            v = np.array([c[stat] for c in m["per_chunk"]])
            assert np.all(np.isfinite(v)) and np.all(v > -1e-9)
            q = s[stat]
            assert q["values"] == v.tolist() and q["mean"] == pytest.approx(v.mean())
            assert q["std"] == pytest.approx(abs(v[0] - v[1]) / math.sqrt(2))  # ddof 1 of two values
            assert q["sem"] == pytest.approx(q["std"] / math.sqrt(2))
            assert q["n_le_published"] == int((v <= pub).sum()) and q["published"] == pub
            assert math.isfinite(q["pooled"]) and q["pooled"] > -1e-9
    for pair in ("raw-ema", "raw-official", "ema-official"):
        for stat in PUBLISHED:
            d = np.array(res["models"][pair.split("-")[0]]["summary"][stat]["values"]) - np.array(
                res["models"][pair.split("-")[1]]["summary"][stat]["values"])
            q = res["paired"][pair][stat]
            assert q["mean"] == pytest.approx(d.mean()) and q["a_lower"] == int((d < 0).sum())
    assert all(q["mean"] == 0 and q["a_lower"] == 0 for q in res["paired"]["raw-official"].values())
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"]["raw"]["per_chunk"] == res["models"]["raw"]["per_chunk"]
    table = (out / "table.md").read_text()
    assert "raw - official" in table and "official GDSS checkpoint" in table and "perfect generator" in table and "0.045" in table


def test_each_chunk_is_what_evaluate_gives_for_its_seed(tiny, tmp_path):
    import dataclasses

    from graph.sample import load_run

    run, _, _, res, _ = tiny
    model, data_cfg, sampler, _ = load_run(run)
    data = load_data(data_cfg)
    sampler = dataclasses.replace(sampler, max_draw=0)
    with torch.no_grad():
        m = evaluate(model, data, sampler, STEPS, tmp_path, torch.Generator().manual_seed(5), tag="s5",
                     progress=False)
    chunk = res["models"]["raw"]["per_chunk"][1]
    assert chunk["seed"] == 5 and {k: m[k] for k in PUBLISHED} == {k: chunk[k] for k in PUBLISHED}


def test_official_path_with_the_runs_weights_reproduces_raw(tiny):
    _, official, _, res, model = tiny
    assert res["models"]["official"]["per_chunk"] == res["models"]["raw"]["per_chunk"]
    assert res["models"]["ema"]["per_chunk"] != res["models"]["raw"]["per_chunk"]  # the EMA shadow was loaded
    loaded = official_model(official, 20, 10)
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="max_node_num"):
        official_model(official, 30, 10)


def test_perfect_generator_against_itself_is_zero():
    data = load_data(GraphDataConfig())
    ref = list(data.test_graphs)
    chunks = perfect_chunks(ref, [0, 1, 2], len(ref))
    assert all(sorted(map(id, c)) == sorted(map(id, ref)) for c in chunks)  # permutations of the reference
    per, pooled = chunk_mmds(ref, chunks)
    assert all(abs(v) < 1e-9 for m in per + [pooled] for v in m.values())
    # A smaller draw: without replacement, reproducible from its seed, different across seeds.
    a, b, c = perfect_chunks(ref, [7], 5)[0], perfect_chunks(ref, [7], 5)[0], perfect_chunks(ref, [8], 5)[0]
    assert len({id(g) for g in a}) == 5 and [id(g) for g in a] == [id(g) for g in b]
    assert [id(g) for g in a] != [id(g) for g in c]
    # The perfect generator is a real estimate, not a constant: other graphs than the reference give MMD > 0.
    other = perfect_chunks([data.test_graphs[0]] * 20, [0], 20)
    assert chunk_mmds(ref, other)[0][0]["degree"] > 0


def test_data_without_published_figures(tiny):
    """A run on data GDSS publishes no figures for (grid, a user's file) gets the same tables without the
    published row and counts; ego-small gets GDSS's own figures, not community-small's."""
    import copy

    from benchmarks.graph_community_small import PUBLISHED_BY_DATA, markdown_table

    _, _, _, res, _ = tiny
    assert res["published"] == PUBLISHED  # the tiny run is community-small
    bare = copy.deepcopy(res)
    bare["published"] = {}
    for m in bare["models"].values():
        per = [{k: c[k] for k in PUBLISHED} for c in m["per_chunk"]]
        m["summary"] = summarize(per, {k: m["summary"][k]["pooled"] for k in PUBLISHED}, {})
        assert all("n_le_published" not in m["summary"][k] for k in PUBLISHED)
    table = markdown_table(bare)
    assert "GDSS published" not in table and "≤ (none)" in table and "≤ 0.045" not in table
    assert PUBLISHED_BY_DATA["ego_small"] == {"degree": 0.021, "cluster": 0.024, "orbit": 0.007}


def test_summarize_by_hand():
    per = [{"degree": 0.01, "cluster": 0.2, "orbit": 0.0}, {"degree": 0.05, "cluster": 0.08, "orbit": 0.007},
           {"degree": 0.03, "cluster": 0.11, "orbit": 0.02}]
    s = summarize(per, {"degree": 0.02, "cluster": 0.1, "orbit": 0.005})
    assert s["degree"]["mean"] == pytest.approx(0.03) and s["degree"]["std"] == pytest.approx(0.02)
    assert s["degree"]["sem"] == pytest.approx(0.02 / math.sqrt(3)) and s["degree"]["median"] == pytest.approx(0.03)
    assert [s[k]["n_le_published"] for k in ("degree", "cluster", "orbit")] == [2, 1, 2]
    assert s["orbit"]["pooled"] == 0.005 and s["cluster"]["max"] == 0.2
    one = summarize(per[:1], per[0])
    assert one["degree"]["std"] == 0.0 and one["chunks"] == 1


def test_sampler_settings_and_the_training_graphs_as_reference(tiny, tmp_path):
    """A sweep point: ``sampler_set`` changes the sampler the chunks are drawn with (here no corrector: half the
    NFE, and each chunk is what evaluate gives with that sampler), ``reference="train"`` scores them against
    the training graphs instead of the test graphs."""
    import dataclasses

    from graph.data import read_graphs
    from graph.metrics import evaluate_graphs
    from graph.sample import load_run

    run, _, _, _, _ = tiny
    res = run_benchmark(run, seeds=1, seed_start=5, models=("raw",), sampler_set={"corrector": "none"},
                        reference="train", out=tmp_path / "sweep", progress=False)
    assert res["models"]["raw"]["nfe"] == STEPS and res["sampler"]["corrector"] == "none"
    assert res["reference"] == "train" and res["reference_graphs"] == 80 and res["sampler_set"] == {"corrector": "none"}
    model, data_cfg, sampler, _ = load_run(run)
    data = load_data(data_cfg)
    sampler = dataclasses.replace(sampler, max_draw=0, corrector="none")
    with torch.no_grad():
        m = evaluate(model, data, sampler, STEPS, tmp_path, torch.Generator().manual_seed(5), tag="s5",
                     progress=False)
    on_train = evaluate_graphs(_train_graphs(data), read_graphs(tmp_path / "s5" / "samples.g6"))
    chunk = res["models"]["raw"]["per_chunk"][0]
    assert {k: chunk[k] for k in PUBLISHED} == pytest.approx({k: on_train[k] for k in PUBLISHED}, abs=1e-6)
    assert {k: chunk[k] for k in PUBLISHED} != {k: m[k] for k in PUBLISHED}  # m: against the test graphs
    assert "against the 80 train graphs" in (tmp_path / "sweep" / "table.md").read_text()
    assert parse_sampler_set(["snr=0.1", "solver=s4", "noise_removal=false", "n_steps=2"]) == {
        "snr": 0.1, "solver": "s4", "noise_removal": False, "n_steps": 2}
    for bad, match in ((["snr"], "KEY=VALUE"), (["seed=3"], "KEY one of"), (["snr=high"], r"(?s)'high'.*snr"),
                       (["use_ema=maybe"], r"(?s)'maybe'.*use_ema")):
        with pytest.raises(ValueError, match=match):
            parse_sampler_set(bad)
    with pytest.raises(ValueError, match="perfect generator draws training graphs"):
        run_benchmark(run, seeds=1, models=("raw", "perfect"), reference="train")
    with pytest.raises(ValueError, match="reference must be one of"):
        run_benchmark(run, seeds=1, models=("raw",), reference="holdout")
    with pytest.raises(ValueError, match="sampler.solver"):
        run_benchmark(run, seeds=1, models=("raw",), sampler_set={"solver": "ddim"})
    with pytest.raises(ValueError, match=r"(?s)'lots'.*snr"):  # a Python caller's value is checked too
        run_benchmark(run, seeds=1, models=("raw",), sampler_set={"snr": "lots"})
    with pytest.raises(SystemExit):
        main(["--run", str(run), "--out", str(tmp_path / "cli"), "--set", "snr=high"])


def test_bad_input(tiny, tmp_path):
    run, official, _, _, _ = tiny
    with pytest.raises(ValueError, match="seeds"):
        run_benchmark(run, seeds=0)
    with pytest.raises(ValueError, match="official"):
        run_benchmark(run, None, seeds=1, models=("official",))
    with pytest.raises(ValueError, match="models"):
        run_benchmark(run, seeds=1, models=("best",))
    with pytest.raises(ValueError, match="not a graph.train run"):
        run_benchmark(tmp_path, seeds=1, models=("raw",))
    with pytest.raises(ValueError, match="does not exist"):
        official_model(tmp_path / "missing.pth", 20, 10)
    with pytest.raises(ValueError, match="chunk size"):
        perfect_chunks([], [0], 1)
    for argv in (["--seeds", "0"], ["--models", "raw,best"], ["--models", "official"]):
        with pytest.raises(SystemExit):
            main(["--run", str(run), "--out", str(tmp_path / "cli"), *argv])


def test_loss_by_noise_scores_every_model_on_the_same_graphs_and_noise(tiny, capsys):
    # benchmarks.graph_loss_by_noise: the official-format checkpoint holding the run's raw weights gives the
    # run's raw losses exactly (same graphs, times and noise for every model); the EMA weights differ.
    from benchmarks.graph_loss_by_noise import BINS
    from benchmarks.graph_loss_by_noise import main as loss_main

    run, official, _, _, _ = tiny
    raw = loss_main(["--run", str(run), "--raw", "--official", str(official), "--n", "16"])
    (run_name, run_rows), (off_name, off_rows) = raw["losses"].items()
    assert off_name.startswith("official:") and len(run_rows) == len(BINS) and raw["n"] == 16
    assert run_rows == off_rows and all(math.isfinite(v) and v > 0 for row in run_rows for v in row)
    ema = loss_main(["--run", str(run), "--n", "16", "--markdown"])
    assert list(ema["losses"].values())[0] != run_rows
    assert "| [1e-05, 1] |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        loss_main(["--official", str(official)])  # no run: no data to score on
    other = run.parent / "run_other_data"  # a run of the same model on other graphs
    if not other.exists():
        import shutil

        shutil.copytree(run, other)
        info = json.loads((other / "run.json").read_text())
        info["data"]["seed"] = 5
        info["data"]["options"] = {"note": "other"}
        (other / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        loss_main(["--run", str(run), "--run", str(other), "--n", "4"])
    assert "trained on other data" in capsys.readouterr().err
