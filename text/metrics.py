"""Evaluation of text models: perplexities, generative perplexity, sample entropy, sampling speed.

- :func:`ar_perplexity`: the exact perplexity ``exp(sum NLL / tokens)`` of the causal baseline.
- :func:`diffusion_perplexity_bound`: ``exp`` of an upper bound on the NLL per token from the
  diffusion ELBO, estimated by Monte Carlo with stratified times over the validation chunks:

  * ``radd`` (``method="lambda"``): RADD's lambda-DCE, ``E_lambda[sum_{masked} -log p(x0^l | x_lambda) / lambda]``
    with ``lambda ~ U(0, 1]``. Its expectation is the any-order autoregressive NLL, i.e.
    ``E_order[-log q_order(x)]`` >= ``-log E_order[q_order(x)]``: an upper bound on the NLL of the
    proper distribution "draw a random order, decode in that order" (Jensen).
  * ``radd`` (``method="tdce"``) and ``sedd``: the continuous-time ELBO over ``t in (0, 1]`` of the
    log-linear schedule (t-DCE / SEDD's weighted denoising score entropy) plus the prior term.
    With ``sigma(1) = -log eps`` a token is still clean at ``t = 1`` with probability ``eps``, so
    the prior must give clean tokens mass: we take ``pi = (1 - eps) mask + eps Uniform(V)`` per
    token, whose KL from ``p_1(. | x0)`` is ``eps log V`` per token (added to the bound).

- :func:`difformer_nll_bound`: for the embedding-diffusion model, the continuous-time variational
  bound of :func:`core.likelihood.embedding_elbo` (VDM): reconstruction of the tokens from the
  least noisy latent by the model's own logits, the prior KL, and the SNR-weighted x0 error.

- :func:`generative_perplexity`: samples scored by the AR model, ``exp(mean -log p_AR)``.
- :func:`unigram_entropy`: entropy (nats) of the token frequencies of samples; a repetitive
  collapse shows as entropy well below the data's.
- :func:`sampling_speed`: samples/s and mean NFE against the number of steps.

All NLLs are in nats; perplexity is per token of the model's tokenizer (per character for ``char``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from core.discrete import absorbing_dce_loss, lambda_dce_loss, score_entropy_loss

from .model import TextModel

__all__ = [
    "ar_nll",
    "ar_perplexity",
    "diffusion_nll_bound",
    "diffusion_perplexity_bound",
    "difformer_nll_bound",
    "generative_perplexity",
    "unigram_entropy",
    "sampling_speed",
]


def _batches(chunks: Tensor, batch_size: int):
    if chunks.ndim != 2:
        raise ValueError(f"chunks must be (N, L) token ids, got shape {tuple(chunks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i in range(0, chunks.shape[0], batch_size):
        yield chunks[i: i + batch_size]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def ar_nll(model: TextModel, chunks: Tensor, batch_size: int = 64) -> tuple[float, int]:
    """Exact total NLL (nats) of ``chunks`` (N, L) under a causal ``ar`` model, and the token count."""
    if model.kind != "ar":
        raise ValueError(f"ar_nll needs an 'ar' model, got {model.kind!r}")
    total, n = 0.0, 0
    for x in _batches(chunks, batch_size):
        x = x.to(_device(model))
        total += float(model.ar_nll(x).double().sum())
        n += x.numel()
    return total, n


def ar_perplexity(model: TextModel, chunks: Tensor, batch_size: int = 64) -> float:
    total, n = ar_nll(model, chunks, batch_size)
    return math.exp(total / n)


def _stratified(n: int, k: int, generator: torch.Generator | None, device) -> Tensor:
    """``(k, n)`` times in (0, 1]: row ``j`` holds one draw in each of ``k`` strata, shuffled per sequence.

    Stratifying the time over the ``k`` draws of each sequence removes most of the variance of
    the ``1 / t`` weight without biasing the estimate (each draw is still marginally uniform).
    """
    u = torch.rand(k, n, generator=generator, device=generator.device if generator else None)
    perm = torch.argsort(torch.rand(k, n, generator=generator, device=u.device), dim=0)
    t = 1.0 - (perm.double() + u.double()) / k  # in (0, 1]
    return t.clamp_min(1e-12).to(device)


@torch.no_grad()
def diffusion_nll_bound(model: TextModel, chunks: Tensor, *, samples: int = 8, batch_size: int = 64,
                        method: str | None = None, generator: torch.Generator | None = None) -> dict:
    """Monte-Carlo upper bound on the NLL per token (nats) of a ``sedd`` / ``radd`` model; see the module docstring.

    ``samples`` stratified times per sequence. Returns ``{"nll": mean bound per token, "stderr": its
    standard error over sequences, "prior": the prior term per token, "tokens": count}``.
    """
    if model.kind not in ("sedd", "radd"):
        raise ValueError(f"diffusion_nll_bound needs a 'sedd' or 'radd' model, got {model.kind!r}")
    method = method or ("lambda" if model.kind == "radd" else "tdce")
    if method not in ("lambda", "tdce") or (model.kind == "sedd" and method != "tdce"):
        raise ValueError(f"method {method!r} is not available for a {model.kind} model")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    device = _device(model)
    graph, noise, V = model.graph, model.noise, model.vocab_size
    prior = noise.eps * math.log(V) if method == "tdce" else 0.0
    per_seq = []
    for x in _batches(chunks, batch_size):
        x = x.to(device)
        times = _stratified(x.shape[0], samples, generator, device)
        acc = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
        for t in times:
            if method == "lambda":
                loss = lambda_dce_loss(model.log_probs, graph, x, lam=t, generator=generator)
            elif model.kind == "radd":
                loss = absorbing_dce_loss(model.log_probs, graph, noise, x, t=t.float(), generator=generator)
            else:
                loss = score_entropy_loss(model.log_score, graph, noise, x, t=t.float(), generator=generator)
            acc += loss.double()
        per_seq.append(acc / samples / x.shape[1] + prior)
    per_seq = torch.cat(per_seq)
    stderr = float(per_seq.std() / math.sqrt(per_seq.numel())) if per_seq.numel() > 1 else float("nan")
    return {"nll": float(per_seq.mean()), "stderr": stderr, "prior": prior, "tokens": int(chunks.numel()),
            "method": method}


def diffusion_perplexity_bound(model: TextModel, chunks: Tensor, **kwargs) -> float:
    """``exp`` of :func:`diffusion_nll_bound`: an upper bound on the perplexity (up to Monte-Carlo error)."""
    return math.exp(diffusion_nll_bound(model, chunks, **kwargs)["nll"])


@torch.no_grad()
def difformer_nll_bound(model: TextModel, chunks: Tensor, *, samples: int = 8, batch_size: int = 64,
                        log_snr_start: float | None = 0.0, generator: torch.Generator | None = None) -> dict:
    """Upper bound on the NLL per token (nats) of a ``difformer`` model; see the module docstring.

    ``samples`` stratified log-SNR draws per sequence. The bound holds for any start of the
    diffusion interval (the tokens are then decoded by the model's logits from that latent):
    ``log_snr_start`` sets it (``None``: the path's ``t_min``). Near ``t_min`` the SNR weight
    ``e^lambda`` (about 4e5 on the cosine path) multiplies the small x0 errors of a briefly trained
    model and the estimate becomes heavy-tailed (measured: standard error 4.2 nats/token with 32
    draws); from ``lambda = 0`` the decoder carries the last stretch and the estimate is tight
    (standard error 0.07). Returns ``{"nll", "stderr", "recon", "prior", "diffusion", "tokens",
    "t_start"}`` (the three terms as means per token).
    """
    from core.likelihood import embedding_elbo
    from core.paths import get_path

    if model.kind != "difformer":
        raise ValueError(f"difformer_nll_bound needs a 'difformer' model, got {model.kind!r}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    device = _device(model)
    path = get_path(model.cfg.path)  # the model was trained on [t_min, t_max] of this path
    E = model.embeddings().float()
    t_start = None if log_snr_start is None else float(path.t_from_log_snr(torch.tensor(float(log_snr_start))))
    parts: dict[str, list[Tensor]] = {"total": [], "recon": [], "prior": [], "diffusion": []}
    for x in _batches(chunks, batch_size):
        x = x.to(device)
        out = embedding_elbo(x, E, path, model.denoise, model.continuous_logits, samples=samples, t_start=t_start,
                             generator=generator)
        for k in parts:
            parts[k].append(out[k] / x.shape[1])
    per_seq = {k: torch.cat(v) for k, v in parts.items()}
    n = per_seq["total"].numel()
    stderr = float(per_seq["total"].std() / math.sqrt(n)) if n > 1 else float("nan")
    return {"nll": float(per_seq["total"].mean()), "stderr": stderr, "tokens": int(chunks.numel()),
            "t_start": path.t_min if t_start is None else t_start, **{k: float(per_seq[k].mean()) for k in ("recon", "prior", "diffusion")}}


def generative_perplexity(ar_model: TextModel, samples: Tensor, batch_size: int = 64) -> float:
    """Perplexity of generated ``samples`` (N, L) under the causal ``ar_model`` (lower: more data-like)."""
    return ar_perplexity(ar_model, samples, batch_size)


def unigram_entropy(tokens: Tensor | Sequence[int], vocab_size: int) -> float:
    """Entropy in nats of the token frequencies in ``tokens`` (any shape)."""
    t = torch.as_tensor(tokens).flatten().long()
    if t.numel() == 0:
        raise ValueError("unigram_entropy of no tokens")
    if int(t.min()) < 0 or int(t.max()) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{int(t.min())}, {int(t.max())}]")
    p = torch.bincount(t, minlength=vocab_size).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def sampling_speed(sample_fn: Callable[[int, torch.Generator], tuple[Tensor, Tensor]], steps_list: Sequence[int],
                   num: int, repeats: int = 1, seed: int = 0, device: str | torch.device = "cpu") -> list[dict]:
    """Samples/s and mean NFE for each number of steps. ``sample_fn(steps, generator) -> (samples, nfe)``.

    One untimed warm-up call, then the median of ``repeats`` timed calls producing ``num`` samples each.
    The generators live on ``device`` (the model's); on CUDA each timed call ends with a synchronise.
    """
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = []
    sample_fn(steps_list[0], torch.Generator(device).manual_seed(seed))
    for steps in steps_list:
        times, nfes = [], []
        for r in range(repeats):
            g = torch.Generator(device).manual_seed(seed + r)
            sync()
            start = time.perf_counter()
            _, nfe = sample_fn(steps, g)
            sync()
            times.append(time.perf_counter() - start)
            nfes.append(float(torch.as_tensor(nfe).float().mean()))
        sec = sorted(times)[len(times) // 2]
        out.append({"steps": steps, "samples_per_s": num / sec, "seconds": sec, "nfe": sum(nfes) / len(nfes)})
    return out
