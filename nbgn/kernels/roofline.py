"""The memory roofline: the cheapest possible in-place pass over an array.

``x *= factor`` reads and writes every element once, exactly the memory traffic an in-place group
norm must move at least, so ``time(scale_inplace) / time(group_norm(x, g, out=x))`` is the fraction
of the memory-bandwidth limit that nbgn reaches (1.0 means it moves no more bytes than a single
read-modify-write pass, at the same speed).
"""

import numba
import numpy as np
from numba import prange


@numba.njit(parallel=True, cache=True, fastmath={"contract", "arcp", "nsz"})
def _scale_flat(flat, factor):
    for i in prange(flat.size):
        flat[i] *= factor


def scale_inplace(x: np.ndarray, factor: float = 1.0) -> None:
    """Multiply a C-contiguous float array by ``factor`` in place, in parallel (the roofline pass)."""
    if not x.flags.c_contiguous:
        raise ValueError("scale_inplace needs a C-contiguous array: pass np.ascontiguousarray(x).")
    _scale_flat(x.reshape(-1), x.dtype.type(factor))
