"""nbgn: fast, exact Group Normalization on the CPU with Numba kernels.

``group_norm`` normalizes, ``group_moments`` returns the per-group mean and variance, ``GroupNorm`` is
a layer object, and ``nbgn.baseline`` is the vectorized NumPy implementation they are measured against.
"""

from . import baseline
from .api import group_moments, group_norm
from .layer import GroupNorm

__version__ = "0.1.0"

__all__ = ["GroupNorm", "__version__", "baseline", "group_moments", "group_norm"]
