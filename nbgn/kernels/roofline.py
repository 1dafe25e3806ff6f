"""Memory limits to measure a group norm against: the roofline and the two-pass floor.

``x *= factor`` (``scale_inplace``) reads and writes every element once, the least memory traffic
an in-place group norm can move, so ``time(scale_inplace) / time(group_norm(x, g, out=x))`` is the
fraction of the memory-bandwidth limit that nbgn reaches (1.0: no more bytes than a single
read-modify-write pass, at the same speed).

No exact group norm can write any value of a *unit* (an NCHW group of a sample; an NHWC sample,
whose groups interleave) before it has read the whole unit, so where a unit is larger than what
the caches keep, its second read comes from further out than a single pass's would. The *floor*
(``two_pass_floor``) is nbgn's traffic without its arithmetic: per unit, a sum of its values, then
``x *= factor`` over it from the end backwards (what the caches still hold first), the units
scheduled as nbgn schedules them in place (``_schedule.plan``). ``time(scale_inplace) /
time(floor)`` is the roofline fraction that traffic allows on that array in that machine state, and
``time(floor) / time(group_norm)`` how close nbgn's arithmetic lets it come.
"""

import numba
import numpy as np
from numba import prange

from .. import _schedule, _threading
from ._compile import cached_njit, parallel_and_serial
from .atomics import atomic_add, claim, cooperative_counters, wait_for
from .moments import APPLY_CHUNK, REDUCTION_FASTMATH, cast_like, chunk_bounds, part_bounds


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


@cached_njit(fastmath=REDUCTION_FASTMATH)
def _run_sum(values):
    """The sum of ``values`` in their own type (vectorized: reassociated), as float64."""
    total = cast_like(0.0, values)
    for i in range(values.size):
        total += values[i]
    return np.float64(total)


@cached_njit()
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


@numba.njit(inline="always")
def _part(flat, num_units, num_parts, item):
    """Part ``item % num_parts`` of unit ``item // num_parts`` of ``flat``."""
    unit_length = flat.size // num_units
    unit_start = (item // num_parts) * unit_length
    start, stop = part_bounds(unit_length, num_parts, item % num_parts)
    return flat[unit_start + start : unit_start + stop]


def _floor_whole(flat, num_units, num_chunks, factor, sums):
    """Units whole, ``num_chunks`` runs of them in parallel (nbgn's fused kernels): each unit's
    sum into ``sums[unit]``, then its scaling."""
    for chunk in prange(num_chunks):
        first, stop = chunk_bounds(num_units, num_chunks, chunk)
        for unit in range(first, stop):
            values = _part(flat, num_units, 1, unit)
            sums[unit] = _run_sum(values)
            _scale_reversed(values, factor)


floor_whole_parallel, floor_whole_serial = parallel_and_serial(_floor_whole)


def _floor_split(flat, num_units, num_parts, factor, sums):
    """Every unit in ``num_parts`` parts: all the parts' sums in one parallel loop, then their
    scaling in a second one (nbgn's split kernels)."""
    for item in prange(num_units * num_parts):
        sums[item] = _run_sum(_part(flat, num_units, num_parts, item))
    for item in prange(num_units * num_parts):
        _scale_reversed(_part(flat, num_units, num_parts, item), factor)


floor_split = cached_njit(parallel=True)(_floor_split)


@cached_njit()
def _units_together(flat, num_units, factor, sums, thread, num_threads, progress, started):
    """``thread``'s share of ``_floor_together``: per unit, the sum of its part, a wait for the
    other parts' sums, then the scaling of its part (``nchw.normalize_slabs_together``'s order)."""
    atomic_add(started, thread, 1)
    for unit in range(num_units):
        slots = unit * (1 + 2 * num_threads)
        for i in range(num_threads):
            part = (thread + i) % num_threads
            if claim(progress, started, slots + 1 + part, part, thread, num_threads):
                item = unit * num_threads + part
                sums[item] = _run_sum(_part(flat, num_units, num_threads, item))
                atomic_add(progress, slots, 1)
        wait_for(progress, slots, num_threads)
        for i in range(num_threads):
            part = (thread + i) % num_threads
            if claim(progress, started, slots + 1 + num_threads + part, part, thread, num_threads):
                item = unit * num_threads + part
                _scale_reversed(_part(flat, num_units, num_threads, item), factor)


@cached_njit()
def _counters(num_units, num_threads):
    return cooperative_counters(num_units, num_threads)


def _floor_together(flat, num_units, num_threads, factor, sums):
    """The units one after the other, each by all threads together, a part each, in one launch
    (nbgn's cooperative kernels)."""
    progress, started = _counters(num_units, num_threads)
    for thread in prange(num_threads):
        _units_together(flat, num_units, factor, sums, thread, num_threads, progress, started)


floor_together = cached_njit(parallel=True)(_floor_together)


def two_pass_floor(x: np.ndarray, num_units: int, factor: float = 1.0) -> float:
    """The floor pass over C-contiguous ``x`` as ``num_units`` equal contiguous units (see the
    module notes), scheduled as nbgn schedules an in-place group norm of such units
    (``_schedule.plan``: serial, whole units per thread, units split into parts, or units one
    after the other by several threads). Returns the sum of ``x`` before scaling, so that no pass is
    optimized away.
    """
    _check_contiguous(x, "two_pass_floor")
    if num_units < 1 or x.size % num_units:
        raise ValueError(f"num_units must divide x.size ({x.size}); got {num_units}.")
    if x.size == 0:
        return 0.0
    flat = x.reshape(-1)
    typed_factor = x.dtype.type(factor)
    unit_length = x.size // num_units
    plan = _schedule.plan(num_units, unit_length, unit_length * x.itemsize, in_place=True)
    sums = np.empty(num_units * plan.parts)
    if not plan.parallel:
        floor_whole_serial(flat, num_units, 1, typed_factor, sums)
        return float(sums.sum())
    with _threading.kernel_guard():
        if plan.cooperative:
            floor_together(flat, num_units, plan.parts, typed_factor, sums)
        elif plan.parts == 1:
            floor_whole_parallel(flat, num_units, plan.chunks, typed_factor, sums)
        else:
            floor_split(flat, num_units, plan.parts, typed_factor, sums)
    return float(sums.sum())


def _check_contiguous(x: np.ndarray, name: str) -> None:
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} needs a C-contiguous array: pass np.ascontiguousarray(x).")
