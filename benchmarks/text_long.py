"""Longer text runs, side by side, then the text targets at several common checkpoints.

    python -m benchmarks.text_long --out /tmp/text_long --train-seconds 330 \\
        --models sedd,radd,ar --dim 256 --depth 6 --heads 8 --batch 128 --steps 20000

Trains each model with ``python -m text.train`` in its own process (all at once, on the same
device), stops them after ``--train-seconds`` (or when they finish), evaluates every model at up
to ``--evals`` checkpoint steps that all runs reached (``python -m text.evaluate --step``, several
at once), and writes ``summary.json`` / ``summary.md``: per step the AR perplexity, each diffusion
bound and its ratio to AR, generative perplexities and sample entropies; plus the best step of
each model by validation perplexity. A run stopped by the clock keeps the checkpoints it wrote
(atomically), so a stopped run is evaluated at its newest checkpoint; its cosine schedule was
sized for ``--steps`` and did not finish (the README says which steps were reached).
``--pack DIR`` also writes, per model, ``run.json`` plus the EMA weights (bf16 safetensors) at
the last common step, loadable by ``text.sample`` / ``text.evaluate`` without ``--step``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_cmd(kind: str, out: Path, a: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "text.train", f"model={kind}", f"model.dim={a.dim}", f"model.depth={a.depth}",
            f"model.num_heads={a.heads}", f"data.seq_len={a.seq_len}", f"trainer.steps={a.steps}",
            f"trainer.batch_size={a.batch}", f"trainer.lr={a.lr}", f"trainer.warmup_steps={a.warmup}",
            f"trainer.precision={a.precision}", f"trainer.compile={str(a.compile).lower()}",
            f"trainer.ema_decays=[{a.ema}]", "trainer.sample_every=0", f"trainer.ckpt_every={a.ckpt_every}",
            "trainer.keep_last=1000", "trainer.progress=false", "trainer.log_every=500", "trainer.tensorboard=false",
            f"trainer.device={a.device}", f"trainer.out_dir={out}", f"hydra.run.dir={out}", *a.override,
            *(o.split(":", 1)[1] for o in a.model_override if o.split(":", 1)[0] == kind)]


def steps_of(run: Path) -> set[int]:
    from core.engine.checkpoint import list_checkpoints

    return {s for s, _ in list_checkpoints(run / "checkpoints")} if (run / "checkpoints").is_dir() else set()


def pick(steps: list[int], k: int) -> list[int]:
    """Up to ``k`` of ``steps`` (sorted), evenly spread, always with the last."""
    if len(steps) <= k:
        return steps
    if k == 1:
        return steps[-1:]
    idx = {round(i * (len(steps) - 1) / (k - 1)) for i in range(k)}
    return [steps[i] for i in sorted(idx)]


def train(a: argparse.Namespace, models: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    procs = {}
    start = {k: max(steps_of(out / k), default=0) for k in models}  # a --resume continues from these
    t0 = time.time()
    for k in models:
        with open(out / f"{k}.log", "w") as log:  # the child keeps its own descriptor
            procs[k] = subprocess.Popen(train_cmd(k, out / k, a), cwd=REPO, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
    stopped: set[str] = set()
    ended: dict[str, float] = {}
    while any(p.poll() is None for p in procs.values()):
        for k, p in procs.items():
            if k not in ended and p.poll() is not None:
                ended[k] = time.time() - t0
        if time.time() - t0 > a.train_seconds:
            for k, p in procs.items():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    stopped.add(k)
            for p in procs.values():
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(2)
    wall = time.time() - t0
    info = {k: {"returncode": p.returncode, "stopped_by_clock": k in stopped,
                "checkpoints": sorted(steps_of(out / k))} for k, p in procs.items()}
    for k, v in info.items():
        if v["returncode"] not in (0, None) and not v["stopped_by_clock"]:
            print(f"{k} failed (exit {v['returncode']}); its log:\n" + (out / f"{k}.log").read_text()[-4000:], flush=True)
        steps = v["checkpoints"]
        v["seconds"] = ended.get(k, wall)
        # the rate up to the newest checkpoint, over the time it was written at (not the clock's stop: a
        # run stopped by the clock trained up to --ckpt-every steps more that no checkpoint shows); the
        # process start-up is counted, and a --resume's earlier steps are not
        v["start_step"] = start[k]
        if steps and steps[-1] > start[k]:
            from core.engine.checkpoint import checkpoint_path

            written = checkpoint_path(out / k / "checkpoints", steps[-1]).stat().st_mtime - t0
            v["steps_per_s"] = (steps[-1] - start[k]) / max(written, 1e-9)
        else:
            v["steps_per_s"] = 0.0
    print(f"trained {wall:.0f}s: " + ", ".join(f"{k} to step {max(v['checkpoints'], default=0)}" for k, v in info.items()),
          flush=True)
    return {"wall_s": wall, "runs": info}


def evaluate(a: argparse.Namespace, models: list[str], out: Path, steps: list[int]) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(a.eval_threads)}
    # The last step's evaluation also times the samplers (--speed-steps): it runs alone, after the
    # others, so that no other evaluation shares the device while it times cached against uncached.
    timed = steps[-1] if steps and a.speed_steps else None
    pending = [s for s in steps if s != timed]
    running: dict[int, subprocess.Popen] = {}
    results = {}

    def launch(s: int) -> None:
        cmd = [sys.executable, "-m", "text.evaluate", "--step", str(s), "--device", a.eval_device,
               "--val-chunks", str(a.val_chunks), "--bound-samples", str(a.bound_samples),
               "--num-samples", str(a.num_samples), "--steps", str(a.sample_steps),
               "--speed-steps", a.speed_steps if s == timed else "", "--out", str(out / f"eval_{s}.json")]
        for k in models:
            cmd += [f"--{k}", str(out / k)]
        with open(out / f"eval_{s}.log", "w") as log:
            running[s] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    while pending or running or timed is not None:
        if not pending and not running and timed is not None:
            launch(timed)
            timed = None
        while pending and len(running) < a.eval_parallel:
            launch(pending.pop())
        for s, p in list(running.items()):
            if p.poll() is not None:
                del running[s]
                f = out / f"eval_{s}.json"
                if p.returncode == 0 and f.is_file():
                    results[s] = json.loads(f.read_text())
                else:
                    print(f"evaluation at step {s} failed:\n" + (out / f"eval_{s}.log").read_text()[-3000:], flush=True)
        time.sleep(1)
    return dict(sorted(results.items()))


def summarize(results: dict, models: list[str]) -> tuple[dict, str]:
    rows = ["| step | AR ppl | " + " | ".join(f"{k} bound (ratio)" for k in models if k != "ar")
            + " | gen. ppl " + " / ".join(models) + " | sample entropy " + " / ".join(models) + " |",
            "|---" * (4 + sum(k != "ar" for k in models)) + "|"]
    best: dict = {}
    for s, r in results.items():
        cells = [str(s), f"{r['ar']['perplexity']:.3f}"]
        for k in models:
            if k == "ar":
                continue
            cells.append(f"{r[k]['perplexity_bound']:.3f} ({r[k]['ratio_to_ar']:.3f}x)")
        cells.append(" / ".join(f"{r[k]['gen_ppl']:.2f}" for k in models))
        cells.append(" / ".join(f"{r[k]['sample_entropy']:.3f}" for k in models))
        rows.append("| " + " | ".join(cells) + " |")
        for k in models:
            ppl = r[k]["perplexity"] if k == "ar" else r[k]["perplexity_bound"]
            if k not in best or ppl < best[k]["ppl"]:
                best[k] = {"step": s, "ppl": ppl}
    if results:
        data_h = next(iter(results.values()))["data_unigram_entropy"]
        rows.append(f"\ndata unigram entropy {data_h:.3f} nats; best validation step per model: "
                    + ", ".join(f"{k} {v['ppl']:.3f} at {v['step']}" for k, v in best.items()))
        if "ar" in best:
            rows.append("best vs best ratio to AR: " + ", ".join(
                f"{k} {v['ppl'] / best['ar']['ppl']:.3f}x" for k, v in best.items() if k != "ar"))
    return best, "\n".join(rows)


def pack(out: Path, models: list[str], step: int, dest: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from core.engine.checkpoint import checkpoint_path, load_checkpoint

    for k in models:
        d = dest / k
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / k / "run.json", d / "run.json")
        if (out / k / "tokenizer.json").is_file():  # a BPE run: run.json names it relative to the run folder
            shutil.copy(out / k / "tokenizer.json", d / "tokenizer.json")
        ckpt = load_checkpoint(checkpoint_path(out / k / "checkpoints", step))
        shadows = (ckpt.get("ema") or {}).get("shadows") or {}
        state = next(iter(shadows.values())) if shadows else ckpt["model"]
        save_file({n: t.to(torch.bfloat16).contiguous() for n, t in state.items()}, str(d / f"ema_step{step}.safetensors"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.text_long", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="sedd,radd,ar")
    p.add_argument("--train-seconds", type=float, default=330)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20000, help="schedule length (cosine); the clock may stop it earlier")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--evals", type=int, default=6, help="common checkpoint steps to evaluate")
    p.add_argument("--eval-parallel", type=int, default=4)
    p.add_argument("--eval-threads", type=int, default=2)
    p.add_argument("--eval-device", default="auto")
    p.add_argument("--val-chunks", type=int, default=256)
    p.add_argument("--bound-samples", type=int, default=4)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=128)
    p.add_argument("--speed-steps", default="32,128,1024")
    p.add_argument("--pack", default=None)
    p.add_argument("--resume", action="store_true",
                   help="let runs whose folder under --out already holds checkpoints go on from them (refused otherwise)")
    p.add_argument("--override", nargs="*", default=[], help="extra text.train overrides for every run")
    p.add_argument("--model-override", nargs="*", default=[], metavar="KIND:KEY=VALUE",
                   help="a text.train override for one model only, e.g. ar:model.dropout=0.1 (after --override)")
    a = p.parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    unknown = [m for m in models if m not in ("sedd", "radd", "ar")]
    if unknown or len(set(models)) != len(models):
        p.error(f"--models: a comma-separated subset of sedd,radd,ar without repeats, got {a.models!r}")
    if "ar" not in models:
        p.error("--models must include ar (the scorer and the baseline)")
    for o in a.model_override:
        kind, sep, rest = o.partition(":")
        if not sep or kind not in models or "=" not in rest:
            p.error(f"--model-override: KIND:KEY=VALUE with KIND one of --models ({','.join(models)}), got {o!r}")
    for flag in ("train_seconds", "steps", "ckpt_every", "evals", "eval_parallel", "eval_threads", "val_chunks",
                 "bound_samples", "num_samples", "sample_steps"):
        if not getattr(a, flag) > 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(a, flag)}")
    out = Path(a.out)
    stale = [str(out / k) for k in models if steps_of(out / k)]
    if stale and not a.resume:
        # text.train resumes from them, under this call's settings: a fresh comparison must not.
        p.error(f"--out: {', '.join(stale)} already hold checkpoints; pass --resume to go on from them, "
                "or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"args": vars(a), "train": train(a, models, out)}
    common = sorted(set.intersection(*(steps_of(out / k) for k in models)))
    if not common:
        raise SystemExit("no checkpoint step common to every run; see the logs in " + str(out))
    steps = pick(common, a.evals)
    t0 = time.time()
    summary["evals"] = evaluate(a, models, out, steps)
    summary["eval_wall_s"] = time.time() - t0
    summary["best"], table = summarize(summary["evals"], models)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(table + "\n")
    print(table, flush=True)
    if a.pack:
        pack(out, models, common[-1], Path(a.pack))
    return summary


if __name__ == "__main__":
    main()
