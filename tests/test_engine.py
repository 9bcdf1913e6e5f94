"""Training engine: EMA, schedules, checkpoints, resume, non-finite loss, configs, safety.

Subprocess tests run ``python -m core.engine.example`` (and ``torchrun`` for two ranks) in the
repository, the way a user would; the rest drive ``Trainer`` in-process on a tiny MLP.
"""

from __future__ import annotations

import csv
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from core.engine import EMA, NonFiniteLossError, Trainer, TrainerConfig, lr_factor
from core.engine.checkpoint import (
    CheckpointError,
    atomic_write,
    checkpoint_path,
    export_ema_from_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_loadable,
    prune_checkpoints,
    save_checkpoint,
)
from core.engine.config import ConfigError, validate_trainer

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(PY).parent / "torchrun")


# ----------------------------------------------------------------------------- helpers


def tiny_model(seed: int = 0, dim: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim + 1, 16), nn.SiLU(), nn.Dropout(0.1), nn.Linear(16, dim))


def tiny_data(n: int = 50, dim: int = 3) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(123))


def denoise_loss(model, x0, g):
    """Uses the generator and (through dropout) the global RNG: both must be restored on resume."""
    t = torch.rand(x0.shape[0], 1, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    xt = (1 - t) * x0 + t * eps
    return {"loss": (model(torch.cat([xt, t], 1)) - x0).float().pow(2).mean(), "t_mean": t.mean()}


def make_cfg(tmp: Path, **kw) -> TrainerConfig:
    base = dict(seed=3, steps=12, batch_size=8, grad_accum=2, lr=1e-2, warmup_steps=3, schedule="cosine",
                grad_clip=0.5, ema_decays=[0.9, 0.99], ema_warmup=True, ckpt_every=4, keep_last=2, log_every=2,
                out_dir=str(tmp), resume="auto", progress=False, tensorboard=False)
    base.update(kw)
    return TrainerConfig(**base)


def assert_same(a, b, path="state"):
    """Bitwise equality of nested checkpoint structures."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def training_state(ckpt: dict) -> dict:
    return {k: ckpt[k] for k in ("step", "model", "ema", "optimizer", "scheduler", "data", "rng")}


def example_cmd(out: Path, *overrides: str, torchrun: int = 0) -> list[str]:
    head = [TORCHRUN, "--standalone", f"--nproc_per_node={torchrun}", "-m"] if torchrun else [PY, "-m"]
    return [*head, "core.engine.example", f"hydra.run.dir={out}", "trainer.progress=false", *overrides]


def example_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", "HYDRA_FULL_ERROR": "0"}
    env.update(extra)
    return env


def run_example(out: Path, *overrides: str, torchrun: int = 0, check: bool = True, **env):
    proc = subprocess.run(example_cmd(out, *overrides, torchrun=torchrun), cwd=REPO, env=example_env(**env),
                          capture_output=True, text=True, timeout=240)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


SMOKE = ("trainer=smoke", "trainer.sample_every=0", "data.n=512", "model.hidden=32")

# ----------------------------------------------------------------------------- EMA, schedules


def test_ema_one_update_equals_formula():
    model = tiny_model()
    ema = EMA(model, decays=[0.9, 0.999])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for d in (0.9, 0.999):
        avg = ema.averaged(d)
        for n, p in model.named_parameters():
            torch.testing.assert_close(avg[n], d * before[n] + (1 - d) * p.detach(), rtol=1e-6, atol=1e-7)
    # Warm-up: update n uses min(d, (1 + n) / (10 + n)).
    w = EMA(model, decays=[0.999], warmup=True)
    assert w.effective_decay(0.999) == pytest.approx(0.1)
    start = {n: t.clone() for n, t in w.averaged().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    w.update(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(w.averaged()[n], 0.1 * start[n] + 0.9 * p.detach(), rtol=1e-6, atol=1e-7)
    assert w.effective_decay(0.999) == pytest.approx(2 / 11)
    # Swapping EMA weights in and out restores the training weights exactly.
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    with w.swapped_in(model) as m:
        for n, p in m.named_parameters():
            assert torch.equal(p, w.averaged()[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, current[n])


def test_lr_schedule_values(tmp_path):
    # warm-up: (k + 1) / W for k < W
    assert [lr_factor(k, 4, 20, "constant") for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # cosine from 1 at the end of warm-up to min_ratio at the last step
    assert lr_factor(4, 4, 20, "cosine") == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 4, 14, "cosine", 0.2) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(0, 0, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(5, 0, 10, "linear") == pytest.approx(0.5)
    # The trainer's optimiser follows the schedule step by step.
    cfg = make_cfg(tmp_path, steps=10, warmup_steps=2, schedule="linear", min_lr_ratio=0.1, lr=0.5,
                   ckpt_every=0, export_ema=False, log_every=1)
    seen = []

    def loss(model, x, g):
        seen.append(tr.optimizer.param_groups[0]["lr"])
        return denoise_loss(model, x, g)

    tr = Trainer(tiny_model(), loss, tiny_data(), cfg)
    tr.fit()
    expected = [0.5 * lr_factor(k, 2, 10, "linear", 0.1) for k in range(10)]
    assert seen[::2] == pytest.approx(expected)  # two micro-steps per step


def test_exponential_schedule_matches_torch_exponential_lr(tmp_path):
    # GDSS decays its lr by gamma per epoch with ExponentialLR; over E one-step epochs that is
    # schedule=exponential with min_lr_ratio = gamma ** E, step for step.
    gamma, epochs = 0.97, 40
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    ref = []
    for _ in range(epochs + 1):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [0.2 * lr_factor(k, 0, epochs, "exponential", gamma**epochs) for k in range(epochs + 1)]
    assert ours == pytest.approx(ref, rel=1e-12)
    # after a warm-up the decay spans the remaining steps
    assert lr_factor(5, 5, 25, "exponential", 0.01) == pytest.approx(1.0)
    assert lr_factor(15, 5, 25, "exponential", 0.01) == pytest.approx(0.1)
    # min_lr_ratio 0 cannot be reached geometrically: refused at the config and in the function
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        validate_trainer(make_cfg(tmp_path, schedule="exponential", min_lr_ratio=0.0), world_size=1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_factor(3, 0, 10, "exponential", 0.0)


# ----------------------------------------------------------------------------- checkpoint files


def test_atomic_write_and_keep_last_k(tmp_path):
    for step in range(1, 6):
        save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, checkpoint_path(tmp_path, step))
        prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000004.pt", "ckpt_00000005.pt"]
    # A writer that fails half-way leaves the previous file intact and no temporary behind.
    target = checkpoint_path(tmp_path, 5)

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert load_checkpoint(target)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000004.pt", "ckpt_00000005.pt"]
    # A torn file under a checkpoint name is reported as corrupt, and auto-resume skips it.
    checkpoint_path(tmp_path, 6).write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        load_checkpoint(checkpoint_path(tmp_path, 6))
    path, state = newest_loadable(tmp_path)
    assert path == target and state["step"] == 5


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "ckpts" / "ckpt_00000009.pt"
    evil.parent.mkdir()
    torch.save({"step": 9, "model": {"w": torch.zeros(2)}, "payload": _Evil(str(marker))}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refusing"):  # auto-resume does not skip past it silently
        newest_loadable(evil.parent)
    cfg = make_cfg(tmp_path / "run", resume=str(evil))
    with pytest.raises(CheckpointError, match="refusing"):
        Trainer(tiny_model(), denoise_loss, tiny_data(), cfg).fit()
    assert not marker.exists()


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("as_dataset", [False, True], ids=["tensor", "dataset"])
def test_resume_is_bit_identical(tmp_path, as_dataset):
    """N steps straight == N/2 steps, stop, new Trainer resumes for N/2 (same seed, CPU)."""
    data = tiny_data(50)
    if as_dataset:
        data = [row for row in data]  # a plain map-style dataset (list), batched by a DataLoader
    n = 14  # 50 samples / micro-batch 4 = 12 micro-batches per epoch: epochs wrap mid-run
    straight = Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path / "a", steps=n))
    straight.fit()
    first = Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path / "b", steps=n))
    first.fit(stop_at=n // 2)
    assert first.step == n // 2 and (first.epoch, first.index) == (1, 2)
    second = Trainer(tiny_model(seed=99), denoise_loss, data, make_cfg(tmp_path / "b", steps=n))
    second.fit()
    a = load_checkpoint(checkpoint_path(tmp_path / "a" / "checkpoints", n))
    b = load_checkpoint(checkpoint_path(tmp_path / "b" / "checkpoints", n))
    assert_same(training_state(a), training_state(b))
    assert a["optimizer"]["state"]  # non-trivial Adam moments were compared
    # Metrics after the resume continue the log without duplicates (step 7: the stop).
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [2, 4, 6, 7, 8, 10, 12, 14]


def test_resume_past_a_corrupt_or_abandoned_checkpoint_keeps_its_own(tmp_path):
    """Resuming from an older checkpoint than the newest (the newest is torn, or ``resume`` names an
    older one) sets the later ones aside, renamed, so pruning (newest steps kept) does not delete the
    run's own new checkpoints and a later resume=auto continues this run, not the abandoned one."""
    data = tiny_data(50)
    ck = tmp_path / "a" / "checkpoints"
    Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path / "a", ckpt_every=1, keep_last=1)).fit(stop_at=5)
    good = checkpoint_path(ck, 5).read_bytes()
    checkpoint_path(ck, 9).write_bytes(good[: len(good) // 2])  # a torn file of a later step
    with pytest.warns(UserWarning, match=r"steps after 5 .*ckpt_00000009\.pt\.set-aside"):
        result = Trainer(tiny_model(), denoise_loss, data,
                         make_cfg(tmp_path / "a", ckpt_every=1, keep_last=1)).fit(stop_at=7)
    assert result["checkpoint"].exists() and [s for s, _ in list_checkpoints(ck)] == [7]
    assert (ck / "ckpt_00000009.pt.set-aside").read_bytes() == good[: len(good) // 2]  # kept, not deleted
    again = Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path / "a", ckpt_every=1, keep_last=1))
    assert again.resume() == 7
    # roll back: resume explicitly from step 4's checkpoint (copied away) under another lr
    ck_b = tmp_path / "b" / "checkpoints"
    Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path / "b", ckpt_every=2, keep_last=3)).fit(stop_at=8)
    old = tmp_path / "step4.pt"
    old.write_bytes(checkpoint_path(ck_b, 4).read_bytes())
    with pytest.warns(UserWarning):
        Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path / "b", ckpt_every=2, keep_last=3, lr=1e-3,
                                                           resume=str(old))).fit(stop_at=6)
    assert [s for s, _ in list_checkpoints(ck_b)] == [4, 6]  # step 8 of the abandoned run set aside
    assert (ck_b / "ckpt_00000008.pt.set-aside").exists()
    resumed = Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path / "b", ckpt_every=2, keep_last=3, lr=1e-3))
    assert resumed.resume() == 6


