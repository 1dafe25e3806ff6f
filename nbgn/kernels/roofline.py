"""Memory limits to measure a group norm against: the roofline and the two-pass floor.

``x *= factor`` (``scale_inplace``) reads and writes every element once, the least memory traffic
an in-place group norm can move, so ``time(scale_inplace) / time(group_norm(x, g, out=x))`` is the
fraction of the memory-bandwidth limit that nbgn reaches (1.0: no more bytes than a single
read-modify-write pass, at the same speed).

No exact group norm can write any value of a *unit* (an NCHW group of a sample; an NHWC sample,
whose groups interleave) before it has read the whole unit, so where a unit is larger than what
the caches keep, its second read comes from further out than a single pass's would. The *floor*
(``two_pass_floor``) is that constraint with no arithmetic: per unit, a sum of its values, then
``x *= factor`` over it from the end backwards (what the caches still hold first), with the
units spread over the threads as nbgn spreads them. ``time(scale_inplace) / time(floor)`` is the
highest roofline fraction an exact group norm can reach on that array and machine state, and
``time(floor) / time(group_norm)`` how close nbgn comes to it.
"""

import numba
import numpy as np
from numba import prange

from .. import _schedule, _threading
from ._compile import parallel_and_serial
from .moments import APPLY_CHUNK, REDUCTION_FASTMATH, part_bounds


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
    _check_contiguous(x, "scale_inplace")
    scale = scale_flat_parallel if _schedule.plan(1, x.size).parallel else scale_flat_serial
    scale(x.reshape(-1), x.dtype.type(factor))


@numba.njit(cache=True, fastmath=REDUCTION_FASTMATH)
def _run_sum(values):
    """The sum of ``values`` in their own type (vectorized: reassociated)."""
    total = values[0] * 0
    for i in range(values.size):
        total += values[i]
    return np.float64(total)


@numba.njit(cache=True)
def _scale_reversed(values, factor):
    """``values *= factor`` a chunk at a time from the end, each chunk forwards, as nbgn's
    normalization goes (``moments.apply_reversed``)."""
    chunk_stop = values.size
    while chunk_stop > 0:
        chunk_start = max(0, chunk_stop - APPLY_CHUNK)
        chunk = values[chunk_start:chunk_stop]
        for i in range(chunk.size):
            chunk[i] *= factor
        chunk_stop = chunk_start


def _units_each_whole(flat, num_units, factor, sums):
    """Each unit by one thread: its sum into ``sums[unit]``, then its scaling."""
    unit_length = flat.size // num_units
    for unit in prange(num_units):
        values = flat[unit * unit_length : (unit + 1) * unit_length]
        sums[unit] = _run_sum(values)
        _scale_reversed(values, factor)


units_each_whole_parallel, units_each_whole_serial = parallel_and_serial(_units_each_whole)


def _unit_parts_sum(unit, num_parts, sums):
    """Part ``p`` of ``unit``'s sum into ``sums[p]``, the parts in parallel."""
    for part in prange(num_parts):
        start, stop = part_bounds(unit.size, num_parts, part)
        sums[part] = _run_sum(unit[start:stop])


def _unit_parts_scale(unit, num_parts, factor):
    """``unit *= factor``, each part in parallel, from its end backwards."""
    for part in prange(num_parts):
        start, stop = part_bounds(unit.size, num_parts, part)
        _scale_reversed(unit[start:stop], factor)


unit_parts_sum = numba.njit(cache=True, parallel=True)(_unit_parts_sum)
unit_parts_scale = numba.njit(cache=True, parallel=True)(_unit_parts_scale)


def two_pass_floor(x: np.ndarray, num_units: int, factor: float = 1.0) -> float:
    """The floor pass over C-contiguous ``x`` as ``num_units`` equal contiguous units (see the
    module notes); returns the sum of ``x`` before scaling, so that no pass is optimized away.

    Units go to the threads whole when they share out evenly (a multiple of the threads, or at least
    ``_schedule.BALANCED_UNITS_PER_THREAD`` per thread); otherwise every unit is split among all the
    threads, summed, then scaled, one unit after the other. Serial where nbgn's plan is.
    """
    _check_contiguous(x, "two_pass_floor")
    if num_units < 1 or x.size % num_units:
        raise ValueError(f"num_units must divide x.size ({x.size}); got {num_units}.")
    flat = x.reshape(-1)
    typed_factor = x.dtype.type(factor)
    threads = _threading.num_threads()
    if not _schedule.plan(1, x.size).parallel:
        sums = np.empty(num_units)
        units_each_whole_serial(flat, num_units, typed_factor, sums)
        return float(sums.sum())
    balanced = num_units >= _schedule.BALANCED_UNITS_PER_THREAD * threads
    if balanced or num_units % threads == 0:
        sums = np.empty(num_units)
        with _threading.kernel_guard():
            units_each_whole_parallel(flat, num_units, typed_factor, sums)
        return float(sums.sum())
    total = 0.0
    sums = np.empty(threads)
    with _threading.kernel_guard():
        for unit in flat.reshape(num_units, -1):
            unit_parts_sum(unit, threads, sums)
            total += sums.sum()
            unit_parts_scale(unit, threads, typed_factor)
    return total


def _check_contiguous(x: np.ndarray, name: str) -> None:
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} needs a C-contiguous array: pass np.ascontiguousarray(x).")
