"""Single-pass group moments shared by both layouts, and the fold into per-channel coefficients.

The algorithm (one read of the input):

1. The input is consumed in *chunks* of about ``CHUNK`` elements. Each chunk subtracts a *pivot*, one
   of its own values, and accumulates the shifted sums ``s1 = sum(x - pivot)`` and
   ``s2 = sum((x - pivot)**2)`` in float64. Because the pivot is a member of the data, the shifted
   values are of the order of the spread, not of the mean, so ``m2 = s2 - s1**2 / n`` cancels at
   most ``log10(n_chunk)`` digits even when the mean is 1e8 standard deviations from zero.
2. Chunks are merged with Chan's pairwise formula, whose terms are all non-negative: no cancellation.
   Every running mean is kept as an *offset* from a reference value ``ref`` (the group's first
   element), so the mean is carried as ``ref + offset`` with more than float64 precision.
3. ``finalize_group`` turns ``(count, offset, m2)`` into the mean as an unevaluated sum
   ``mean_hi + mean_lo`` (TwoSum, exact), the population variance and ``rstd``.
4. ``fold_channel`` folds mean, rstd, weight and bias into ``y = (x - center) * scale + shift`` per
   channel, where ``center`` is the mean rounded to the input dtype. ``x - center`` is exact
   (Sterbenz) where it matters, when x is close to the mean, so float32 output stays accurate even
   for a group with mean 3e4 and std 1e-2, where the usual ``x * scale + shift`` fold loses all digits.

Statistics are stored as rows of three float64 values, indexed by ``COUNT``, ``OFFSET``, ``M2``.

Fastmath: only the reduction loop (``shifted_sums``) gets ``reassoc``, which it needs to vectorize;
merges and TwoSum must keep IEEE semantics or the compiler may simplify the error terms away. No
function uses ``nnan``/``ninf``, so NaN and Inf propagate.
"""

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from ._compile import parallel_and_serial

#: Elements per chunk: long enough that the per-chunk merge (and, for NHWC, the fold of the lane
#: sums into group sums) costs nothing measurable, short enough that ``s2 - s1**2 / n`` cancels at
#: most ``log10(CHUNK)``, under 5 of float64's 16 digits, and that a chunk stays in L1/L2.
CHUNK = 1 << 14

COUNT, OFFSET, M2 = 0, 1, 2

REDUCTION_FASTMATH = {"reassoc", "contract", "nsz"}


@numba.njit(cache=True, fastmath=REDUCTION_FASTMATH)
def shifted_sums(flat, start, stop, pivot):
    """``(sum(x - pivot), sum((x - pivot)**2))`` over ``flat[start:stop]``, in float64."""
    # Indexing a slice from 0 lets LLVM see non-negative indices; indexing ``flat`` from ``start``
    # keeps Numba's negative-index wraparound in the loop, which vectorizes into slow gathers.
    values = flat[start:stop]
    s1 = 0.0
    s2 = 0.0
    for i in range(values.size):
        d = np.float64(values[i]) - pivot
        s1 += d
        s2 += d * d
    return s1, s2


@numba.njit(inline="always")
def merge_stats(stats, row, count, offset, m2):
    """Chan's merge of a chunk ``(count, offset, m2)`` into ``stats[row]`` (same reference)."""
    if count == 0:
        return
    n_a = stats[row, COUNT]
    if n_a == 0:
        stats[row, COUNT] = count
        stats[row, OFFSET] = offset
        stats[row, M2] = m2
        return
    n = n_a + count
    delta = offset - stats[row, OFFSET]
    stats[row, OFFSET] += delta * (count / n)
    stats[row, M2] += m2 + delta * delta * (n_a * (count / n))
    stats[row, COUNT] = n


@numba.njit(inline="always")
def merge_shifted_sums(stats, row, count, s1, s2, pivot, ref):
    """Merge a chunk given by its shifted sums about ``pivot`` into ``stats[row]`` (about ``ref``)."""
    mean_shift = s1 / count
    merge_stats(stats, row, count, (pivot - ref) + mean_shift, s2 - s1 * mean_shift)


@numba.njit(inline="always")
def contiguous_moments(flat, start, stop, ref, stats, row):
    """Merge the moments of the contiguous run ``flat[start:stop]`` into ``stats[row]``."""
    for chunk_start in range(start, stop, CHUNK):
        chunk_stop = min(chunk_start + CHUNK, stop)
        pivot = np.float64(flat[chunk_start])
        s1, s2 = shifted_sums(flat, chunk_start, chunk_stop, pivot)
        merge_shifted_sums(stats, row, chunk_stop - chunk_start, s1, s2, pivot, ref)


@numba.njit(inline="always")
def merge_parts(partial, first_row, num_parts, stats, row):
    """Merge ``partial[first_row : first_row + num_parts]`` (same reference) into ``stats[row]``."""
    for p in range(first_row, first_row + num_parts):
        merge_stats(stats, row, partial[p, COUNT], partial[p, OFFSET], partial[p, M2])


