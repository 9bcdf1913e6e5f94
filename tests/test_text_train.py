"""text.train through Hydra on a tiny corpus: runs, resumes to the same weights, samples, rejects bad configs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ("model.dim=16", "model.depth=1", "model.num_heads=2", "data.seq_len=16", "data.val_fraction=0.34",
        "trainer=smoke", "trainer.progress=false", "trainer.sample_every=0")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    lines = ["Now is the winter of our discontent\n", "Made glorious summer by this sun of York;\n",
             "And all the clouds that lour'd upon our house\n"]
    for i in range(3):
        (d / f"doc{i}.txt").write_text("".join(lines[(i + j) % 3] for j in range(12)))
    return d


def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import text.train  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(REPO / "configs" / "text"), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def run(out, corpus, *overrides):
    from text.train import train

    return train(compose("data=files", f"data.paths=[{corpus}]", f"trainer.out_dir={out}", *TINY, *overrides))


def weights(out):
    from core.engine.checkpoint import load_checkpoint

    return load_checkpoint(Path(out) / "checkpoints" / "ckpt_00000006.pt")["model"]


@pytest.fixture(scope="module")
def radd_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("radd")
    return out, run(out, corpus, "model=radd")


def test_train_runs_and_resumes_to_the_same_weights(tmp_path, corpus, radd_run):
    full_dir, full = radd_run
    assert full["step"] == 6 and torch.isfinite(torch.tensor(full["loss"]))
    info = json.loads((full_dir / "run.json").read_text())
    assert info["model"]["kind"] == "radd" and info["tokenizer"]["kind"] == "char"
    assert len(info["split"]["val"]) == 1 and len(info["split"]["train"]) == 2
    part = run(tmp_path / "part", corpus, "model=radd", "trainer.stop_at=3")
    assert part["step"] == 3
    resumed = run(tmp_path / "part", corpus, "model=radd")
    assert resumed["step"] == 6
    a, b = weights(full_dir), weights(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_model_setting_is_refused_and_run_json_kept(tmp_path, corpus):
    """The text H200 session's trap: a resume under another model.dropout trained on silently and
    rewrote run.json. Now it is refused (exit 2 through Hydra) before run.json is touched."""
    from core.engine.config import ConfigError

    run(tmp_path, corpus, "model=radd", "trainer.stop_at=3")
    before = (tmp_path / "run.json").read_text()
    with pytest.raises(ConfigError, match=r"model\.dropout 0\.0 -> 0\.1"):
        run(tmp_path, corpus, "model=radd", "model.dropout=0.1")
    assert (tmp_path / "run.json").read_text() == before
    assert run(tmp_path, corpus, "model=radd")["step"] == 6  # the checkpoint's own settings resume


@pytest.mark.parametrize("kind", ["sedd", "ar", "difformer"])
def test_other_models_train_with_the_same_settings(tmp_path, corpus, kind):
    out = run(tmp_path, corpus, f"model={kind}", "trainer.steps=2", "trainer.ckpt_every=2")
    assert out["step"] == 2 and torch.isfinite(torch.tensor(out["loss"]))
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["model"]["kind"] == kind and info["parameters"] == sum(
        v.numel() for k, v in torch.load(tmp_path / "checkpoints" / "ckpt_00000002.pt", weights_only=True)["model"].items())


def test_sample_command_writes_samples_and_infill(tmp_path, radd_run):
    from text.sample import main

    out = tmp_path / "s.txt"
    main(["--run", str(radd_run[0]), "--steps", "8", "--num", "2", "--prefix", "Now", "--out", str(out)])
    text = out.read_text()
    assert "## sample 1" in text and "## infilling" in text and "### infilled" in text
    given = text.split("### given (middle blanked as '_')\n\n")[1].split("\n### infilled")[0]
    infilled = text.split("### infilled\n\n")[1].rstrip("\n")
    assert given.count("_") > 0
    head = given.split("_")[0]
    tail = given.rstrip("\n").split("_")[-1]
    assert infilled.startswith(head) and infilled.endswith(tail)  # given characters kept in place


def test_bad_configs_fail_at_start(tmp_path, corpus):
    from core.engine.config import ConfigError
    from core.engine.run import prepare

    groups = ("model", "data", "sampler")
    base = ("data=files", f"data.paths=[{corpus}]", f"trainer.out_dir={tmp_path}")
    prepare(compose(*base), groups)  # valid
    with pytest.raises(ConfigError, match="model.kind"):
        prepare(compose(*base, "model.kind=gpt"), groups)
    with pytest.raises(ConfigError, match="data.tokenizer"):
        prepare(compose(*base, "data.tokenizer=morse"), groups)
    with pytest.raises(ConfigError, match="data.paths"):
        prepare(compose("data=files", f"trainer.out_dir={tmp_path}"), groups)
    with pytest.raises(ConfigError, match="does not exist"):
        prepare(compose("data=files", "data.paths=[/nonexistent/x.txt]", f"trainer.out_dir={tmp_path}"), groups)
    with pytest.raises(ConfigError, match="hiden"):
        prepare(compose(*base, "+model.hiden=3"), groups)
    with pytest.raises(Exception, match="seqlen"):
        compose(*base, "data.seqlen=3")


def test_command_line_bad_key_exits_with_a_clear_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "text.train", "model=radd", "model.kind=gpt",
                           f"trainer.out_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "model.kind" in proc.stderr


def test_evaluate_command_on_tiny_runs(tmp_path, corpus, radd_run, capsys, monkeypatch):
    import text.evaluate
    from text.evaluate import main

    run(tmp_path / "ar", corpus, "model=ar", "trainer.steps=3", "trainer.ckpt_every=3")
    res = main(["--radd", str(radd_run[0]), "--ar", str(tmp_path / "ar"), "--val-chunks", "4", "--bound-samples", "2",
                "--num-samples", "2", "--steps", "4", "--speed-steps", "2", "--out", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["radd"]["method"] == "lambda"
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("\n{") + 1:]) == json.loads((tmp_path / "e.json").read_text())

    def disk_full(path, write):
        raise OSError("disk full")

    monkeypatch.setattr(text.evaluate, "atomic_write", disk_full)  # the results file cannot be written
    with pytest.raises(OSError, match="disk full"):
        main(["--ar", str(tmp_path / "ar"), "--val-chunks", "2", "--num-samples", "1", "--speed-steps", "",
              "--out", str(tmp_path / "f.json")])
    assert '"perplexity"' in capsys.readouterr().out  # printed before the write: the results are not lost
    assert res["radd"]["ratio_to_ar"] == pytest.approx(res["radd"]["perplexity_bound"] / res["ar"]["perplexity"])
    assert 1.0 < res["ar"]["perplexity"] < 40 and res["radd"]["nfe"] <= 5  # vocabulary of the corpus: < 40
    assert set(res["speed"]) == {"radd_cached", "radd_uncached"}
    with pytest.raises(ValueError, match="other data"):  # runs on different data cannot be compared
        other = tmp_path / "other"
        run(other, corpus, "model=ar", "trainer.steps=2", "trainer.ckpt_every=2", "data.seq_len=8")
        main(["--radd", str(radd_run[0]), "--ar", str(other), "--val-chunks", "2", "--speed-steps", ""])


def test_evaluate_with_an_independent_scorer(tmp_path, corpus, radd_run, capsys):
    from text.evaluate import main, validation_chunks
    from text.metrics import ar_perplexity
    from text.sample import load_run, sample_ar

    run(tmp_path / "ar", corpus, "model=ar", "trainer.steps=3", "trainer.ckpt_every=3")
    run(tmp_path / "scorer", corpus, "model=ar", "trainer.steps=4", "trainer.ckpt_every=4", "trainer.seed=5")
    args = ["--radd", str(radd_run[0]), "--ar", str(tmp_path / "ar"), "--val-chunks", "4", "--bound-samples", "1",
            "--num-samples", "2", "--steps", "4", "--speed-steps", ""]
    base = main(args)
    assert base["scorer"]["heldout_gen_ppl"] == pytest.approx(base["ar"]["perplexity"])  # the baseline scores
    res = main([*args, "--scorer", str(tmp_path / "scorer")])
    ar, tok, info = load_run(tmp_path / "ar")
    scorer, _, _ = load_run(tmp_path / "scorer")
    val = validation_chunks(info, tok)
    val = val[torch.linspace(0, len(val) - 1, min(4, len(val))).round().long()]
    assert res["scorer"]["heldout_gen_ppl"] == pytest.approx(ar_perplexity(scorer, val))
    xs, _ = sample_ar(ar, 2, val.shape[1], generator=torch.Generator().manual_seed(0))
    assert res["ar"]["gen_ppl"] == pytest.approx(ar_perplexity(scorer, xs))
    assert abs(res["ar"]["gen_ppl"] - base["ar"]["gen_ppl"]) > 1e-6  # another model scored them
    assert res["ar"]["perplexity"] == base["ar"]["perplexity"] and res["radd"]["nll_bound"] == base["radd"]["nll_bound"]
    with pytest.raises(SystemExit) as e:  # refused at start, naming the flag and both kinds
        main([*args, "--scorer", str(radd_run[0])])
    assert e.value.code == 2 and "--scorer" in (err := capsys.readouterr().err)
    assert "model.kind='radd'" in err and "model.kind='ar'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_evaluate_device_cuda_without_cuda_exits_2(tmp_path, capsys):
    from text.evaluate import main

    with pytest.raises(SystemExit) as e:  # before any run is read: the path need not exist
        main(["--ar", str(tmp_path / "absent"), "--device", "cuda"])
    assert e.value.code == 2 and "--device 'cuda'" in capsys.readouterr().err


def test_sample_command_default_prefix_outside_the_alphabet(tmp_path, radd_run, capsys):
    """The default --prefix 'ROMEO.\\n' crashed on a character run whose alphabet lacks 'R'; now that
    example is skipped with a warning, and an explicit --prefix that cannot be encoded exits 2."""
    from text.sample import main

    out = tmp_path / "s.txt"
    with pytest.warns(UserWarning, match=r"skipping the prefix example.*'R'"):
        main(["--run", str(radd_run[0]), "--steps", "4", "--num", "1", "--out", str(out)])
    text = out.read_text()
    assert "## sample 0" in text and "## prefix" not in text and "### infilled" in text
    with pytest.raises(SystemExit) as e:
        main(["--run", str(radd_run[0]), "--steps", "4", "--num", "1", "--prefix", "Now ROMEO", "--out", str(out)])
    assert e.value.code == 2 and "--prefix 'Now ROMEO'" in capsys.readouterr().err


def test_bpe_runs_compare_by_tokenizer_content_and_load_after_moving(tmp_path, corpus):
    """Two BPE runs on the same data (identical tokenizers) were refused by text.evaluate, since each
    spec held its own absolute tokenizer.json path; a moved run folder could not be loaded."""
    import shutil

    pytest.importorskip("tokenizers")
    from text.evaluate import main
    from text.sample import load_run

    bpe = ("data.tokenizer=bpe", "data.bpe_vocab_size=300", "trainer.steps=2", "trainer.ckpt_every=2")
    run(tmp_path / "ar", corpus, "model=ar", *bpe)
    run(tmp_path / "radd", corpus, "model=radd", *bpe)
    for k in ("ar", "radd"):
        assert json.loads((tmp_path / k / "run.json").read_text())["tokenizer"] == {"kind": "bpe", "path": "tokenizer.json"}
    res = main(["--ar", str(tmp_path / "ar"), "--radd", str(tmp_path / "radd"), "--val-chunks", "2",
                "--bound-samples", "1", "--num-samples", "1", "--steps", "2", "--speed-steps", ""])
    assert res["vocab_size"] > 256 and math.isfinite(res["radd"]["nll_bound"])
    _, tok, _ = load_run(tmp_path / "ar")
    shutil.move(tmp_path / "ar", tmp_path / "moved" / "ar")  # e.g. brought back from another machine
    model, moved, _ = load_run(tmp_path / "moved" / "ar")
    assert model.kind == "ar" and moved.fingerprint() == tok.fingerprint()
    assert moved.path == str(tmp_path / "moved" / "ar" / "tokenizer.json")
    # benchmarks.text_long's pack (weights brought back from a GPU run) carries the BPE file along
    from benchmarks.text_long import pack

    pack(tmp_path, ["radd"], 2, tmp_path / "packed")
    _, packed, _ = load_run(tmp_path / "packed" / "radd")
    assert packed.fingerprint() == tok.fingerprint()


def test_several_ema_decays_load_the_first_configured_decay(tmp_path, corpus):
    """With ema_decays=[0.999, 0.99], load_run(run) took the export first by file name (0.99) and
    load_run(run, step=last) the first configured decay (0.999); both now load 0.999."""
    from core.engine.checkpoint import checkpoint_path, load_checkpoint
    from text.sample import load_run

    out = tmp_path / "radd"
    run(out, corpus, "model=radd", "trainer.steps=2", "trainer.ckpt_every=2", "trainer.ema_decays=[0.999,0.99]")
    assert sorted(p.name for p in out.glob("ema_*.safetensors")) == ["ema_0.99.safetensors", "ema_0.999.safetensors"]
    shadows = load_checkpoint(checkpoint_path(out / "checkpoints", 2))["ema"]["shadows"]
    assert not all(torch.equal(shadows["0.999"][k], shadows["0.99"][k]) for k in shadows["0.999"])

    def loaded(**kw):
        return load_run(out, **kw)[0].state_dict()

    final, at_step = loaded(), loaded(step=2)
    for k, v in final.items():
        assert torch.equal(v, at_step[k]) and torch.equal(v, shadows["0.999"][k]), k
    info = json.loads((out / "run.json").read_text())
    assert info["ema_decays"] == [0.999, 0.99]
    del info["ema_decays"]  # a run.json written before the decays were recorded: the checkpoint's order
    (out / "run.json").write_text(json.dumps(info))
    assert all(torch.equal(v, final[k]) for k, v in loaded().items())
    for p in out.glob("ema_*.safetensors"):  # no export: the newest checkpoint's first decay
        p.unlink()
    assert all(torch.equal(v, final[k]) for k, v in loaded().items())


def test_bpe_resume_under_another_vocab_size_is_refused_and_the_run_kept(tmp_path, corpus):
    """A resume with another data.bpe_vocab_size overwrote the run's tokenizer.json before the engine
    refused the checkpoint (a raw size-mismatch error), so the finished run could no longer sample.
    Now it is refused at start, naming the setting, and tokenizer.json and run.json are left alone."""
    pytest.importorskip("tokenizers")
    from core.engine.config import ConfigError
    from text.sample import main as sample_main

    bpe = ("model=radd", "data.tokenizer=bpe", "trainer.steps=4", "trainer.ckpt_every=2")
    run(tmp_path, corpus, *bpe, "data.bpe_vocab_size=300", "trainer.stop_at=2")
    tok_before, info_before = (tmp_path / "tokenizer.json").read_bytes(), (tmp_path / "run.json").read_text()
    with pytest.raises(ConfigError, match=r"data\.bpe_vocab_size 300 -> 280.*280 tokens against the run's 300.*"
                                          r"new trainer\.out_dir"):
        run(tmp_path, corpus, *bpe, "data.bpe_vocab_size=280")
    assert (tmp_path / "tokenizer.json").read_bytes() == tok_before
    assert (tmp_path / "run.json").read_text() == info_before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    sample_main(["--run", str(tmp_path), "--steps", "2", "--num", "1", "--prefix", "Now"])  # the run still samples
    assert run(tmp_path, corpus, *bpe, "data.bpe_vocab_size=300")["step"] == 4  # the run's own settings resume
    assert (tmp_path / "tokenizer.json").read_bytes() == tok_before


def test_char_resume_on_changed_text_is_refused(tmp_path, corpus):
    """The same check for the character tokenizer. An alphabet of the same size but other characters
    fits the checkpoint's shapes, so the engine resumed it silently with every id meaning another one."""
    import shutil

    from core.engine.config import ConfigError

    docs = tmp_path / "docs"
    shutil.copytree(corpus, docs)
    run(tmp_path / "run", docs, "model=radd", "trainer.stop_at=3")
    for f in docs.glob("*.txt"):  # 'Y' (only in "York") becomes 'Q': as many characters, other ones
        f.write_text(f.read_text().replace("York", "Qork"))
    with pytest.raises(ConfigError, match=r"training text changed the tokenizer.*char vocabulary it builds has 29 "
                                          r"tokens like the run's, but other ones.*trainer\.out_dir"):
        run(tmp_path / "run", docs, "model=radd")


