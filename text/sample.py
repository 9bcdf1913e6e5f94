"""Sampling from trained text models, and the ``python -m text.sample`` command.

    python -m text.sample --run outputs/text/radd --steps 128 --num 8 --out samples.txt
    python -m text.sample --run outputs/text/ar --num 8 --temperature 1.0 --out ar.txt

- :func:`sample_diffusion`: ``radd`` with RADD's cached absorbing sampler
  (``core.discrete.sample_absorbing``, ``cache=True`` by default), ``sedd`` with SEDD's analytic
  (Tweedie tau-leaping) sampler; both end with the denoising step. Prefix prompts and infilling
  at any positions hold the given tokens fixed (no retraining).
- :func:`sample_ar`: ancestral sampling of the causal baseline at a temperature (one network call
  per token, no KV cache).
- :func:`load_run`: the model, tokenizer and settings of a finished ``text.train`` run
  (``run.json`` + the EMA weights it exported, else the newest checkpoint's EMA / model weights;
  with several EMA decays, the first of the run's ``trainer.ema_decays``).

The command writes unconditional samples, a prefix-prompted sample and (for diffusion models) an
infilling example -- the first and last quarter of a validation chunk given, the middle generated --
to a text file.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from core.discrete import infill_condition, sample_absorbing, sample_analytic
from core.engine.checkpoint import atomic_write, read_run_json

from .model import KINDS, TextModel, TextModelConfig
from .tokenizers import from_spec

__all__ = ["sample_diffusion", "sample_ar", "load_run", "read_run_info", "main"]

DEFAULT_PREFIX = "ROMEO.\n"  # the prompt of python -m text.sample when --prefix is not given


@torch.no_grad()
def sample_diffusion(model: TextModel, num: int, length: int, steps: int, *, generator: torch.Generator | None = None,
                     positions: Tensor | None = None, tokens: Tensor | None = None, cache: bool = True,
                     eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """``num`` sequences of ``length`` tokens in ``steps`` steps: ``(ids (num, length), nfe (num,))``.

    ``positions`` (K,) and ``tokens`` (K,) or (num, K): tokens held fixed there (prefix or infill).
    """
    if model.kind not in ("sedd", "radd", "difformer"):
        raise ValueError(f"sample_diffusion needs a 'sedd', 'radd' or 'difformer' model, got {model.kind!r}")
    if num < 1 or length < 1:
        raise ValueError(f"num and length must be >= 1, got {num}, {length}")
    device = next(model.parameters()).device
    if model.kind == "difformer":
        return _sample_embeddings(model, num, length, steps, generator, positions, tokens, device)
    graph = model.graph
    x = graph.sample_limit(num, length, device=device)
    fixed = None
    if positions is not None:
        tokens = torch.as_tensor(tokens, device=device)
        if tokens.numel() and int(tokens.max()) >= model.vocab_size:
            raise ValueError(f"fixed tokens must lie in [0, {model.vocab_size}), got {int(tokens.max())}")
        x, fixed = infill_condition(x, positions, tokens)
    if model.kind == "radd":
        def probs_fn(z):
            return model.log_probs(z).exp()

        return sample_absorbing(probs_fn, graph, model.noise, x, steps, eps=eps, fixed_mask=fixed,
                                generator=generator, cache=cache)

    def score_fn(z, sigma):
        return model.log_score(z, sigma).exp()

    return sample_analytic(score_fn, graph, model.noise, x, steps, eps=eps, fixed_mask=fixed, generator=generator)


def _sample_embeddings(model, num, length, steps, generator, positions, tokens, device, sampler="ddim"):
    """Difformer: a core sampler on the embedding path, then rounding to the nearest embeddings.

    Given tokens are held by replacement: the denoiser returns their clean embedding, so every
    step sees them at the right noise level, and the rounding writes them back.
    """
    from core.paths import get_path
    from core.samplers import sample

    path = get_path(model.cfg.path)
    x = path.prior_sample((num, length, model.cfg.dim), generator=generator, device=device)
    fixed = torch.zeros(num, length, dtype=torch.bool, device=device)
    given = torch.zeros(num, length, dtype=torch.int64, device=device)
    if positions is not None:
        tokens = torch.as_tensor(tokens, device=device).long()
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < model.vocab_size:
            raise ValueError(f"fixed tokens must lie in [0, {model.vocab_size}), got {tokens.tolist()}")
        fixed[:, positions] = True
        given[:, positions] = tokens.expand(num, -1)
    e_given = model.embeddings()[given]

    def denoiser(z, t):
        return torch.where(fixed[..., None], e_given, model.denoise(z, t))

    out, nfe = sample(sampler, denoiser, path, x, steps, generator=generator)
    ids = torch.where(fixed, given, model.round(out))
    return ids, torch.full((num,), int(nfe), dtype=torch.int64, device=device)


@torch.no_grad()
def sample_ar(model: TextModel, num: int, length: int, *, temperature: float = 1.0,
              generator: torch.Generator | None = None, prefix: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Ancestral samples ``(num, length)`` of the causal model at ``temperature``; ``prefix`` (P,) is kept."""
    if model.kind != "ar":
        raise ValueError(f"sample_ar needs an 'ar' model, got {model.kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    device = next(model.parameters()).device
    x = torch.zeros(num, length, dtype=torch.int64, device=device)
    start = 0
    if prefix is not None:
        prefix = torch.as_tensor(prefix, device=device).long()
        if prefix.numel() > length or (prefix.numel() and int(prefix.max()) >= model.vocab_size):
            raise ValueError(f"prefix must hold <= {length} ids in [0, {model.vocab_size})")
        x[:, : prefix.numel()] = prefix
        start = prefix.numel()
    for i in range(start, length):
        # Causal attention: the ids after position i cannot change its prediction.
        logits = model.ar_log_probs(x)[:, i] / temperature
        u = torch.rand(logits.shape, generator=generator, device=device)
        x[:, i] = (logits - torch.log(-torch.log(u.clamp_min(1e-20)))).argmax(-1)  # Gumbel-max
    return x, torch.full((num,), length - start, dtype=torch.int64, device=device)


def _ema_state(ckpt: dict, order: list[str]) -> dict:
    """The EMA weights of a checkpoint of the first decay of ``order``, else its model weights."""
    from core.engine.checkpoint import first_ema_shadow

    shadow = first_ema_shadow(ckpt, order)
    return ckpt["model"] if shadow is None else shadow


def read_run_info(run_dir: str | Path) -> dict:
    """The ``run.json`` of a ``text.train`` run; ``ValueError`` naming ``run_dir`` when it is none.

    ``text.train`` records the tokenizer, the vocabulary size and a ``model.kind`` of
    :data:`~text.model.KINDS`; another domain's run (e.g. ``image.train``) lacks them.
    """
    info = read_run_json(run_dir, "text.train")
    model = info.get("model")
    kind = model.get("kind") if isinstance(model, dict) else None
    missing = [k for k in ("tokenizer", "vocab_size", "data") if k not in info]
    if kind not in KINDS or missing:
        raise ValueError(f"{str(run_dir)!r} is not a text.train run: its run.json has model.kind={kind!r} (text "
                         f"models: {list(KINDS)})" + (f" and no {', '.join(missing)}" if missing else "")
                         + "; is it another domain's run?")
    return info


def load_run(run_dir: str | Path, device: str = "cpu", step: int | None = None) -> tuple[TextModel, object, dict]:
    """``(model in eval mode, tokenizer, run.json dict)`` of a ``text.train`` output directory.

    Weights: the EMA export of a finished run, else the newest checkpoint's EMA; ``step`` picks the
    EMA of the checkpoint of that step instead (to compare runs at equal steps). With several EMA
    decays every one of these loads the same decay: the first of the run's ``trainer.ema_decays``
    in its configured order (not the first export by file name). A BPE tokenizer's
    ``tokenizer.json`` is found relative to ``run_dir``, so a moved or copied run folder loads.
    """
    from core.engine.checkpoint import first_ema_export
    from core.engine.ema import decay_key

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    model = TextModel(TextModelConfig(**info["model"]), info["vocab_size"])
    order = [decay_key(d) for d in info.get("ema_decays") or []]
    export = first_ema_export(run_dir, info.get("ema_decays")) if step is None else None
    if step is not None:
        from core.engine.checkpoint import checkpoint_path, load_checkpoint

        state = _ema_state(load_checkpoint(checkpoint_path(run_dir / "checkpoints", step)), order)
    elif export is not None:
        from safetensors.torch import load_file

        state = load_file(str(export))
    else:
        from core.engine.checkpoint import newest_loadable

        found = newest_loadable(run_dir / "checkpoints")
        if found is None:
            raise ValueError(f"{str(run_dir)!r} holds neither exported EMA weights nor a checkpoint")
        state = _ema_state(found[1], order)
    # EMA exports also hold non-persistent buffers (RoPE frequencies) that the model rebuilds itself.
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"weights of {str(run_dir)!r} lack {missing[:5]} (a different model config?)")
    model.load_state_dict({k: state[k] for k in expected})
    return model.to(device).eval(), from_spec(info["tokenizer"], root=run_dir), info


