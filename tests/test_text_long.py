"""benchmarks.text_long: side-by-side runs, evaluation at common checkpoints, the packed weights."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.text_long import main, pick, summarize

TINY = ["--dim", "32", "--depth", "1", "--heads", "2", "--seq-len", "32", "--batch", "8", "--warmup", "2",
        "--precision", "fp32", "--device", "cpu", "--eval-device", "cpu", "--eval-threads", "1", "--val-chunks", "8",
        "--bound-samples", "2", "--num-samples", "2", "--sample-steps", "8", "--speed-steps", "8",
        "--override", "data.val_fraction=0.05"]


def test_pick_spreads_and_keeps_the_last():
    assert pick([1, 2, 3], 5) == [1, 2, 3]
    three = pick(list(range(1, 11)), 3)
    assert three[0] == 1 and three[-1] == 10 and three[1] in (5, 6) and pick(list(range(1, 11)), 2) == [1, 10]
    assert pick([2, 4, 6], 1) == [6]


@pytest.mark.parametrize("bad", [["--models", "radd,gpt"], ["--models", "radd"], ["--models", "ar,ar"],
                                 ["--evals", "0"], ["--train-seconds", "-1"],
                                 ["--model-override", "gpt:model.dropout=0.1"], ["--model-override", "ar-model.dropout"]])
def test_bad_arguments_exit_2_naming_them(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path), *bad])
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any run starts


def test_runs_evaluates_common_steps_and_packs(tmp_path, capsys):
    out, pack = tmp_path / "runs", tmp_path / "pack"
    s = main(["--out", str(out), "--models", "radd,ar", "--train-seconds", "300", "--steps", "12",
              "--ckpt-every", "6", "--evals", "4", "--eval-parallel", "2", "--pack", str(pack), *TINY,
              "--model-override", "ar:model.dropout=0.1"])
    runs = s["train"]["runs"]
    assert {k: (v["returncode"], v["stopped_by_clock"], v["checkpoints"]) for k, v in runs.items()} == {
        "radd": (0, False, [6, 12]), "ar": (0, False, [6, 12])}
    assert sorted(s["evals"]) == [6, 12]
    for step, r in s["evals"].items():
        on_disk = json.loads((out / f"eval_{step}.json").read_text())
        assert on_disk["step"] == step and on_disk["radd"]["nll_bound"] == r["radd"]["nll_bound"]
        assert r["radd"]["ratio_to_ar"] == pytest.approx(math.exp(r["radd"]["nll_bound"]) / r["ar"]["perplexity"])
    assert s["evals"][12]["speed"] and not s["evals"][6]["speed"]  # sampling speed at the last step only
    best, table = summarize(s["evals"], ["radd", "ar"])
    assert best == s["best"] and "| 12 |" in table
    # The pack holds the EMA weights of the last common step, in bf16, loadable without --step.
    from core.engine.checkpoint import checkpoint_path, load_checkpoint
    from text.sample import load_run

    model, _, info = load_run(pack / "radd")
    ema = next(iter(load_checkpoint(checkpoint_path(out / "radd" / "checkpoints", 12))["ema"]["shadows"].values()))
    for name, p in model.state_dict().items():
        assert torch.equal(p, ema[name].to(torch.bfloat16).float()), name
    assert info["model"]["kind"] == "radd"
    # text.sample runs on a pack too (no validation chunk travels with it: no infilling example)
    from text.sample import main as sample_main

    sample_main(["--run", str(pack / "radd"), "--steps", "4", "--num", "1", "--out", str(tmp_path / "s.txt")])
    assert "## sample 0" in (tmp_path / "s.txt").read_text() and "no infilling example" in capsys.readouterr().out
    # a second call on the same --out is refused (the runs would silently resume) unless --resume
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--models", "radd,ar", *TINY])
    assert e.value.code == 2 and f"{out / 'radd'}, {out / 'ar'} already hold checkpoints" in capsys.readouterr().err
    # --model-override reaches its model only
    assert [json.loads((out / k / "run.json").read_text())["model"]["dropout"] for k in ("radd", "ar")] == [0.0, 0.1]
    # with --resume the finished runs go on from their checkpoints (nothing left to train) and are scored again
    again = main(["--out", str(out), "--models", "radd,ar", "--train-seconds", "300", "--steps", "12", "--ckpt-every",
                  "6", "--evals", "4", "--eval-parallel", "2", *TINY, "--model-override", "ar:model.dropout=0.1",
                  "--resume"])
    assert {k: v["checkpoints"] for k, v in again["train"]["runs"].items()} == {"radd": [6, 12], "ar": [6, 12]}
    # the rate counts the steps this call trained, to when the newest checkpoint was written
    assert all(v["start_step"] == 0 and v["steps_per_s"] > 0 for v in runs.values())
    assert all(v["start_step"] == 12 and v["steps_per_s"] == 0.0 for v in again["train"]["runs"].values())
    assert again["evals"][12]["radd"]["nll_bound"] == s["evals"][12]["radd"]["nll_bound"]


def test_the_speed_timing_evaluation_runs_alone_after_the_others(tmp_path, monkeypatch):
    """The last step's evaluation times cached against uncached sampling: no other evaluation may share
    the device meanwhile (it started first, beside eval_parallel - 1 others)."""
    import argparse

    import benchmarks.text_long as tl

    launched, live = [], set()

    class FakeEval:  # finishes at its second poll, writing the JSON text.evaluate would write
        def __init__(self, cmd, **kw):
            self.polls, self.returncode = 0, None
            step, speed = int(cmd[cmd.index("--step") + 1]), cmd[cmd.index("--speed-steps") + 1]
            launched.append((step, speed, len(live)))
            live.add(self)
            (tmp_path / f"eval_{step}.json").write_text(json.dumps({"step": step}))

        def poll(self):
            self.polls += 1
            if self.polls >= 2:
                self.returncode = 0
                live.discard(self)
            return self.returncode

    monkeypatch.setattr(tl.subprocess, "Popen", FakeEval)
    monkeypatch.setattr(tl.time, "sleep", lambda s: None)
    a = argparse.Namespace(eval_threads=1, eval_device="cpu", val_chunks=1, bound_samples=1, num_samples=1,
                           sample_steps=2, speed_steps="32,1024", eval_parallel=3)
    res = tl.evaluate(a, ["radd", "ar"], tmp_path, [2, 4, 6, 8])
    assert sorted(res) == [2, 4, 6, 8]
    assert [x for x in launched if x[1]] == [(8, "32,1024", 0)] and launched[-1][0] == 8
    assert max(n for _, _, n in launched) == 2  # the others still ran eval_parallel at a time
