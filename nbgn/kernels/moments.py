"""Single-pass group moments shared by both layouts, and the fold into per-channel coefficients.

The algorithm (one read of the input):

1. The input is consumed in *blocks* of up to ``BLOCK`` values. A block subtracts a *pivot* and
   accumulates the shifted sums ``s1 = sum(x - pivot)`` and ``s2 = sum((x - pivot)**2)``. The first
   pivot comes from the data (its first value; for NHWC with several groups, each group's mean at
   the first position)
   and stays while it lies within two standard deviations of each block's mean (checked, see 2), so
   the shifted values are of the order of the spread, not of the mean: ``m2 = s2 - s1**2 / n``
   cancels nothing even when the mean is 1e8 standard deviations from zero.
2. The sums run in the input's precision (*native* sums): in float32, twice the SIMD lanes of
   float64, which is what makes a cache-resident group norm fast. That stays accurate because every
   term is of the order of the spread and each SIMD lane adds up only ``BLOCK / lanes`` of them
   before the block's sums are flushed to float64. Two checks guard the assumption, so hostile data
   costs a redo, never accuracy: a pivot further than ``sqrt(REPIVOT)`` standard deviations from the
   block's mean (an outlier as first value, a jump in the data) makes the block be summed again
   about its mean, which becomes the pivot; and a non-finite ``s2`` (float32 overflow, or NaN/Inf in
   the data) makes it be summed again in float64.
   The kernels take ``sum_type``, a zero of the type to sum in, and Numba compiles one kernel per
   type: float64 for ``group_moments`` and for ``eps`` below ``NATIVE_MIN_EPS`` (where float32
   underflow of tiny spreads would matter), the input's dtype otherwise.
3. Blocks about one pivot add their float64 sums (the error bound is the per-block one: each block's
   ``s2`` is at most ``1 + REPIVOT`` times its ``m2``); such runs, and parts of a group summed apart,
   are merged with Chan's pairwise formula in float64, whose terms are all non-negative: no
   cancellation. Every running mean is kept as an *offset* from a reference value ``ref`` (the
   group's first element), so the mean is carried as ``ref + offset`` with more than float64
   precision.
4. ``finalize_group`` turns ``(count, offset, m2)`` into the mean as an unevaluated sum
   ``mean_hi + mean_lo`` (TwoSum, exact), the population variance and ``rstd``.
5. ``fold_channel`` folds mean, rstd, weight and bias into ``y = (x - center) * scale + shift`` per
   channel, where ``center`` is the mean rounded to the input dtype. ``x - center`` is exact
   (Sterbenz) where it matters, when x is close to the mean, so float32 output stays accurate even
   for a group with mean 3e4 and std 1e-2, where the usual ``x * scale + shift`` fold loses all digits.

Statistics are stored as rows of three float64 values, indexed by ``COUNT``, ``OFFSET``, ``M2``.

Fastmath: only the reduction loops get ``reassoc`` (which they need to vectorize), ``contract`` and
``nsz``; merges and TwoSum keep IEEE semantics or the compiler may simplify the error terms away. No
function uses ``nnan``/``ninf``, so NaN and Inf propagate.
"""

import numba
import numpy as np
from numba.core import types
from numba.extending import overload
from numba.np.numpy_support import as_dtype

from ._compile import cached_njit

#: Values per block. A vectorized float32 reduction keeps 32 to 64 partial sums (SIMD lanes times
#: unrolling), so each adds at most 64 terms before the flush to float64: a relative error of at
#: most ~70 float32 ulps of a sum of terms of the order of the variance. Long enough that the flush
#: and merge (a few dozen instructions) cost ~2% of a block; 8 KiB of float32 stays in L1.
BLOCK = 1 << 11

#: A block's sums stand if ``(block mean - pivot)**2 <= REPIVOT * block variance``, i.e. the pivot
#: lies within 2 standard deviations of the block's mean, which bounds the float32 sums' terms by
#: 5 times the variance. Otherwise the block is summed again about its own mean.
REPIVOT = 4.0

