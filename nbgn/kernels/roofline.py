"""The memory roofline: the cheapest possible in-place pass over an array.

``x *= factor`` reads and writes every element once, exactly the memory traffic an in-place group
norm must move at least, so ``time(scale_inplace) / time(group_norm(x, g, out=x))`` is the fraction
of the memory-bandwidth limit that nbgn reaches (1.0 means it moves no more bytes than a single
read-modify-write pass, at the same speed).
"""

import numpy as np
from numba import prange

from .. import _threading
from ._compile import parallel_and_serial


def _scale(flat, factor):
    for i in prange(flat.size):
        flat[i] *= factor


_scale_flat, _scale_flat_serial = parallel_and_serial(_scale)


def scale_inplace(x: np.ndarray, factor: float = 1.0) -> None:
    """Multiply a C-contiguous float array by ``factor`` in place, in parallel (the roofline pass)."""
    if not x.flags.c_contiguous:
        raise ValueError("scale_inplace needs a C-contiguous array: pass np.ascontiguousarray(x).")
    # Serial in a child forked after GNU OpenMP threads ran, where a parallel launch would kill it.
    scale = _scale_flat_serial if _threading.serial_only() else _scale_flat
    scale(x.reshape(-1), x.dtype.type(factor))
