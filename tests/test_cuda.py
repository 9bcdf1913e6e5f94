"""The GPU path: bf16 / fp16 autocast in the Trainer, torch.compile, SDPA flash attention, torchrun.

Every test here needs CUDA and is skipped without it (CI has no GPU); run them on a GPU machine
with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from core.engine import Trainer, TrainerConfig
from text.model import TextModel, TextModelConfig, make_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
REPO = Path(__file__).resolve().parents[1]


def cfg(tmp: Path, **kw) -> TrainerConfig:
    base = dict(seed=0, steps=4, batch_size=16, lr=1e-3, warmup_steps=0, schedule="cosine", ema_decays=[0.9],
                ckpt_every=100, log_every=1, out_dir=str(tmp), resume=False, progress=False, tensorboard=False,
                device="cuda", export_ema=False)
    base.update(kw)
    return TrainerConfig(**base)


def tokens(n: int = 64, length: int = 32, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def text_model(kind: str = "radd", seed: int = 0) -> TextModel:
    torch.manual_seed(seed)
    return TextModel(TextModelConfig(kind=kind, dim=128, depth=2, num_heads=2), 50)


def test_bf16_autocast_on_cuda(tmp_path):
    seen = []
    inner = make_loss(TextModelConfig(kind="radd"))

    def loss(model, x, g):
        assert torch.is_autocast_enabled("cuda") and x.is_cuda and g.device.type == "cuda"
        seen.append(torch.get_autocast_dtype("cuda"))
        return inner(model, x, g)

    model = text_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = Trainer(model, loss, tokens(), cfg(tmp_path, precision="bf16"))
    out = tr.fit()
    assert math.isfinite(out["loss"]) and set(seen) == {torch.bfloat16}
    moved = [n for n, p in tr.raw_model.named_parameters() if not torch.equal(p.detach().cpu(), before[n])]
    assert len(moved) > 0.9 * len(before)


def test_fp16_skipped_step_holds_schedule_and_ema(tmp_path):
    """An overflowing fp16 step is skipped by the GradScaler: no optimiser, scheduler or EMA update."""
    calls = []

    def loss(model, x, g):
        calls.append(1)
        y = model(x).float().pow(2).mean()
        return y * (1e36 if len(calls) == 2 else 1.0)  # finite loss, infinite scaled gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 8))
    tr = Trainer(model, loss, torch.randn(64, 8), cfg(tmp_path, precision="fp16", steps=4))
    tr.fit()
    assert len(calls) == 4 and tr.step == 4
    assert tr.scheduler.last_epoch == 3 and tr.ema.num_updates == 3
    assert tr.scaler.get_scale() < 65536.0


def test_compile_matches_eager_on_cuda(tmp_path):
    losses = {}
    for compiled in (False, True):
        tr = Trainer(text_model(), make_loss(TextModelConfig(kind="radd")), tokens(),
                     cfg(tmp_path / str(compiled), compile=compiled, steps=3, log_every=1))
        tr.fit()
        rows = [json.loads(r) for r in (tmp_path / str(compiled) / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=2e-3)


@pytest.mark.parametrize("kind", ["radd", "ar"])
def test_sdpa_flash_kernel_matches_math(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = text_model(kind).cuda().eval()
    x = tokens(8, 64).cuda()
    fn = model.log_probs if kind == "radd" else model.ar_log_probs
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot take these inputs
            flash = fn(x).float()
        with sdpa_kernel(SDPBackend.MATH):
            ref = fn(x).float()
    assert torch.isfinite(flash).all()
    assert (flash.exp() - ref.exp()).abs().max() < 2e-2


def test_torchrun_ddp_on_cuda(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    if not os.path.exists(torchrun):
        torchrun = "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node=1", "-m", "core.engine.example", f"hydra.run.dir={tmp_path}",
           "trainer.progress=false", "trainer=smoke", "trainer.sample_every=0", "data.n=512", "model.hidden=32",
           "trainer.device=cuda", "trainer.precision=bf16"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert any(tmp_path.rglob("checkpoints/*"))