#: Native (float32) sums need ``eps`` at least this large: below it, float32 underflow of squared
#: deviations under 1e-19 could change ``var + eps`` (with ``eps`` 0 a spread of 1e-23 would read as
#: a constant group). Every realistic ``eps`` is far above.
NATIVE_MIN_EPS = 2.0**-60

#: Elements per chunk of the reversed normalization (see ``apply_reversed``): 64 KiB of float32.
APPLY_CHUNK = 1 << 14

COUNT, OFFSET, M2 = 0, 1, 2

REDUCTION_FASTMATH = {"reassoc", "contract", "nsz"}


def cast_like(value, like):
    """``value`` converted to the dtype of ``like`` (an array or a scalar), chosen at compile time."""


@overload(cast_like, inline="always")
def _cast_like(value, like):
    target = as_dtype(like.dtype if isinstance(like, types.Array) else like).type
    return lambda value, like: target(value)


@cached_njit(fastmath=REDUCTION_FASTMATH)
def shifted_sums(values, pivot):
    """``(sum(x - pivot), sum((x - pivot)**2))`` over ``values``, in the type of ``pivot``."""
    s1 = cast_like(0.0, pivot)
    s2 = cast_like(0.0, pivot)
    for i in range(values.size):
        d = values[i] - pivot
        s1 += d
        s2 += d * d
    return s1, s2


@numba.njit(inline="always")
def merge_stats(stats, row, count, offset, m2):
    """Chan's merge of a block ``(count, offset, m2)`` into ``stats[row]`` (same reference)."""
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
    """Merge a block given by its float64 shifted sums about ``pivot`` into ``stats[row]``."""
    mean_shift = s1 / count
    merge_stats(stats, row, count, (pivot - ref) + mean_shift, s2 - s1 * mean_shift)


@numba.njit(inline="always")
def pivot_stands(count, s1, s2):
    """False if the pivot lies more than ``sqrt(REPIVOT)`` standard deviations from the block's
    mean (float64 sums). NaN or Inf sums stand: the finiteness check deals with them.

    ``mean**2 > REPIVOT * (s2 / count - mean**2)`` with ``mean = s1 / count``, times ``count**2``:
    no division on the per-block path.
    """
    return not s1 * s1 > REPIVOT * (s2 * count - s1 * s1)


@numba.njit(inline="always")
def contiguous_moments(flat, start, stop, ref, stats, row, sum_type):
    """Merge the moments of the contiguous run ``flat[start:stop]`` into ``stats[row]``.

    Blocks are summed in the type of ``sum_type`` (the input's for native sums, or float64); see
    the module notes for the checks. The first value is the first pivot, and a pivot stays until a
    block finds it too far from its mean: the next block's sums need not wait for this block's
    merge. A block that must be redone (about its mean, or in float64) goes round the loop again:
    one call site per type keeps the hot loop inlined.
    """
    pivot = cast_like(flat[start], sum_type)
    block_start = start
    in_float64 = False
    repivoted = False
    # Blocks about one pivot add their float64 sums; a Chan merge (divisions) happens only when
    # the pivot moves and at the end. The error bound is the per-block one: every block's s2 is
    # at most (1 + REPIVOT) times its m2, so the run's s2 is too.
    run_count = 0
    run_s1 = 0.0
    run_s2 = 0.0
    while block_start < stop:
        block_stop = min(block_start + BLOCK, stop)
        count = block_stop - block_start
        block = flat[block_start:block_stop]
        pivot64 = np.float64(pivot)
        if in_float64:
            s1, s2 = shifted_sums(block, pivot64)
        else:
            typed_s1, typed_s2 = shifted_sums(block, pivot)
            s1, s2 = np.float64(typed_s1), np.float64(typed_s2)
        if not repivoted and not pivot_stands(count, s1, s2):
            if run_count > 0:
                merge_shifted_sums(stats, row, run_count, run_s1, run_s2, pivot64, ref)
                run_count = 0
                run_s1 = 0.0
                run_s2 = 0.0
            pivot = cast_like(pivot64 + s1 / count, sum_type)
            repivoted = True
        elif not in_float64 and not np.isfinite(s2):
            in_float64 = True
        else:
            run_count += count
            run_s1 += s1
            run_s2 += s2
            block_start = block_stop
            repivoted = False
            in_float64 = False
    if run_count > 0:
        merge_shifted_sums(stats, row, run_count, run_s1, run_s2, np.float64(pivot), ref)


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
def finalize_rows(finals, count, eps):
    """``finalize_group`` of every column ``g`` of ``finals``, ``(3, G)`` float64 holding each
    group's ``ref``, ``offset`` and ``m2`` (all of ``count`` values), replaced by its ``mean_hi``,
    ``mean_lo`` and ``rstd``. A loop of nothing else, so that the groups' divisions and square
    roots overlap (or share vectors), where a loop that also sums and folds each group waits for
    them one group at a time."""
    for g in range(finals.shape[1]):
        mean_hi, mean_lo, _, rstd = finalize_group(finals[0, g], count, finals[1, g],
                                                   finals[2, g], eps)  # fmt: skip
        finals[0, g] = mean_hi
        finals[1, g] = mean_lo
        finals[2, g] = rstd


