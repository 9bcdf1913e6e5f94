"""polydiff core: Gaussian paths, predictions, losses, samplers, guidance and likelihood.

Time runs over ``t in [0, 1]`` with data at ``t = 0`` (see ``../shared/DESIGN.md``).
"""
