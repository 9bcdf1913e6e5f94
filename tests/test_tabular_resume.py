"""Checkpoints of a CDTD fit: an interrupted fit (``stop_at``) continues bit for bit, through the API
and through ``python -m tabular.train`` (``trainer.stop_at`` / ``trainer.resume``); a checkpoint of
another fit is refused, naming what differs."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from core.engine.checkpoint import CheckpointError, list_checkpoints
from tabular.api import TabularDiffusion
from tabular.train import main

TINY = dict(hidden=32, mlp_layers=1, emb_dim=4, batch_size=48, progress=False, sample_steps=3, calibration_rows=0,
            steps=12, warmup_steps=3, dropout=0.1)  # dropout: draws from the global RNG, which must resume too


def _table(n=100, seed=0):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.normal(size=n), "k": rng.integers(0, 4, n).astype(float) * 10,  # ties: dequantised
                       "b": rng.choice(["x", "y", "z"], n)})
    df.loc[rng.random(n) < 0.1, "a"] = np.nan
    return df


def _same_weights(m1, m2):
    s1, s2 = m1.model.state_dict(), m2.model.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k


def test_a_fit_stopped_and_resumed_equals_the_uninterrupted_one(tmp_path):
    df = _table()
    whole = TabularDiffusion(**TINY).fit(df)
    d = tmp_path / "ckpt"
    part = TabularDiffusion(**TINY).fit(df, checkpoint_dir=d, ckpt_every=4, stop_at=6)
    assert part.stopped_at == 6 and part.calibration is None and part.fit_steps == 6
    assert [s for s, _ in list_checkpoints(d)] == [4, 6]
    rest = TabularDiffusion(**TINY).fit(df, checkpoint_dir=d, ckpt_every=4, keep_last=2)  # resume="auto"
    assert rest.stopped_at is None and rest.fit_steps == 12
    assert [s for s, _ in list_checkpoints(d)] == [8, 12]  # keep_last
    _same_weights(whole, rest)
    assert rest.history == whole.history
    pd.testing.assert_frame_equal(whole.sample(20, seed=1), rest.sample(20, seed=1))
    # the final checkpoint: a fit run again (killed after training, say) trains nothing more
    again = TabularDiffusion(**TINY).fit(df, checkpoint_dir=d, resume=True)
    _same_weights(whole, again)
    # ... and a checkpoint named by path continues from that step
    mid = TabularDiffusion(**TINY).fit(df, checkpoint_dir=d, resume=str(d / "ckpt_00000008.pt"))
    _same_weights(whole, mid)


def test_a_checkpoint_of_another_fit_is_refused(tmp_path):
    df = _table()
    d = tmp_path / "ckpt"
    TabularDiffusion(**TINY).fit(df, checkpoint_dir=d, stop_at=2)
    for kwargs, data, msg in (({"lr": 2e-3}, df, r"fit.lr 0.001 -> 0.002"),
                              ({"hidden": 16}, df, r"model.hidden 32 -> 16"),
                              ({}, _table(seed=1), "the training table")):
        with pytest.raises(CheckpointError, match=msg):
            TabularDiffusion(**{**TINY, **kwargs}).fit(data, checkpoint_dir=d)
    with pytest.raises(CheckpointError, match="resume=False but .* already holds checkpoints"):
        TabularDiffusion(**TINY).fit(df, checkpoint_dir=d, resume=False)
    with pytest.raises(CheckpointError, match="resume=True but .* holds no loadable checkpoint"):
        TabularDiffusion(**TINY).fit(df, checkpoint_dir=tmp_path / "empty", resume=True)
    with pytest.raises(ValueError, match="stop_at=3 needs checkpoint_dir"):
        TabularDiffusion(**TINY).fit(df, stop_at=3)
    with pytest.raises(ValueError, match="stop_at must be .* got 13"):
        TabularDiffusion(**TINY).fit(df, checkpoint_dir=d, stop_at=13)


def _run(monkeypatch, run_dir, *overrides):
    argv = ["tabular.train", "data=csv", "trainer=smoke", "trainer.steps=8", "eval.baseline=false",
            "sampler.steps=2", "sampler.calibration_rows=0", "model.hidden=32", "model.mlp_layers=1",
            "hydra/job_logging=disabled", "hydra/hydra_logging=disabled", f"hydra.run.dir={run_dir}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    main()


def test_train_entry_point_stops_and_resumes_bit_for_bit(monkeypatch, tmp_path, capsys):
    path = tmp_path / "t.csv"
    _table().to_csv(path, index=False)
    _run(monkeypatch, tmp_path / "whole", f"data.path={path}", "trainer.ckpt_every=0")
    run = tmp_path / "split"
    _run(monkeypatch, run, f"data.path={path}", "trainer.stop_at=3", "trainer.ckpt_every=2")
    assert "stopped at step 3" in capsys.readouterr().out
    assert not (run / "model").exists() and not (run / "synthetic.csv").exists()
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 3]
    _run(monkeypatch, run, f"data.path={path}", "trainer.resume=true", "trainer.ckpt_every=2")
    for name in ("model/model.safetensors", "synthetic.csv"):
        assert (run / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # another fit's settings in the same run directory: exit 4 naming the setting, nothing overwritten
    before = (run / "synthetic.csv").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _run(monkeypatch, run, f"data.path={path}", "trainer.lr=0.01")
    assert e.value.code == 4 and "fit.lr 0.001 -> 0.01" in capsys.readouterr().err
    assert (run / "synthetic.csv").read_bytes() == before
