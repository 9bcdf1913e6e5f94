"""Measure the text targets on trained runs: ``python -m text.evaluate``.

    python -m text.evaluate --sedd outputs/text/sedd --radd outputs/text/radd --ar outputs/text/ar \\
        [--step 400] [--val-chunks 256] [--bound-samples 4] [--num-samples 16] [--steps 128] --out eval.json

All runs must share the data settings (the same validation chunks are rebuilt from ``run.json``) and
the tokenizer (compared by content, the tokenizers' ``fingerprint()``, not by where their files lie).
Reports, per model: the validation perplexity (exact for AR, the ELBO bound for SEDD/RADD, see
:mod:`text.metrics`); for samples of ``--steps`` diffusion steps and AR samples at temperature 1:
their generative perplexity under the AR model (or under ``--scorer``, an independent AR run) with
held-out text scored alike for reference, and their unigram entropy against the validation
data's (also for a Difformer run, ``--difformer``, which has no likelihood bound here); and samples/s against the number of steps (RADD cached and uncached, SEDD analytic).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from core.engine.checkpoint import atomic_write

from .data import chunk_tokens, encode_documents, load_corpus, split_documents
from .metrics import (
    ar_perplexity,
    difformer_nll_bound,
    diffusion_nll_bound,
    generative_perplexity,
    sampling_speed,
    unigram_entropy,
)
from .sample import check_out_file, load_run, positive_int, read_run_info, sample_ar, sample_diffusion

# the model.kind (run.json) each run flag takes; --scorer is an AR run too
RUN_FLAGS = {"--ar": "ar", "--sedd": "sedd", "--radd": "radd", "--difformer": "difformer", "--scorer": "ar"}


def validation_chunks(info: dict, tokenizer) -> torch.Tensor:
    d = info["data"]
    docs = load_corpus(d["corpus"], d["paths"])
    _, val = split_documents(list(docs), d["val_fraction"], d["split_seed"])
    return chunk_tokens(encode_documents(tokenizer, [docs[n] for n in val], tokenizer.encode("\n\n")), d["seq_len"])


def speed_steps(text: str) -> list[int]:
    """argparse ``type`` of ``--speed-steps``: comma-separated ints >= 1 (empty: no speed measurement)."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        steps = [int(t) for t in parts]
    except ValueError:
        steps = []
    if len(steps) != len(parts) or any(n < 1 for n in steps):
        raise argparse.ArgumentTypeError(f"must be comma-separated ints >= 1 (e.g. 32,128), got {text!r}")
    return steps