def test_resume_under_other_settings_is_reported(tmp_path, recwarn):
    """A resume whose optimisation settings differ from the checkpoint's goes on (a longer schedule is
    legitimate) but names every change; bookkeeping (stop_at, cadence, out_dir) changes silently."""
    from core.engine.trainer import changed_settings

    data = tiny_data(50)
    Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path, steps=6)).fit(stop_at=2)
    Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path, steps=6, log_every=3)).fit(stop_at=4)
    assert not [w for w in recwarn if "trainer settings" in str(w.message)]
    with pytest.warns(UserWarning, match=r"\(step 4\) with trainer settings other than the checkpoint's: "
                                         r"steps 6 -> 8; lr 0\.01 -> 0\.002"):
        result = Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path, steps=8, lr=2e-3)).fit()
    assert result["step"] == 8
    assert changed_settings({"batch_size": 4, "betas": [0.9, 0.99]}, {"batch_size": 8, "betas": [0.9, 0.99],
                                                                      "out_dir": "x"}) == ["batch_size 4 -> 8"]


def test_resume_under_another_model_is_refused_and_other_groups_are_reported(tmp_path, recwarn):
    """The run's config groups (run_config) ride in every checkpoint: a resume whose "model" group differs
    is refused before anything is loaded, naming each change; other groups' changes are reported; a
    checkpoint without run_config (older files) resumes as before."""
    from core.engine.trainer import changed_run_config

    data = tiny_data(50)
    run = {"model": {"hidden": 32, "dropout": 0.0}, "sampler": {"steps": 8}}
    Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path, steps=6), run_config=run).fit(stop_at=2)
    assert load_checkpoint(checkpoint_path(tmp_path / "checkpoints", 2))["run_config"] == run
    Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path, steps=6), run_config=run).fit(stop_at=3)
    assert not [w for w in recwarn if "settings other than" in str(w.message)]
    other = {"model": {"hidden": 32, "dropout": 0.1}, "sampler": {"steps": 8}}
    t = Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path, steps=6), run_config=other)
    with pytest.raises(ConfigError, match=r"ckpt_00000003\.pt \(step 3\) was written with other model settings than "
                                          r"this run's: model\.dropout 0\.0 -> 0\.1\. Resume with"):
        t.resume()
    assert t.step == 0  # nothing was loaded
    with pytest.warns(UserWarning, match=r"settings other than the checkpoint's: sampler\.steps 8 -> 16"):
        Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path, steps=6),
                run_config={**run, "sampler": {"steps": 16}}).fit(stop_at=4)
    state = load_checkpoint(checkpoint_path(tmp_path / "checkpoints", 4))
    assert state["run_config"]["sampler"] == {"steps": 16}
    del state["run_config"]  # a checkpoint written before run configs were kept
    save_checkpoint(state, checkpoint_path(tmp_path / "checkpoints", 4))
    assert Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path, steps=6), run_config=other).fit()["step"] == 6
    # a domain whose model group has another name (image's autoencoder: "ae") names it
    ae = tmp_path / "ae"
    Trainer(tiny_model(), denoise_loss, data, make_cfg(ae, steps=4), run_config={"ae": {"ch": 8}},
            model_groups=("ae",)).fit(stop_at=2)
    with pytest.raises(ConfigError, match=r"ae\.ch 8 -> 16"):
        Trainer(tiny_model(), denoise_loss, data, make_cfg(ae, steps=4), run_config={"ae": {"ch": 16}},
                model_groups=("ae",)).resume()
    with pytest.raises(ConfigError, match=r"ae\.ch 8 -> 16"):  # one group given as a plain string
        Trainer(tiny_model(), denoise_loss, data, make_cfg(ae, steps=4), run_config={"ae": {"ch": 16}},
                model_groups="ae").resume()
    assert changed_run_config({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"b": 1, "c": [1, 3]}, "e": 2}) == [
        "a.c [1, 2] -> [1, 3]", "d 1 -> '<absent>'", "e '<absent>' -> 2"]