def _fmt(tokenizer, ids: Tensor) -> str:
    return tokenizer.decode(ids.tolist())


def positive_int(text: str) -> int:
    """argparse ``type``: an int >= 1 (the error names the value; argparse adds the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type``: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def check_out_file(parser: argparse.ArgumentParser, flag: str, path: str | Path, create_parent: bool = False) -> Path:
    """``path`` as a file to write later, checked now (``parser.error``, exit 2) before any work is done:
    not a directory, and its folder exists (``create_parent``: is created) and is writable."""
    path = Path(path)
    if path.is_dir():
        parser.error(f"{flag} {str(path)!r} is a directory; give a file path")
    parent = path.parent
    if create_parent:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"{flag} {str(path)!r}: cannot create its folder ({e})")
    if not parent.is_dir():
        parser.error(f"{flag} {str(path)!r}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        parser.error(f"{flag} {str(path)!r}: the folder {str(parent)!r} is not writable")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m text.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="output directory of python -m text.train")
    p.add_argument("--out", default=None, help="text file to write (default: <run>/samples.txt)")
    p.add_argument("--num", type=positive_int, default=4)
    p.add_argument("--length", type=positive_int, default=None, help="tokens per sample (default: the run's seq_len)")
    p.add_argument("--steps", type=positive_int, default=128, help="diffusion steps")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="AR sampling temperature")
    p.add_argument("--prefix", default=None,
                   help=f"prompt text for the prefix-conditioned sample (default {DEFAULT_PREFIX!r}; skipped with "
                        "a warning when the run's tokenizer cannot encode it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    try:
        read_run_info(a.run)
    except ValueError as e:
        p.error(f"--run: {e}")
    out = check_out_file(p, "--out", a.out if a.out else Path(a.run) / "samples.txt", create_parent=True)
    try:
        model, tok, info = load_run(a.run, a.device)
    except ValueError as e:  # no weights, or weights of another model config
        p.error(f"--run: {e}")
    L = a.length if a.length is not None else info["data"]["seq_len"]
    g = torch.Generator(device=a.device).manual_seed(a.seed)
    lines = [f"# {model.kind} samples from {a.run} (length {L}, "
             + (f"temperature {a.temperature})" if model.kind == "ar" else f"{a.steps} steps)")]
    text = DEFAULT_PREFIX if a.prefix is None else a.prefix
    try:
        prefix = torch.tensor(tok.encode(text)[:L], dtype=torch.int64)
    except ValueError as e:  # a character tokenizer lacks one of its characters
        if a.prefix is not None:
            p.error(f"--prefix {a.prefix!r} cannot be encoded by the run's tokenizer: {e}")
        warnings.warn(f"skipping the prefix example: the default --prefix {DEFAULT_PREFIX!r} cannot be encoded by "
                      f"the run's tokenizer ({e}); give --prefix in the run's alphabet", stacklevel=2)
        prefix = None
    if model.kind == "ar":
        x, _ = sample_ar(model, a.num, L, temperature=a.temperature, generator=g)
        if prefix is not None:
            xp, _ = sample_ar(model, 1, L, temperature=a.temperature, generator=g, prefix=prefix)
    else:
        x, _ = sample_diffusion(model, a.num, L, a.steps, generator=g)
        if prefix is not None:
            xp, _ = sample_diffusion(model, 1, L, a.steps, generator=g, positions=torch.arange(len(prefix)),
                                     tokens=prefix)
    for i, row in enumerate(x):
        lines += [f"\n## sample {i}\n", _fmt(tok, row)]
    if prefix is not None:
        lines += [f"\n## prefix {text!r}\n", _fmt(tok, xp[0])]
    if model.kind != "ar" and not (Path(a.run) / "val_chunk.pt").is_file():
        # a packed run (benchmarks.text_long --pack) carries weights, run.json and tokenizer only
        print(f"no infilling example: {Path(a.run) / 'val_chunk.pt'} (a validation chunk) is absent", flush=True)
    elif model.kind != "ar":
        val = torch.load(Path(a.run) / "val_chunk.pt", weights_only=True)[:L]
        q = len(val) // 4
        pos = torch.cat([torch.arange(q), torch.arange(len(val) - q, len(val))])
        xi, _ = sample_diffusion(model, 1, len(val), a.steps, generator=g, positions=pos, tokens=val[pos])
        assert torch.equal(xi[0, pos], val[pos])  # the given tokens stay where they were put
        lines += ["\n## infilling: first and last quarter of a validation chunk given, middle generated",
                  "\n### original\n", _fmt(tok, val), "\n### given (middle blanked as '_')\n",
                  _fmt(tok, val[:q]) + "_" * (len(val) - 2 * q) + _fmt(tok, val[-q:]),
                  "\n### infilled\n", _fmt(tok, xi[0])]
    body = "\n".join(lines) + "\n"
    atomic_write(out, lambda f: f.write(body.encode("utf-8")))  # an interrupted write keeps the old file
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
