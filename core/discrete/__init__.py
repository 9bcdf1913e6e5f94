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

# Each submodule lists its public names once, in its ``__all__``; the package re-exports them.
from . import graphs, losses, noise, sampling
from .graphs import *  # noqa: F403
from .losses import *  # noqa: F403
from .noise import *  # noqa: F403
from .sampling import *  # noqa: F403

__all__ = [*graphs.__all__, *noise.__all__, *losses.__all__, *sampling.__all__]