def test_nonfinite_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss(model, x, g):
        calls["n"] += 1
        out = denoise_loss(model, x, g)
        if calls["n"] == 2 * 7 - 1:  # first micro-step of step 7
            out["loss"] = out["loss"] * float("nan")
        return out

    cfg = make_cfg(tmp_path, steps=12, ckpt_every=2, keep_last=5)
    tr = Trainer(tiny_model(), loss, tiny_data(), cfg)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 7") as err:
        tr.fit()
    assert "ckpt_00000006.pt" in str(err.value)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 4, 6]
    last = load_checkpoint(checkpoint_path(tmp_path / "checkpoints", 6))
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert all(torch.isfinite(p).all() for p in tr.raw_model.parameters())  # no update was applied
    # The run resumes from the last good checkpoint.
    resumed = Trainer(tiny_model(), denoise_loss, tiny_data(), cfg)
    assert resumed.fit()["step"] == 12


# ----------------------------------------------------------------------------- precision, export, metrics


def test_bf16_autocast_runs_on_cpu_and_fp16_is_refused(tmp_path):
    dtypes = []

    def loss(model, x, g):
        assert torch.is_autocast_enabled("cpu")
        y = model(torch.cat([x, torch.zeros(x.shape[0], 1)], 1))
        dtypes.append(y.dtype)
        return (y.float() - x).pow(2).mean()

    out = Trainer(tiny_model(), loss, tiny_data(), make_cfg(tmp_path, precision="bf16", steps=3, warmup_steps=0)).fit()
    assert math.isfinite(out["loss"]) and set(dtypes) == {torch.bfloat16}
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.precision.*fp16.*CUDA"):
            Trainer(tiny_model(), loss, tiny_data(), make_cfg(tmp_path / "x", precision="fp16"))


