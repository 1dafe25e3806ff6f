"""The memory roofline: the cheapest possible in-place pass over an array.

``x *= factor`` reads and writes every element once, exactly the memory traffic an in-place group
norm must move at least, so ``time(scale_inplace) / time(group_norm(x, g, out=x))`` is the fraction
of the memory-bandwidth limit that nbgn reaches (1.0 means it moves no more bytes than a single
read-modify-write pass, at the same speed).
"""

import numpy as np
from numba import prange

from .. import _schedule
from ._compile import parallel_and_serial


def _scale(flat, factor):
    for i in prange(flat.size):
        flat[i] *= factor


scale_flat_parallel, scale_flat_serial = parallel_and_serial(_scale)


def scale_inplace(x: np.ndarray, factor: float = 1.0) -> None:
    """Multiply a C-contiguous float array by ``factor`` in place, in parallel (the roofline pass).

    Serial where nbgn's own plan is (``_schedule.plan``): below ``SERIAL_ELEMENTS``, at one thread,
    and in a child forked after GNU OpenMP threads ran, where a parallel launch would kill it. So
    the roofline of a small array is not a thread launch measured against a serial kernel.
    """
    if not x.flags.c_contiguous:
        raise ValueError("scale_inplace needs a C-contiguous array: pass np.ascontiguousarray(x).")
    scale = scale_flat_parallel if _schedule.plan(1, x.size).parallel else scale_flat_serial
    scale(x.reshape(-1), x.dtype.type(factor))
