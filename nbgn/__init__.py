"""nbgn: fast, exact Group Normalization on the CPU with Numba kernels.

``group_norm`` normalizes, ``group_moments`` returns the per-group mean and variance, ``GroupNorm`` is
a layer object, and ``nbgn.baseline`` is the vectorized NumPy implementation they are measured against.
"""

from . import _threading

_threading.configure()  # before any parallel kernel runs: see nbgn/_threading.py

from . import baseline  # noqa: E402
from ._info import info  # noqa: E402
from .api import group_moments, group_norm  # noqa: E402
from .layer import GroupNorm  # noqa: E402

__version__ = "0.1.0"

__all__ = ["GroupNorm", "__version__", "baseline", "group_moments", "group_norm", "info"]