def test_export_metrics_and_sampling(tmp_path):
    from safetensors.torch import load_file

    sampled = []

    def sample_fn(model, step, out_dir):
        sampled.append((step, {n: p.detach().clone() for n, p in model.named_parameters()}, out_dir))
        torch.randn(5)  # must not disturb training randomness

    cfg = make_cfg(tmp_path, steps=6, sample_every=3, ckpt_every=3)
    tr = Trainer(tiny_model(), denoise_loss, tiny_data(), cfg, sample_fn=sample_fn)
    tr.fit()
    assert [s for s, _, _ in sampled] == [3, 6] and sampled[0][2] == tmp_path
    ckpt = load_checkpoint(checkpoint_path(tmp_path / "checkpoints", 6))
    for n, p in sampled[1][1].items():  # the sampler saw the EMA weights of the first decay
        assert torch.equal(p, ckpt["ema"]["shadows"]["0.9"][n])
    for d in ("0.9", "0.99"):
        exported = load_file(str(tmp_path / f"ema_{d}.safetensors"))
        assert_same(exported, {k: v for k, v in ckpt["ema"]["shadows"][d].items()})
    export_ema_from_checkpoint(checkpoint_path(tmp_path / "checkpoints", 6), tmp_path / "x.safetensors", 0.99)
    assert_same(load_file(str(tmp_path / "x.safetensors")), ckpt["ema"]["shadows"]["0.99"])
    # Same run without sampling: identical weights (sampling restored the RNG states).
    plain = Trainer(tiny_model(), denoise_loss, tiny_data(), make_cfg(tmp_path / "p", steps=6, ckpt_every=3))
    plain.fit()
    assert_same(plain.raw_model.state_dict(), tr.raw_model.state_dict())
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["step", "loss", "t_mean"] and len(rows) == 4
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_export_holds_only_the_state_dict(tmp_path):
    # A non-persistent buffer (as RoPE frequency tables) is tracked by the EMA for sampling but is
    # not part of the model's state: the export must load with strict=True into a fresh model.
    from safetensors.torch import load_file

    def model():
        m = tiny_model()
        m.register_buffer("freqs", torch.arange(4.0), persistent=False)
        m.register_buffer("count", torch.zeros(()))
        return m

    tr = Trainer(model(), denoise_loss, tiny_data(), make_cfg(tmp_path, steps=2, ckpt_every=2, warmup_steps=0))
    tr.fit()
    assert "freqs" in tr.ema.averaged(0.9)
    exported = load_file(str(tmp_path / "ema_0.9.safetensors"))
    fresh = model()
    assert set(exported) == set(fresh.state_dict()) and "count" in exported
    fresh.load_state_dict(exported, strict=True)