def test_data_settings_checked_before_loading(tmp_path, corpus):
    from core.engine.config import ConfigError
    from core.engine.run import prepare

    groups = ("model", "data", "sampler")
    base = ("data=files", f"data.paths=[{corpus}]", f"trainer.out_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"model\.loss='lambda' applies to model\.kind=radd only; model\.kind='sedd'"):
        prepare(compose(*base, "model=sedd", "model.loss=lambda"), groups)
    prepare(compose(*base, "model=radd", "model.loss=lambda"), groups)  # RADD's own choice
    with pytest.raises(ConfigError, match=r"data\.bpe_vocab_size must be >= 257.*got 0"):
        prepare(compose(*base, "data.tokenizer=bpe", "data.bpe_vocab_size=0"), groups)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no text here")
    with pytest.raises(ConfigError, match=r"data\.paths holds a directory without \*\.txt files: .*empty"):
        prepare(compose("data=files", f"data.paths=[{tmp_path / 'empty'}]", f"trainer.out_dir={tmp_path}"), groups)


def test_unusable_corpus_is_a_config_error_naming_the_setting(tmp_path, corpus):
    """seq_len longer than a split, or a one-file corpus: tracebacks from deep in the data code
    (exit 1); now ConfigErrors naming the setting, which the command line exits 2 with."""
    from core.engine.config import ConfigError
    from text.train import TextDataConfig, prepare_data

    with pytest.raises(ConfigError, match=r"data\.seq_len=100000 is longer than the training split, whose \d+ tokens"):
        prepare_data(TextDataConfig(corpus="files", paths=[str(corpus)], seq_len=100000))
    one = corpus / "doc0.txt"
    with pytest.raises(ConfigError, match=r"data\.val_fraction=0\.1 on the 1 document\(s\).*give more documents"):
        prepare_data(TextDataConfig(corpus="files", paths=[str(one)]))
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ConfigError, match=r"data\.paths=.*bad\.txt' is not UTF-8"):
        prepare_data(TextDataConfig(corpus="files", paths=[str(tmp_path / "bad.txt"), str(corpus)]))
    proc = subprocess.run([sys.executable, "-m", "text.train", "data=files", f"data.paths=[{one}]", *TINY,
                           f"trainer.out_dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "data.val_fraction=0.34" in proc.stderr and "Traceback" not in proc.stderr


def _fake_run(folder, kind):
    """A run folder with only a run.json (what the command-line checks read before any work)."""
    folder.mkdir(parents=True)
    info = {"model": {"kind": kind}, "data": {}, "tokenizer": {"kind": "char", "alphabet": "ab"}, "vocab_size": 2}
    (folder / "run.json").write_text(json.dumps(info))
    return str(folder)


def test_evaluate_refuses_bad_flags_before_evaluating(tmp_path, radd_run, capsys, monkeypatch):
    """--speed-steps was parsed, and --out written, after the whole evaluation (and a bad one lost it);
    a RADD run given as --sedd was evaluated as 'sedd'; --num-samples 0 failed deep inside."""
    import text.evaluate as ev

    def no_work(*a, **k):
        raise AssertionError("evaluation started")

    monkeypatch.setattr(ev, "load_run", no_work)
    ar = _fake_run(tmp_path / "ar", "ar")
    cases = [(["--speed-steps", "4,x"], ["--speed-steps", "'4,x'"]), (["--speed-steps", "0"], ["--speed-steps", "'0'"]),
             (["--num-samples", "0"], ["--num-samples", "'0'"]), (["--val-chunks", "0"], ["--val-chunks", "'0'"]),
             (["--out", str(tmp_path / "absent" / "r.json")], ["--out", "does not exist"]),
             (["--sedd", str(radd_run[0])], ["--sedd", "model.kind='radd'", "model.kind='sedd'", "give it as --radd"]),
             (["--radd", _fake_run(tmp_path / "img", "dit")], ["--radd", "not a text.train run", "'dit'"])]
    for flags, words in cases:
        with pytest.raises(SystemExit) as e:
            ev.main(["--ar", ar, *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(w in err for w in words), (flags, err)


def test_sample_command_refuses_bad_flags_before_sampling(tmp_path, radd_run, capsys, monkeypatch):
    """--num 0 / --steps 0 / --length -5 failed inside the samplers, --length 0 silently meant the default,
    --out <a folder> failed after sampling, an image.train run failed with a TypeError on its model keys."""
    import text.sample as ts

    def no_work(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(ts, "load_run", no_work)
    (tmp_path / "img").mkdir()  # what image.train writes: no tokenizer, an image model
    (tmp_path / "img" / "run.json").write_text(json.dumps({"model": {"kind": "dit", "patch_size": 2}, "data": {},
                                                           "input_size": [32, 32], "num_classes": 10}))
    image_run = str(tmp_path / "img")
    run_dir = str(radd_run[0])
    cases = [(["--run", run_dir, "--num", "0"], ["--num", "'0'"]), (["--run", run_dir, "--steps", "0"], ["--steps"]),
             (["--run", run_dir, "--length", "-5"], ["--length", "'-5'"]), (["--run", run_dir, "--length", "0"], ["--length"]),
             (["--run", run_dir, "--temperature", "0"], ["--temperature"]),
             (["--run", run_dir, "--out", str(tmp_path)], ["--out", "is a directory"]),
             (["--run", image_run], ["--run", "not a text.train run", "'dit'", "tokenizer, vocab_size"])]
    for flags, words in cases:
        with pytest.raises(SystemExit) as e:
            ts.main(flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and all(w in err for w in words), (flags, err)


def test_sample_command_writes_atomically(tmp_path, radd_run, monkeypatch):
    """samples.txt was written in place: a failed write left a truncated file instead of the old one."""
    import os

    from text.sample import main

    out = tmp_path / "s.txt"
    out.write_text("earlier samples\n")

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        main(["--run", str(radd_run[0]), "--steps", "2", "--num", "1", "--prefix", "Now", "--out", str(out)])
    assert out.read_text() == "earlier samples\n" and [p.name for p in tmp_path.iterdir()] == ["s.txt"]
