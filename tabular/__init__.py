"""polydiff tabular domain: CDTD mixed-type diffusion with a pandas API (see tabular/README.md).

``from tabular import TabularDiffusion, GaussianCopula``.
"""

from .api import TabularDiffusion
from .baseline import GaussianCopula

__all__ = ["TabularDiffusion", "GaussianCopula"]