def test_tensorboard_is_used_when_importable(tmp_path, monkeypatch):
    import types

    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def close(self):
            calls.append(("close", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    cfg = make_cfg(tmp_path, steps=4, tensorboard=True, ckpt_every=0, export_ema=False)
    Trainer(tiny_model(), denoise_loss, tiny_data(), cfg).fit()
    assert calls[0] == ("init", str(tmp_path / "tb")) and calls[-1] == ("close", None)
    assert ("loss", 2) in calls and ("loss", 4) in calls and ("samples_per_s", 4) in calls


def test_sharded_batches_cover_the_global_batch():
    from core.engine.trainer import BatchIndexSampler

    one = BatchIndexSampler(40, 8, rank=0, world_size=1, seed=5)
    two = [BatchIndexSampler(40, 8, rank=r, world_size=2, seed=5) for r in range(2)]
    for epoch in range(2):
        for j in range(one.per_epoch):
            assert torch.equal(torch.cat([s.indices(epoch, j) for s in two]), one.indices(epoch, j))
    assert not torch.equal(one.permutation(0), one.permutation(1))


# ----------------------------------------------------------------------------- configs


def compose(*overrides: str, out_dir: str = "/tmp/unused"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import core.engine.example  # noqa: F401  (registers the schemas)

    with initialize_config_dir(config_dir=str(REPO / "configs" / "example"), version_base="1.3"):
        return hydra_compose("config", overrides=[f"trainer.out_dir={out_dir}", *overrides])


def train_in_process(out: Path, *overrides: str) -> dict:
    """What ``python -m core.engine.example`` does, in this process."""
    from core.engine.example import train

    return train(compose("trainer.progress=false", *overrides, out_dir=str(out)))


GROUPS = ("model", "data", "path", "loss", "sampler")


class _TwoNets(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 1)

    def forward(self, x):
        return self.a(x).sum() * 5.0, self.b(x).sum() * 50.0, self.c(x).sum() * 0.01


def _two_nets_loss(model, x, g):
    la, lb, lc = model(x)
    return {"loss": la + lb + lc}


def test_grad_clip_groups_name_submodules_and_bare_parameters():
    model = _TwoNets()
    model.scale = nn.Parameter(torch.ones(2))
    model.ab = nn.Linear(2, 2)  # "a" must not take "ab"'s parameters
    groups = Trainer._clip_groups(model, ["scale", "a"])
    assert [[id(p) for p in g] for g in groups] == [
        [id(model.scale)], [id(model.a.weight), id(model.a.bias)],
        [id(p) for n, p in model.named_parameters() if n.split(".")[0] in ("b", "c", "ab")]]
    with pytest.raises(ValueError, match="'sc' names no trainable parameters"):
        Trainer._clip_groups(model, ["sc"])


@pytest.mark.parametrize("groups", [[], ["a", "b"]])
def test_grad_clip_groups_clip_each_group_to_the_threshold(tmp_path, groups):
    """One SGD step (lr 1, no momentum) moves the weights by exactly the clipped gradient: one global
    norm, or with ``grad_clip_groups`` each named module (and the remaining parameters) on its own."""
    x = tiny_data(8)
    ref = _TwoNets()
    _two_nets_loss(ref, x, None)["loss"].backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    cfg = make_cfg(tmp_path, steps=1, batch_size=8, grad_accum=1, optimizer="sgd", momentum=0.0, lr=1.0,
                   warmup_steps=0, schedule="constant", grad_clip=1.0, ema_decays=[], grad_clip_groups=groups)
    model = _TwoNets()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = Trainer(model, _two_nets_loss, x, cfg)
    tr.fit()
    moved = {n: before[n] - p.detach() for n, p in model.named_parameters()}

    def norm(prefixes):
        return torch.sqrt(sum(grads[n].square().sum() for n in grads if n.split(".")[0] in prefixes))

    total = norm("abc")
    for n, d in moved.items():
        own = n.split(".")[0]
        scale = norm(own) if groups else total
        scale = max(float(scale), 1.0)  # clip_grad_norm_ leaves a group under the threshold as it is
        torch.testing.assert_close(d, grads[n] / scale, rtol=1e-4, atol=1e-6)
    assert norm("c") < 1.0 < norm("a") < norm("b")  # the remainder group c is below the threshold
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["grad_norm"]
    assert logged == pytest.approx(float(total), rel=1e-5)  # the logged norm is global either way


def test_a_warm_up_longer_than_the_run_is_reported(tmp_path, recwarn):
    with pytest.warns(UserWarning, match=r"trainer.warmup_steps=1000 >= trainer.steps=100: the learning rate ends "
                                         r"at 0.1 x lr and the 'cosine' decay never starts"):
        validate_trainer(make_cfg(tmp_path, steps=100, warmup_steps=1000), world_size=1)
    validate_trainer(make_cfg(tmp_path, steps=100, warmup_steps=100, schedule="constant"), world_size=1)
    validate_trainer(make_cfg(tmp_path, steps=100, warmup_steps=99), world_size=1)
    assert not [w for w in recwarn if "warmup_steps" in str(w.message)]


def test_grad_clip_groups_are_checked(tmp_path):
    x = tiny_data(8)
    with pytest.raises(ValueError, match=r"grad_clip_groups: 'model_x' names no trainable parameters.*\['a', 'b', 'c'\]"):
        Trainer(_TwoNets(), _two_nets_loss, x, make_cfg(tmp_path, grad_clip_groups=["model_x"]))

    for bad, why in ((["a", "a"], "repeat"), (["a", "a.weight"], "nest"), ([".a"], "module names")):
        with pytest.raises(ConfigError, match=f"trainer.grad_clip_groups must.*{why}"):
            validate_trainer(make_cfg(tmp_path, grad_clip_groups=bad), world_size=1)


def test_bad_configs_fail_at_start_naming_the_key(tmp_path, monkeypatch):
    from hydra.errors import ConfigCompositionException

    from core.engine.run import prepare

    prepare(compose(), GROUPS)  # the shipped config is valid
    with pytest.raises(ConfigCompositionException) as e:
        compose("trainer.lrr=0.1")
    assert "lrr" in str(e.value.__cause__) and "TrainerConfig" in str(e.value.__cause__)
    with pytest.raises(ConfigError, match="lrr"):  # Hydra lets `+` add it; the schema check does not
        prepare(compose("+trainer.lrr=0.1"), GROUPS)
    with pytest.raises(ConfigError, match="hiden"):
        prepare(compose("+model.hiden=3"), GROUPS)
    with pytest.raises(ConfigCompositionException):
        compose("trainer.lr=fast")
    with pytest.raises(ConfigError, match=r"trainer\.lr must be > 0, got -0\.001"):
        prepare(compose("trainer.lr=-0.001"), GROUPS)
    with pytest.raises(ConfigError, match=r"data\.path does not exist: '/nonexistent/points\.pt'"):
        prepare(compose("data=file", "data.path=/nonexistent/points.pt"), GROUPS)
    with pytest.raises(ConfigError, match=r"data.*path"):
        prepare(compose("data=file"), GROUPS)  # mandatory, not given
    with pytest.raises(ConfigError, match="path.kind"):
        prepare(compose("path.kind=spiral"), GROUPS)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"batch_size=7 \(global\) must be divisible by world_size \* grad_accum"):
        prepare(compose("trainer.batch_size=7"), GROUPS)
    monkeypatch.setenv("WORLD_SIZE", "1")
    # A misspelt key inside a group's YAML file fails at compose time too.
    import shutil

    cfg_dir = tmp_path / "cfg"
    shutil.copytree(REPO / "configs" / "example", cfg_dir)
    with open(cfg_dir / "trainer" / "default.yaml", "a") as f:
        f.write("ema_decay: 0.9\n")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(cfg_dir), version_base="1.3"):
        with pytest.raises(Exception, match="ema_decay"):
            hydra_compose("config")


@dataclass
class _Inner:
    width: int = 4


@dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    name: str = "x"


def test_schema_check_names_unknown_nested_keys_and_bad_types():
    from omegaconf import OmegaConf, open_dict

    from core.engine.config import to_schema

    assert to_schema({"inner": {"width": 8}}, _Outer, "model") == _Outer(_Inner(8))
    node = OmegaConf.structured(_Outer)
    with open_dict(node.inner):  # what Hydra's `+model.inner.widht=3` does
        node.inner.widht = 3
    with pytest.raises(ConfigError, match=r"unknown key 'model\.inner\.widht'"):
        to_schema(node, _Outer, "model")
    with pytest.raises(ConfigError, match="width"):
        to_schema({"inner": {"width": "wide"}}, _Outer, "model")


def test_command_line_failures_are_clear(tmp_path):
    """Bad configs exit 2 before training, with the key and value in the message."""
    procs = {
        "lr": subprocess.Popen(example_cmd(tmp_path / "a", "trainer.lr=-1"), cwd=REPO, env=example_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "key": subprocess.Popen(example_cmd(tmp_path / "b", "trainer.bach_size=8"), cwd=REPO, env=example_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "type": subprocess.Popen(example_cmd(tmp_path / "c", "trainer.lr=abc"), cwd=REPO, env=example_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    out = {k: p.communicate(timeout=120) for k, p in procs.items()}
    assert procs["lr"].returncode == 2 and "trainer.lr must be > 0, got -1.0" in out["lr"][1]
    # Hydra's own composition errors (a misspelt key, a value of the wrong type) are bad configs too: exit 2
    assert procs["key"].returncode == 2 and "Key 'bach_size' not in 'TrainerConfig'" in out["key"][1]
    assert procs["type"].returncode == 2 and "Value 'abc'" in out["type"][1] and "lr" in out["type"][1]
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_nan_in_data_exits_3_naming_the_step(tmp_path, capsys):
    """The entry point's error path: a NaN sample stops the run; every earlier step was checkpointed."""
    from core.engine import engine_main
    from core.engine.example import train

    x = torch.randn(64, 2)
    x[37] = float("nan")
    torch.save({"x": x}, tmp_path / "nan.pt")
    out = tmp_path / "n"
    cfg = compose("data=file", f"data.path={tmp_path / 'nan.pt'}", "trainer=smoke", "trainer.batch_size=8",
                  "trainer.ckpt_every=1", "trainer.sample_every=0", "model.hidden=16", "trainer.progress=false",
                  out_dir=str(out))
    with pytest.raises(SystemExit) as exit_info:
        with engine_main():
            train(cfg)
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    bad_step = int(err.split("non-finite loss (nan) at step ")[1].split(";")[0])
    steps = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert steps and steps[-1] == bad_step - 1  # every step before it was checkpointed, none after
    assert f"last good checkpoint: {checkpoint_path(out / 'checkpoints', bad_step - 1)}" in err


# ----------------------------------------------------------------------------- processes


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            continue
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} never appeared; stderr:\n{''.join(seen)[-4000:]}")


def test_sigkill_while_writing_checkpoint_leaves_previous_loadable_and_resumes(tmp_path):
    args = (*SMOKE, "trainer.steps=12", "trainer.ckpt_every=4", "trainer.keep_last=3")
    run = tmp_path / "killed"
    victim = subprocess.Popen(
        example_cmd(run, *args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=example_env(POLYDIFF_TEST_STALL_BEFORE_RENAME="ckpt_00000008"),
    )
    try:
        _wait_for_line(victim, "polydiff-test: stalling before rename", timeout=120)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    ckdir = run / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckdir)] == [4]
    assert any(".tmp." in p.name for p in ckdir.iterdir())  # the write that was cut short
    assert load_checkpoint(checkpoint_path(ckdir, 4))["step"] == 4
    train_in_process(run, *args)  # resume=auto from step 4 (the same code path as the command line)
    assert not any(".tmp." in p.name for p in ckdir.iterdir())
    train_in_process(tmp_path / "straight", *args)  # the uninterrupted reference
    a = load_checkpoint(checkpoint_path(tmp_path / "straight" / "checkpoints", 12))
    b = load_checkpoint(checkpoint_path(ckdir, 12))
    assert_same(training_state(a), training_state(b))


def test_two_gloo_ranks_match_one_rank(tmp_path):
    args = ("loss=regression", "trainer=smoke", "trainer.steps=6", "trainer.batch_size=16", "trainer.ckpt_every=6",
            "trainer.sample_every=6", "sampler.num_samples=31", "sampler.steps=4", "data.n=512", "model.hidden=32")
    two = subprocess.Popen(example_cmd(tmp_path / "two", *args, "trainer.grad_accum=2", torchrun=2), cwd=REPO,
                           env=example_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    train_in_process(tmp_path / "one", *args)
    out, err = two.communicate(timeout=240)
    assert two.returncode == 0, out[-3000:] + err[-5000:]
    a = load_checkpoint(checkpoint_path(tmp_path / "one" / "checkpoints", 6))
    b = load_checkpoint(checkpoint_path(tmp_path / "two" / "checkpoints", 6))
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    for key in ("model",):
        for n in a[key]:
            torch.testing.assert_close(b[key][n], a[key][n], rtol=1e-5, atol=1e-6)
    for d, shadow in a["ema"]["shadows"].items():
        for n in shadow:
            torch.testing.assert_close(b["ema"]["shadows"][d][n], shadow[n], rtol=1e-5, atol=1e-6)
    for i, st in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][i]["exp_avg"], st["exp_avg"], rtol=1e-4, atol=1e-7)
    assert a["data"]["epoch"] == b["data"]["epoch"] and a["data"]["offset"] == b["data"]["offset"] == 6 * 16
    # The sampler ran on both ranks and gathered all samples on rank 0.
    samples = torch.load(tmp_path / "two" / "samples" / "samples_00000006.pt", weights_only=True)["x"]
    assert samples.shape == (31, 2) and torch.isfinite(samples).all()


# ----------------------------------------------------------------------------- slow (pytest -m slow)


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["[Linear]", "[]"])  # []: the root alone holds every parameter
def test_fsdp_two_ranks_match_one_rank_and_resume(tmp_path, wrap):
    """FSDP2 over gloo: stop at step 3, resume to 6; same weights as one rank (float tolerance). Sampling at
    step 3 swaps the EMA in and out around a no-grad forward, which leaves FSDP's root unsharded."""
    args = ("loss=regression", "trainer=smoke", "trainer.steps=6", "trainer.batch_size=16", "trainer.ckpt_every=3",
            "trainer.sample_every=3", "sampler.num_samples=31", "sampler.steps=4", "data.n=512", "model.hidden=32")
    fsdp = (*args, "trainer.strategy=fsdp", f"trainer.fsdp_wrap={wrap}")
    run_example(tmp_path / "two", *fsdp, "trainer.stop_at=3", torchrun=2)
    assert [s for s, _ in list_checkpoints(tmp_path / "two" / "checkpoints")] == [3]
    run_example(tmp_path / "two", *fsdp, torchrun=2)
    train_in_process(tmp_path / "one", *args)
    a = load_checkpoint(checkpoint_path(tmp_path / "one" / "checkpoints", 6))
    b = load_checkpoint(checkpoint_path(tmp_path / "two" / "checkpoints", 6))
    for n in a["model"]:
        torch.testing.assert_close(b["model"][n], a["model"][n], rtol=1e-5, atol=1e-6)
    for d, shadow in a["ema"]["shadows"].items():
        for n in shadow:
            torch.testing.assert_close(b["ema"]["shadows"][d][n], shadow[n], rtol=1e-5, atol=1e-6)
    samples = torch.load(tmp_path / "two" / "samples" / "samples_00000006.pt", weights_only=True)["x"]
    assert samples.shape == (31, 2)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    """Kill the run (SIGKILL) repeatedly at random moments while it checkpoints every step."""
    import random

    args = (*SMOKE, "model.hidden=384", "trainer.steps=30", "trainer.ckpt_every=1", "trainer.keep_last=2",
            "trainer.log_every=1")
    run = tmp_path / "run"
    rng = random.Random(0)
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen(example_cmd(run, *args), cwd=REPO, env=example_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = list_checkpoints(run / "checkpoints")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list_checkpoints(run / "checkpoints") != start:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        newest = newest_loadable(run / "checkpoints")
        assert newest is not None, "no loadable checkpoint after SIGKILL"
    assert kills >= 1
    run_example(run, *args)
    train_in_process(tmp_path / "straight", *args)
    a = load_checkpoint(checkpoint_path(tmp_path / "straight" / "checkpoints", 30))
    b = load_checkpoint(checkpoint_path(run / "checkpoints", 30))
    assert_same(training_state(a), training_state(b))


@pytest.mark.slow
def test_compile_flag_trains(tmp_path):
    out = train_in_process(tmp_path, *SMOKE, "trainer.steps=4", "trainer.compile=true", "trainer.ckpt_every=2")
    assert out["step"] == 4 and math.isfinite(out["loss"])
    resumed = train_in_process(tmp_path, *SMOKE, "trainer.steps=6", "trainer.compile=true")
    assert resumed["step"] == 6


def test_first_ema_shadow_follows_the_configured_order():
    from core.engine.checkpoint import first_ema_shadow

    a, b = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    state = {"model": {}, "ema": {"shadows": {"0.999": a, "0.99": b}}}
    assert first_ema_shadow(state, ["0.99", "0.999"]) is b  # the recorded order wins over storage order
    assert first_ema_shadow(state, ["0.5"]) is a and first_ema_shadow(state) is a  # else the first stored
    assert first_ema_shadow({"model": {}, "ema": None}) is None


def test_first_ema_export_follows_the_recorded_decays_not_file_names(tmp_path):
    from core.engine.checkpoint import checkpoint_path, first_ema_export, save_checkpoint

    assert first_ema_export(tmp_path, [0.999]) is None  # no exports
    for key in ("0.99", "0.999"):
        (tmp_path / f"ema_{key}.safetensors").write_bytes(b"")
    assert first_ema_export(tmp_path, [0.999, 0.99]).name == "ema_0.999.safetensors"  # not the first by name
    assert first_ema_export(tmp_path, [0.99]).name == "ema_0.99.safetensors"
    assert first_ema_export(tmp_path).name == "ema_0.99.safetensors"  # nothing recorded, no checkpoint: by name
    # a run from before the decays were recorded: its newest checkpoint's shadow order (the configured one)
    state = {"model": {}, "ema": {"shadows": {"0.999": {"w": torch.zeros(1)}, "0.99": {"w": torch.ones(1)}}}}
    save_checkpoint(state, checkpoint_path(tmp_path / "checkpoints", 5))
    assert first_ema_export(tmp_path).name == "ema_0.999.safetensors"
    (tmp_path / "ema_0.99.safetensors").unlink()
    (tmp_path / "ema_0.999.safetensors").rename(tmp_path / "ema_packed.safetensors")
    assert first_ema_export(tmp_path, [0.99]).name == "ema_packed.safetensors"  # a renamed single export


def test_warmup_warning_is_given_once_per_config():
    from core.engine.config import TrainerConfig, validate_trainer

    cfg = TrainerConfig(steps=10, warmup_steps=20)
    with pytest.warns(UserWarning, match="warmup_steps=20 >= trainer.steps=10") as seen:
        validate_trainer(cfg)
        validate_trainer(cfg)  # as prepare() and then the Trainer check the same config
    assert len([w for w in seen if "warmup_steps" in str(w.message)]) == 1
    cfg.steps = 15  # a changed config is checked afresh
    with pytest.warns(UserWarning, match="warmup_steps=20 >= trainer.steps=15"):
        validate_trainer(cfg)


def test_resume_into_a_differently_shaped_model_is_a_config_error_naming_the_tensors(tmp_path):
    """A setting outside the model group (e.g. a vocabulary from the data) that reshapes the model: a clear
    ConfigError before anything loads, not load_state_dict's size-mismatch RuntimeError."""
    data = tiny_data()
    Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path, steps=6)).fit(stop_at=4)
    wide = nn.Sequential(nn.Linear(4, 32), nn.SiLU(), nn.Dropout(0.1), nn.Linear(32, 3))
    with pytest.raises(ConfigError, match=r"0.weight \(16, 4\) in the weights, \(32, 4\) in the model.*another "
                                          r"trainer.out_dir"):
        Trainer(wide, denoise_loss, data, make_cfg(tmp_path, steps=6)).fit()
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4]  # nothing set aside or lost


