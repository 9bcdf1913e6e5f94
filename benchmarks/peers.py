"""Peer samplers (k-diffusion, diffusers) driven by polydiff's exact mixture denoiser.

Every peer here solves EDM's probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` on
``x = x0 + sigma eps`` (Karras et al. 2022, eq. 4 with ``s = 1``) from ``sigma_max = 80`` to 0,
with Karras rho = 7 sigmas between 0.002 and 80, starting from the noise the caller gives
(``x = 80 z``). Each adapter takes ``D(x, sigma) -> x0`` for that VE variable, counts its calls,
and returns ``(x0_hat, nfe)``: the same contract as polydiff's samplers, so the benchmark can put
them side by side on the same noise.

k-diffusion's package ``__init__`` imports torchvision and scikit-image, which polydiff does not
need; :func:`load_k_diffusion_sampling` loads ``k_diffusion/sampling.py`` alone under a
hand-built package whose ``utils`` provides the one helper that file uses (``append_dims``).

diffusers' schedulers live on a discrete VP schedule (1000 training steps, ``x_vp = x / sqrt(1 +
sigma^2)``). :func:`edm_trained_betas` builds betas whose sigmas run log-uniformly from 0.002 to 80
(the last beta nudged so that ``sigma_max`` is 80 in float32), so their Karras sigmas span EDM's
range; the adapter maps our VE noise into the scheduler's state (VP-scaled for the multistep
solvers, VE for Euler/Heun), evaluates the denoiser at the sigma the scheduler's own step uses
(``scheduler.sigmas[step_index]``: a continuous-sigma model, no integer-timestep rounding), and
returns the exact ``x0`` with ``prediction_type="sample"``. Note that DPMSolverMultistep and
UniPC cast the state to float32 inside ``step``, which floors their error near 1e-7.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0

__all__ = [
    "SIGMA_MIN",
    "SIGMA_MAX",
    "CountingDenoiser",
    "load_k_diffusion_sampling",
    "edm_trained_betas",
    "diffusers_available",
    "k_diffusion_available",
    "KD_SAMPLERS",
    "DIFFUSERS_SCHEDULERS",
    "run_k_diffusion",
    "run_k_diffusion_adaptive",
    "run_diffusers",
    "steps_for_budget",
]

EdmDenoiser = Callable[[Tensor, Tensor], Tensor]


class CountingDenoiser:
    """``D(x, sigma)`` with ``sigma`` a float or ``(B,)`` tensor, counting calls (one call = one NFE)."""

    def __init__(self, fn: EdmDenoiser):
        self.fn = fn
        self.nfe = 0

    def __call__(self, x: Tensor, sigma) -> Tensor:
        self.nfe += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        return self.fn(x, sigma)


# -- k-diffusion ----------------------------------------------------------------------------------


def k_diffusion_available() -> bool:
    return importlib.util.find_spec("k_diffusion") is not None


_KD_SAMPLING = None


def load_k_diffusion_sampling():
    """Import ``k_diffusion.sampling`` without running ``k_diffusion/__init__.py``.

    The package module and a stub ``k_diffusion.utils`` are placed in ``sys.modules`` only while
    the file executes (its ``from . import utils`` needs them), then the previous entries are put back.
    """
    global _KD_SAMPLING
    if _KD_SAMPLING is not None:
        return _KD_SAMPLING
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    pkg_dir = list(spec.submodule_search_locations)[0]

    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [pkg_dir]
    utils = types.ModuleType("k_diffusion.utils")

    def append_dims(x, target_dims):
        if target_dims < x.ndim:
            raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}")
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    pkg.utils = utils

    names = ("k_diffusion", "k_diffusion.utils", "k_diffusion.sampling")
    saved = {n: sys.modules.get(n) for n in names}
    try:
        sys.modules["k_diffusion"] = pkg
        sys.modules["k_diffusion.utils"] = utils
        file_spec = importlib.util.spec_from_file_location("k_diffusion.sampling", f"{pkg_dir}/sampling.py")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules["k_diffusion.sampling"] = module
        file_spec.loader.exec_module(module)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    _KD_SAMPLING = module
    return module


@contextlib.contextmanager
def _default_dtype(dtype):
    # get_sigmas_karras builds its ramp in the default dtype; float64 keeps sigma_max = 80 exact.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _kd_sigmas(kd, steps: int, dtype) -> Tensor:
    # k-diffusion's n is the number of non-zero sigmas; with the appended 0 that makes n steps.
    with _default_dtype(torch.float64):
        sigmas = kd.get_sigmas_karras(steps, SIGMA_MIN, SIGMA_MAX, rho=RHO)
    return sigmas.to(dtype)


# name -> (k-diffusion function, NFE of ``steps`` steps ending at sigma = 0, extra kwargs)
KD_SAMPLERS: dict[str, tuple[str, Callable[[int], int], dict]] = {
    "euler": ("sample_euler", lambda n: n, {}),
    # Heun's last step (to sigma = 0) is an Euler step: one evaluation instead of two.
    "heun": ("sample_heun", lambda n: 2 * n - 1, {}),
    "lms": ("sample_lms", lambda n: n, {}),
    "dpmpp_2m": ("sample_dpmpp_2m", lambda n: n, {}),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", lambda n: n, {"eta": 1.0}),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", lambda n: n, {"eta": 1.0}),
}


def steps_for_budget(nfe_of_steps: Callable[[int], int], budget: int) -> int | None:
    """Largest number of steps whose cost fits ``budget``; None if even one step does not."""
    best = None
    for n in range(1, budget + 1):
        if nfe_of_steps(n) <= budget:
            best = n
    return best


def run_k_diffusion(name: str, denoiser: EdmDenoiser, x: Tensor, steps: int, seed: int = 0) -> tuple[Tensor, int]:
    """Run k-diffusion sampler ``name`` (a key of :data:`KD_SAMPLERS`) on ``steps`` Karras steps.

    The SDE samplers draw their noise from a ``torch.Generator`` seeded with ``seed`` (independent
    standard normals per step, which is what their default noise sampler draws, made
    reproducible; k-diffusion's Brownian-tree sampler gives the same law at 10x the cost here).
    """
    kd = load_k_diffusion_sampling()
    fn_name, _, extra = KD_SAMPLERS[name]
    sigmas = _kd_sigmas(kd, steps, x.dtype)
    model = CountingDenoiser(denoiser)
    kwargs = dict(extra)
    if name.endswith("_sde"):
        gen = torch.Generator(device=x.device).manual_seed(seed)
        kwargs["noise_sampler"] = lambda sigma, sigma_next: torch.randn(
            x.shape, generator=gen, dtype=x.dtype, device=x.device
        )
    out = getattr(kd, fn_name)(model, x.clone(), sigmas, disable=True, **kwargs)
    return out, model.nfe


def run_k_diffusion_adaptive(
    denoiser: EdmDenoiser, x: Tensor, rtol: float, atol: float, h_init: float = 0.05
) -> tuple[Tensor, int]:
    """k-diffusion's DPM-Solver-23 with adaptive steps (Lu et al. 2022, sec. 4.2 and App. C) from 80 to 0.002,
    then one denoising evaluation at 0.002 (the same last step to sigma = 0 as the Karras-grid samplers).

    Returns ``(x0_hat, nfe)`` with ``nfe`` from ``return_info`` plus the final evaluation.
    """
    kd = load_k_diffusion_sampling()
    model = CountingDenoiser(denoiser)
    out, info = kd.sample_dpm_adaptive(
        model, x.clone(), SIGMA_MIN, SIGMA_MAX, rtol=rtol, atol=atol, h_init=h_init, disable=True, return_info=True
    )
    if info["nfe"] != model.nfe:
        raise RuntimeError(f"dpm_adaptive reported {info['nfe']} evaluations but made {model.nfe}")
    out = model(out, SIGMA_MIN)
    return out, info["nfe"] + 1


# -- diffusers -----------------------------------------------------------------------------------


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def edm_trained_betas(n: int = 1000, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> np.ndarray:
    """float32 betas whose VP sigmas ``sqrt((1 - abar) / abar)`` run log-uniformly from sigma_min to sigma_max.

    diffusers computes ``abar = cumprod(1 - beta)`` in float32; the last beta is searched among
    neighbouring float32 values so that the schedule's sigma_max (where sampling starts) equals
    ``sigma_max`` in float32. sigma_min is only as exact as float32 ``1 - beta`` allows (about 1%).
    """
    sig = np.exp(np.linspace(math.log(sigma_min), math.log(sigma_max), n))
    abar = 1.0 / (1.0 + sig**2)
    alphas = abar / np.concatenate([[1.0], abar[:-1]])
    betas = torch.tensor(1.0 - alphas, dtype=torch.float32)

    def last_sigma(b: Tensor) -> float:
        ab = torch.cumprod(1.0 - b, dim=0)
        return float(np.float32(((1 - ab[-1]) / ab[-1]) ** 0.5))

    target = float(np.float32(sigma_max))
    best = betas.clone()
    cand = betas.clone()
    err = abs(last_sigma(best) - target)
    for direction in (1.0, -1.0):
        cand.copy_(betas)
        for _ in range(64):
            cand[-1] = float(np.nextafter(np.float32(cand[-1].item()), np.float32(direction * 2)))
            e = abs(last_sigma(cand) - target)
            if e < err:
                best, err = cand.clone(), e
            if e == 0:
                break
    return best.numpy()


# name -> (scheduler class, extra config, NFE of ``steps`` steps, state is VP-scaled)
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict, Callable[[int], int], bool]] = {
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {"solver_order": 2, "algorithm_type": "dpmsolver++"},
        lambda n: n,
        True,
    ),
    "dpmpp_3m": (
        "DPMSolverMultistepScheduler",
        {"solver_order": 3, "algorithm_type": "dpmsolver++"},
        lambda n: n,
        True,
    ),
    "unipc": ("UniPCMultistepScheduler", {}, lambda n: n, True),
    "euler": ("EulerDiscreteScheduler", {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX}, lambda n: n, False),
    "heun": ("HeunDiscreteScheduler", {}, lambda n: 2 * n - 1, False),
}

_BETAS = None


def make_scheduler(name: str, steps: int):
    """A diffusers scheduler ``name`` (key of :data:`DIFFUSERS_SCHEDULERS`) set to ``steps`` Karras steps."""
    global _BETAS
    import diffusers

    if _BETAS is None:
        _BETAS = edm_trained_betas()
    cls_name, extra, _, _ = DIFFUSERS_SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    sched = cls(
        num_train_timesteps=len(_BETAS),
        trained_betas=_BETAS.tolist(),
        prediction_type="sample",
        use_karras_sigmas=True,
        **extra,
    )
    sched.set_timesteps(steps)
    return sched


def scheduler_sigma_range(name: str, steps: int = 10) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` a scheduler actually uses (the non-zero ends of its sigmas)."""
    s = make_scheduler(name, steps).sigmas
    s = s[s > 0]
    return float(s.min()), float(s.max())


def run_diffusers(name: str, denoiser: EdmDenoiser, x: Tensor, steps: int) -> tuple[Tensor, int]:
    """Run diffusers scheduler ``name`` on ``steps`` Karras steps from the VE noise ``x`` at sigma_max.

    The model call gets the scheduler's scaled input ``x / sqrt(1 + sigma^2)`` (both conventions
    hand the network the VP-scaled state) and returns the exact ``x0`` of the VE state.
    """
    _, _, _, vp_state = DIFFUSERS_SCHEDULERS[name]
    sched = make_scheduler(name, steps)
    model = CountingDenoiser(denoiser)
    s0 = sched.sigmas[0].double()
    # Multistep solvers carry x_vp = x / sqrt(1 + sigma^2) (init_noise_sigma = 1); Euler/Heun carry x itself.
    sample = x / torch.sqrt(1 + s0**2) if vp_state else x.clone()
    for t in sched.timesteps:
        model_in = sched.scale_model_input(sample, t)
        idx = 0 if sched.step_index is None else sched.step_index
        sigma = sched.sigmas[idx].double()
        x0 = model(model_in * torch.sqrt(1 + sigma**2), sigma)
        sample = sched.step(x0, t, sample).prev_sample
    # The last sigma is 0, where VP and VE states coincide.
    if float(sched.sigmas[-1]) != 0.0:
        raise RuntimeError(f"scheduler {name} did not end at sigma = 0 (got {float(sched.sigmas[-1])})")
    return sample.to(x.dtype), model.nfe
