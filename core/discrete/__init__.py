"""Discrete diffusion on a vocabulary: CTMC graphs, noise schedules, losses and samplers.

Split by concept as SEDD's official code (``graph_lib`` / ``noise_lib`` / ``losses`` / ``sampling``):

- :mod:`core.discrete.graphs`: transition graphs ``Q`` (:class:`Absorbing`, :class:`Uniform`):
  forward rates and transitions ``exp(sigma Q)``, forward sampling of ``x_t``, reverse rates,
  the staggered score and the per-token denoising score entropy.
- :mod:`core.discrete.noise`: schedules ``sigma(t)`` and ``dsigma/dt`` (:class:`LogLinear`,
  :class:`Geometric`).
- :mod:`core.discrete.losses`: SEDD's score entropy loss; RADD/MDLM's absorbing cross-entropy
  bounds (t-DCE, lambda-DCE) for a time-independent clean-token model, and the conversion of
  that model to SEDD's concrete score.
- :mod:`core.discrete.sampling`: Euler (tau-leaping), analytic (Tweedie) and RADD's cached
  absorbing sampler, the final denoising step, prefix / infill conditioning.

Time runs over ``t in [0, 1]`` with data at ``t = 0``, as in SEDD and the rest of polydiff.
"""

from .graphs import Absorbing, Graph, Uniform, get_graph
from .losses import (
    absorbing_dce_loss,
    absorbing_log_score,
    absorbing_score,
    dce_weight,
    lambda_dce_loss,
    score_entropy_loss,
)
from .noise import Geometric, LogLinear, Noise, get_noise
from .sampling import (
    SAMPLERS,
    analytic_probs,
    denoise_probs,
    euler_probs,
    infill_condition,
    prefix_condition,
    sample_absorbing,
    sample_analytic,
    sample_categorical,
    sample_euler,
    time_grid,
)

__all__ = [
    "Graph",
    "Absorbing",
    "Uniform",
    "get_graph",
    "Noise",
    "LogLinear",
    "Geometric",
    "get_noise",
    "score_entropy_loss",
    "absorbing_log_score",
    "absorbing_score",
    "dce_weight",
    "absorbing_dce_loss",
    "lambda_dce_loss",
    "SAMPLERS",
    "sample_categorical",
    "time_grid",
    "euler_probs",
    "analytic_probs",
    "denoise_probs",
    "sample_euler",
    "sample_analytic",
    "sample_absorbing",
    "prefix_condition",
    "infill_condition",
]