@numba.njit(inline="always")
def rounded_mean(mean_hi, mean_lo, like):
    """``(center, residual)``: the mean ``mean_hi + mean_lo`` rounded to ``like``'s dtype, and
    what the rounding dropped (float64)."""
    center = cast_like(mean_hi, like)
    return center, (mean_hi - np.float64(center)) + mean_lo


@numba.njit(inline="always")
def fold_channel(mean_hi, mean_lo, rstd, weight, bias, like):
    """``(center, scale, shift)`` of a channel in ``like``'s dtype: ``y = (x - center) * scale + shift``.

    ``center`` is the mean rounded to the input dtype; what rounding dropped moves into ``shift``.
    """
    center, residual = rounded_mean(mean_hi, mean_lo, like)
    scale = rstd * weight
    return center, cast_like(scale, like), cast_like(bias - residual * scale, like)


@numba.njit(inline="always")
def fold_group(coefficients, first_row, first_channel, channels_per_group, mean_hi, mean_lo, rstd,
               weight, bias):  # fmt: skip
    """Write ``fold_channel`` of a group's channels ``first_channel, ...`` into columns
    ``first_row, ...`` of ``coefficients``, shape ``(3, rows)`` of the input dtype: centers, scales
    and shifts, each contiguous, so that this loop vectorizes (as ``(rows, 3)`` it took 1.45 us for
    2048 channels, 0.48 us as three rows)."""
    for k in range(channels_per_group):
        channel = first_channel + k
        center, scale, shift = fold_channel(
            mean_hi, mean_lo, rstd, weight[channel], bias[channel], coefficients
        )
        coefficients[0, first_row + k] = center
        coefficients[1, first_row + k] = scale
        coefficients[2, first_row + k] = shift


@numba.njit(inline="always")
def aligned_full(size, fill):
    """A new 1-D array of ``size`` copies of ``fill`` (its type) starting on a 64-byte boundary.

    Numba aligns arrays to 32 bytes, NumPy to 16: a 512-bit load from such an array straddles two
    cache lines and costs two, which halves the speed of loops over per-lane coefficients.
    """
    raw = np.full(size + 64, fill)
    skip = (-raw.ctypes.data) % 64 // raw.itemsize
    return raw[skip : skip + size]


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


def written(x, out):
    """The array a normalization writes: ``x`` if ``out`` is None, else ``out`` (chosen when Numba
    compiles, as ``destination``)."""