@numba.njit(inline="always")
def finalize_group(ref, count, offset, m2, eps):
    """``(mean_hi, mean_lo, var, rstd)`` of a group; ``mean_hi + mean_lo`` is the mean to ~1e-32.

    A zero ``var + eps`` (constant group, ``eps == 0``) gives ``rstd = 0`` so the output is exactly
    ``bias``; NaN stays NaN.
    """
    mean_hi = ref + offset
    offset_part = mean_hi - ref
    mean_lo = (ref - (mean_hi - offset_part)) + (offset - offset_part)
    var = m2 / count
    if var < 0.0:
        var = 0.0
    denominator = var + eps
    rstd = 0.0 if denominator == 0.0 else 1.0 / np.sqrt(denominator)
    return mean_hi, mean_lo, var, rstd


@numba.njit(inline="always")
def fold_channel(coefficients, channel, mean_hi, mean_lo, rstd, weight, bias):
    """Write ``(center, scale, shift)`` of a channel into ``coefficients[channel]`` (input dtype).

    ``y = (x - center) * scale + shift``. ``center`` is the mean rounded to the input dtype (the store
    rounds); what rounding dropped moves into ``shift``.
    """
    coefficients[channel, 0] = mean_hi
    residual = (mean_hi - np.float64(coefficients[channel, 0])) + mean_lo
    scale = rstd * weight
    coefficients[channel, 1] = scale
    coefficients[channel, 2] = bias - residual * scale


def destination(source, out, start, stop):
    """Where normalized ``source`` (``x[start:stop]``) goes: itself if ``out`` is None, else
    ``out[start:stop]``. Chosen when Numba compiles, from ``out``'s type (see ``_destination``)."""


@overload(destination, inline="always")
def _destination(source, out, start, stop):
    # In place returns the very slice being read: LLVM then sees one pointer and vectorizes the
    # loop without runtime overlap checks (two slices of one buffer would fail them and run the
    # scalar loop). A typed branch, not ``source if out is None else ...``: that would unify a
    # read-only input's type with the output's.
    if isinstance(out, types.NoneType):
        return lambda source, out, start, stop: source
    return lambda source, out, start, stop: out[start:stop]


@numba.njit(inline="always")
def apply_contiguous(x, out, start, stop, center, scale, shift):
    """``out[i] = (x[i] - center) * scale + shift`` for i in ``[start, stop)``, in the input dtype.

    ``out=None`` writes into ``x``.
    """
    source = x[start:stop]
    target = destination(source, out, start, stop)
    for i in range(source.size):
        target[i] = (source[i] - center) * scale + shift


@numba.njit(inline="always")
def part_bounds(length, num_parts, part):
    """``[start, stop)`` of part ``part`` of ``num_parts`` near-equal parts of ``range(length)``.

    Inner bounds are multiples of 16 elements so that parts split on cache-line (64-byte) multiples.
    """
    start = (length * part // num_parts) // 16 * 16
    stop = length if part == num_parts - 1 else (length * (part + 1) // num_parts) // 16 * 16
    return start, stop


@numba.njit(inline="always")
def apply_reversed(x, out, start, stop, center, scale, shift):
    """``apply_contiguous`` from the end backwards, a chunk at a time.

    The moments pass read the data forwards, so its tail is what the caches still hold: starting
    there turns part of the second read into cache hits when the data is larger than L2.
    """
    chunk_stop = stop
    while chunk_stop > start:
        chunk_start = max(start, chunk_stop - CHUNK)
        apply_contiguous(x, out, chunk_start, chunk_stop, center, scale, shift)
        chunk_stop = chunk_start


def _finish_moments(partial, refs, num_parts):
    """Merge per-part moments and return float64 ``(mean, var)`` per group, shape ``(groups,)``."""
    num_rows = refs.shape[0]
    mean = np.empty(num_rows)
    var = np.empty(num_rows)
    stats = np.zeros((num_rows, 3))
    for row in numba.prange(num_rows):
        merge_parts(partial, row * num_parts, num_parts, stats, row)
        mean_hi, mean_lo, group_var, _ = finalize_group(
            refs[row], stats[row, COUNT], stats[row, OFFSET], stats[row, M2], 0.0
        )
        mean[row] = mean_hi + mean_lo
        var[row] = group_var
    return mean, var


finish_moments, finish_moments_serial = parallel_and_serial(_finish_moments)


@numba.njit(cache=True, parallel=True)
def channel_coefficients(partial, refs, num_parts, channels, num_groups, weight, bias, eps, like):
    """Per-channel ``(center, scale, shift)`` rows, shape ``(N * C, 3)``, in ``like``'s dtype.

    ``partial`` holds ``num_parts`` consecutive rows of moments per (sample, group) row of ``refs``.
    """
    num_rows = refs.shape[0]
    channels_per_group = channels // num_groups
    coefficients = np.empty((num_rows * channels_per_group, 3), like.dtype)
    stats = np.zeros((num_rows, 3))
    for row in numba.prange(num_rows):
        merge_parts(partial, row * num_parts, num_parts, stats, row)
        mean_hi, mean_lo, _, rstd = finalize_group(
            refs[row], stats[row, COUNT], stats[row, OFFSET], stats[row, M2], eps
        )
        first_channel = (row % num_groups) * channels_per_group
        for k in range(channels_per_group):
            channel = first_channel + k
            fold_channel(
                coefficients,
                row * channels_per_group + k,
                mean_hi,
                mean_lo,
                rstd,
                weight[channel],
                bias[channel],
            )
    return coefficients