def test_resume_drops_a_metrics_line_torn_by_a_kill(tmp_path):
    data = tiny_data()
    Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path, steps=8, log_every=1)).fit(stop_at=4)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a kill in the middle of the next append
        f.write('{"step": 5, "lo')
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("5,0.")
    Trainer(tiny_model(), denoise_loss, data, make_cfg(tmp_path, steps=8, log_every=1)).fit()
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert [int(float(r[rows[0].index("step")])) for r in rows[1:]] == list(range(1, 9))


def test_atomic_write_text_replaces_whole_files_and_leaves_no_temp(tmp_path):
    from core.engine.checkpoint import atomic_write_text

    p = atomic_write_text(tmp_path / "sub" / "m.json", "é" * 3)
    assert p.read_text(encoding="utf-8") == "ééé"
    atomic_write_text(p, "x")
    assert p.read_text() == "x" and sorted(q.name for q in p.parent.iterdir()) == ["m.json"]


def test_local_block_acts_alone_inside_a_process_group(tmp_path, monkeypatch):
    """D.local(): rank 0 alone (e.g. training an evaluation classifier after the run) joins no collective."""
    import torch.distributed as dist

    from core.engine import distributed as D

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
        assert D.is_distributed()
        with D.local():
            assert not D.is_distributed() and D.world_size() == 1 and D.rank() == 0
            assert D.init_distributed(torch.device("cpu")) is False  # a nested Trainer starts single-process
            assert D.broadcast_object("x") == "x" and D.gather_object(3) == [3]
        assert D.is_distributed()
    finally:
        dist.destroy_process_group()