@overload(written, inline="always")
def _written(x, out):
    if isinstance(out, types.NoneType):
        return lambda x, out: x
    return lambda x, out: out


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
def apply_reversed(x, out, start, stop, center, scale, shift):
    """``apply_contiguous`` from the end backwards, a chunk at a time.

    The moments pass read the data forwards, so its tail is what the caches still hold: starting
    there turns part of the second read into cache hits when the data is larger than L2.
    """
    chunk_stop = stop
    while chunk_stop > start:
        chunk_start = max(start, chunk_stop - APPLY_CHUNK)
        apply_contiguous(x, out, chunk_start, chunk_stop, center, scale, shift)
        chunk_stop = chunk_start


@numba.njit(inline="always")
def part_bounds(length, num_parts, part):
    """``[start, stop)`` of part ``part`` of ``num_parts`` near-equal parts of ``range(length)``.

    Inner bounds are multiples of 16 elements so that parts split on cache-line (64-byte) multiples.
    """
    start = (length * part // num_parts) // 16 * 16
    stop = length if part == num_parts - 1 else (length * (part + 1) // num_parts) // 16 * 16
    return start, stop


@numba.njit(inline="always")
def chunk_bounds(num_items, num_chunks, chunk):
    """``[start, stop)`` of chunk ``chunk`` of ``num_chunks`` near-equal runs of ``num_items``."""
    return num_items * chunk // num_chunks, num_items * (chunk + 1) // num_chunks


@cached_njit()
def finish_moments(partial, refs, num_parts):
    """Merge per-part moments and return float64 ``(mean, var)`` per group, shape ``(groups,)``.

    Serial: a few dozen flops per (sample, group), less than a parallel launch costs.
    """
    num_rows = refs.shape[0]
    mean = np.empty(num_rows)
    var = np.empty(num_rows)
    stats = np.zeros((num_rows, 3))
    for row in range(num_rows):
        merge_parts(partial, row * num_parts, num_parts, stats, row)
        mean_hi, mean_lo, group_var, _ = finalize_group(
            refs[row], stats[row, COUNT], stats[row, OFFSET], stats[row, M2], 0.0
        )
        mean[row] = mean_hi + mean_lo
        var[row] = group_var
    return mean, var


@numba.njit(inline="always")
def merged_moments(partial, refs, num_parts, row, eps, stats):
    """``(mean_hi, mean_lo, rstd)`` of (sample, group) row ``row`` of ``refs``, its ``num_parts``
    moments in ``partial`` merged (see ``finalize_group``); ``stats`` is ``(1, 3)`` float64 scratch."""
    stats[0] = 0.0
    merge_parts(partial, row * num_parts, num_parts, stats, 0)
    mean_hi, mean_lo, _, rstd = finalize_group(
        refs[row], stats[0, COUNT], stats[0, OFFSET], stats[0, M2], eps
    )
    return mean_hi, mean_lo, rstd


@numba.njit(inline="always")
def merged_group_coefficients(partial, refs, num_parts, row, num_groups, channels_per_group, weight,
                              bias, eps, stats, coefficients, first_row):  # fmt: skip
    """Merge the ``num_parts`` moments of (sample, group) row ``row`` of ``refs`` and write its
    channels' centers, scales and shifts into columns ``first_row, ...`` of ``coefficients`` (see
    ``fold_group``).

    ``partial`` holds ``num_parts`` consecutive rows of moments per row of ``refs``; ``stats`` is
    a ``(1, 3)`` float64 scratch. Every part of a split group computes this for itself: a few
    flops per channel, cheaper than a serial pass between the two parallel ones.
    """
    mean_hi, mean_lo, rstd = merged_moments(partial, refs, num_parts, row, eps, stats)
    first_channel = (row % num_groups) * channels_per_group
    fold_group(coefficients, first_row, first_channel, channels_per_group, mean_hi, mean_lo, rstd,
               weight, bias)  # fmt: skip