def check_runs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every run flag names a ``text.train`` run of the model kind of the flag (``parser.error`` otherwise)."""
    for flag, kind in RUN_FLAGS.items():
        run = getattr(args, flag[2:])
        if run is None:
            continue
        try:
            got = read_run_info(run)["model"]["kind"]
        except ValueError as e:
            parser.error(f"{flag}: {e}")
        if got != kind:
            hint = f"; give it as --{got}" if flag != "--scorer" and f"--{got}" in RUN_FLAGS else ""
            parser.error(f"{flag} {run!r} is a run of model.kind={got!r} (its run.json), but {flag} takes one of "
                         f"model.kind={kind!r}{hint}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m text.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--sedd"), p.add_argument("--radd"), p.add_argument("--ar", required=True)
    p.add_argument("--difformer", help="embedding diffusion run (VDM bound, samples)")
    p.add_argument("--step", type=int, default=None, help="evaluate the EMA of this checkpoint step in every run")
    p.add_argument("--val-chunks", type=positive_int, default=256, help="validation chunks (evenly spaced) to score")
    p.add_argument("--bound-samples", type=positive_int, default=4,
                   help="stratified times per chunk in the ELBO estimate")
    p.add_argument("--num-samples", type=positive_int, default=16)
    p.add_argument("--steps", type=positive_int, default=128)
    p.add_argument("--speed-steps", type=speed_steps, default="32,128,1024",
                   help="diffusion steps of the speed measurement, comma-separated ('' skips it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", default=None,
                   help="an AR run that scores the samples (generative perplexity) instead of the --ar baseline: "
                        "an independent scorer, as SEDD scores with GPT-2 large; its own final (EMA) weights")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="auto: cuda when available")
    p.add_argument("--out", default=None, help="JSON file to write the results to (its folder must exist)")
    a = p.parse_args(argv)
    from core.engine.config import ConfigError, resolve_device

    try:
        dev = resolve_device(a.device)
    except ConfigError:
        p.error(f"--device {a.device!r}: CUDA is not available")
    # everything the flags can get wrong is refused here, before the runs are evaluated
    out = None if a.out is None else check_out_file(p, "--out", a.out)
    check_runs(p, a)

    def gen() -> torch.Generator:  # every draw on the models' device, from the same seed
        return torch.Generator(dev).manual_seed(a.seed)

    torch.manual_seed(a.seed)
    ar, tok, info = load_run(a.ar, device=dev, step=a.step)
    val = validation_chunks(info, tok)
    idx = torch.linspace(0, len(val) - 1, min(a.val_chunks, len(val))).round().long()
    val = val[idx]
    L = val.shape[1]
    data_entropy = unigram_entropy(val, tok.vocab_size)
    res: dict = {"step": a.step, "device": str(dev), "val_chunks": len(val), "seq_len": L, "vocab_size": tok.vocab_size,
                 "parameters": sum(p.numel() for p in ar.parameters()), "data_unigram_entropy": data_entropy}
    t0 = time.perf_counter()
    res["ar"] = {"perplexity": ar_perplexity(ar, val)}
    scorer = ar
    if a.scorer is not None:
        scorer, stok, sinfo = load_run(a.scorer, device=dev)
        if scorer.kind != "ar" or stok.fingerprint() != tok.fingerprint():
            raise ValueError(f"--scorer {a.scorer!r} must be an 'ar' run with the tokenizer of {a.ar!r}, "
                             f"got a {scorer.kind!r} run")
    # Held-out text scored like the samples: what a perfect generator would get (for the baseline
    # scorer it is the AR validation perplexity).
    res["scorer"] = {"run": a.scorer or a.ar, "heldout_gen_ppl": generative_perplexity(scorer, val)}
    g = gen()
    xs, _ = sample_ar(ar, a.num_samples, L, temperature=1.0, generator=g)
    res["ar"].update(gen_ppl=generative_perplexity(scorer, xs), sample_entropy=unigram_entropy(xs, tok.vocab_size),
                     sample=tok.decode(xs[0].tolist()))
    print(f"ar: {res['ar']['perplexity']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    for kind, run in (("sedd", a.sedd), ("radd", a.radd)):
        if run is None:
            continue
        t0 = time.perf_counter()
        m, tk, inf = load_run(run, device=dev, step=a.step)
        if inf["data"] != info["data"] or tk.fingerprint() != tok.fingerprint():
            raise ValueError(f"{run!r} was trained on other data or another tokenizer than {a.ar!r}")
        b = diffusion_nll_bound(m, val, samples=a.bound_samples, generator=gen())
        r = {"perplexity_bound": math.exp(b["nll"]), "nll_bound": b["nll"], "nll_stderr": b["stderr"],
             "method": b["method"], "ratio_to_ar": math.exp(b["nll"]) / res["ar"]["perplexity"]}
        xs, nfe = sample_diffusion(m, a.num_samples, L, a.steps, generator=gen())
        r.update(gen_ppl=generative_perplexity(scorer, xs), sample_entropy=unigram_entropy(xs, tok.vocab_size),
                 nfe=float(nfe.float().mean()), sample=tok.decode(xs[0].tolist()))
        r["entropy_rel_diff"] = abs(r["sample_entropy"] - data_entropy) / data_entropy
        res[kind] = r
        print(f"{kind}: bound {r['perplexity_bound']:.3f} gen_ppl {r['gen_ppl']:.2f} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    if a.difformer:
        m, tk, inf = load_run(a.difformer, device=dev)  # its final weights (it may have run for other steps)
        if inf["data"] != info["data"] or tk.fingerprint() != tok.fingerprint():
            raise ValueError(f"{a.difformer!r} was trained on other data or another tokenizer than {a.ar!r}")
        xs, nfe = sample_diffusion(m, a.num_samples, L, a.steps, generator=gen())
        ent = unigram_entropy(xs, tok.vocab_size)
        b = difformer_nll_bound(m, val, samples=a.bound_samples, generator=gen())
        res["difformer"] = {"perplexity_bound": math.exp(b["nll"]), "nll_bound": b["nll"], "nll_stderr": b["stderr"],
                            "nll_terms": {k: b[k] for k in ("recon", "prior", "diffusion")},
                            "ratio_to_ar": math.exp(b["nll"]) / res["ar"]["perplexity"],
                            "gen_ppl": generative_perplexity(scorer, xs), "sample_entropy": ent, "nfe": float(nfe[0]),
                            "entropy_rel_diff": abs(ent - data_entropy) / data_entropy,
                            "sample": tok.decode(xs[0].tolist())}
    res["ar"]["entropy_rel_diff"] = abs(res["ar"]["sample_entropy"] - data_entropy) / data_entropy
    steps_list = a.speed_steps
    speed = {}
    n = 4
    for name, run, kw in (("radd_cached", a.radd, {"cache": True}), ("radd_uncached", a.radd, {"cache": False}),
                          ("sedd", a.sedd, {})):
        if run is None or not steps_list:
            continue
        m, _, _ = load_run(run, device=dev, step=a.step)
        speed[name] = sampling_speed(lambda s, g, m=m, kw=kw: sample_diffusion(m, n, L, s, generator=g, **kw),
                                     steps_list, num=n, device=dev)
        print(name, [(r["steps"], round(r["samples_per_s"], 3)) for r in speed[name]], flush=True)
    res["speed"] = speed
    text = json.dumps(res, indent=1)
    print(text, flush=True)  # first: the results are on stdout whatever happens to the file
    if out is not None:
        atomic_write(out, lambda f: f.write((text + "\n").encode()))
    return res


if __name__ == "__main__":
    main()