def test_read_run_json_names_the_run_and_what_is_wrong(tmp_path):
    from core.engine.checkpoint import read_run_json

    with pytest.raises(ValueError, match=r"is not an image.train run: it holds no run.json"):
        read_run_json(tmp_path, "image.train")
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        read_run_json(tmp_path, "graph.train")
    (tmp_path / "run.json").write_text(json.dumps({"model": {}, "tokenizer": "char"}))
    with pytest.raises(ValueError, match=r"is not a graph.train run: its run.json has no \['data', 'sampler'\]"):
        read_run_json(tmp_path, "graph.train", ("model", "data", "sampler"))
    assert read_run_json(tmp_path, "text.train", ("model",)) == {"model": {}, "tokenizer": "char"}


def test_pick_resume_checkpoint_follows_the_resume_setting(tmp_path):
    from core.engine.checkpoint import pick_resume_checkpoint

    d = tmp_path / "ckpts"
    assert pick_resume_checkpoint(d, "auto") is None and pick_resume_checkpoint(d, False) is None
    with pytest.raises(ConfigError, match="trainer.resume=true but .* holds no loadable checkpoint"):
        pick_resume_checkpoint(d, True, "trainer.resume", ConfigError)
    save_checkpoint({"step": 2}, checkpoint_path(d, 2))
    checkpoint_path(d, 4).write_bytes(b"torn")  # the newest does not load: the one before it is taken
    path, state = pick_resume_checkpoint(d, "auto")
    assert path == checkpoint_path(d, 2) and state["step"] == 2
    assert pick_resume_checkpoint(d, True)[1]["step"] == 2
    with pytest.raises(CheckpointError, match=r"resume=False but .* \(newest: step 4\)"):
        pick_resume_checkpoint(d, False, "resume", CheckpointError, ("False", "True"))
    assert pick_resume_checkpoint(d, str(checkpoint_path(d, 2)))[1]["step"] == 2
