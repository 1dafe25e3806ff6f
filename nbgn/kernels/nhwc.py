"""Channels-last kernels: ``x`` is the flat C-contiguous buffer of an ``(N, spatial, C)`` array.

The groups of a sample interleave along the contiguous channel axis, so the kernels walk a sample's
positions in *rows* of ``lane_positions(C)`` positions (``lanes = positions * C`` values) and keep
one float64 accumulator per lane: the inner loop runs along contiguous memory and vectorizes even for
three channels. Every lane of a group shares the group's pivot, so lanes add up into group sums
without a merge; chunks of rows are merged with Chan's formula.

Bytes moved per element: the moments pass reads a sample once and the normalization reads it again in
reverse (from L2/L3 when a sample fits there) and writes it: ``2b`` to ``3b`` per element.
"""

import numba
import numpy as np

from ._compile import parallel_and_serial
from .moments import (
    CHUNK,
    destination,
    finalize_group,
    fold_channel,
    merge_shifted_sums,
    part_bounds,
)

#: Lanes per row to aim for: enough for several 512-bit vectors when there are few channels.
MIN_LANES = 256


@numba.njit(inline="always")
def lane_positions(channels, positions):
    """Positions per row: enough for ``MIN_LANES`` values per row, but no more than there are."""
    return max(1, min(MIN_LANES // channels, positions))


@numba.njit(inline="always")
def begin_chunk(x, chunk_start, width, channels_per_group, lane_group, group_pivot, lanes):
    """Take each group's pivot from the chunk's first position; clear the lane sums.

    ``lanes`` rows: 0 the lane's pivot (its group's), 1 and 2 the shifted sums of its values.
    """
    for g in range(group_pivot.size):
        group_pivot[g] = x[chunk_start + g * channels_per_group]
    for j in range(width):
        lanes[0, j] = group_pivot[lane_group[j]]
        lanes[1, j] = 0.0
        lanes[2, j] = 0.0


@numba.njit(inline="always")
def accumulate_rows(x, start, width, rows, lanes):
    """Add ``rows`` consecutive rows of ``width`` values, from ``x[start]``, to the lane sums."""
    for r in range(rows):
        row = x[start + r * width : start + (r + 1) * width]
        for j in range(width):
            d = np.float64(row[j]) - lanes[0, j]
            lanes[1, j] += d
            lanes[2, j] += d * d


@numba.njit(inline="always")
def end_chunk(x, sample_start, width, group_count, channels_per_group, group_pivot, lanes, stats):
    """Add the lane sums up per group and merge each group's chunk into ``stats``.

    Lanes are added per channel first (whole rows of contiguous vector adds), then each group's
    channels, which are contiguous too: no per-lane indirection.
    """
    num_groups = group_pivot.size
    channels = num_groups * channels_per_group
    channel_sums = np.zeros((2, channels))
    for row_start in range(0, width, channels):
        for c in range(channels):
            channel_sums[0, c] += lanes[1, row_start + c]
            channel_sums[1, c] += lanes[2, row_start + c]
    for g in range(num_groups):
        s1 = 0.0
        s2 = 0.0
        for c in range(g * channels_per_group, (g + 1) * channels_per_group):
            s1 += channel_sums[0, c]
            s2 += channel_sums[1, c]
        ref = np.float64(x[sample_start + g * channels_per_group])
        merge_shifted_sums(stats, g, group_count, s1, s2, group_pivot[g], ref)


@numba.njit(cache=True)
def sample_moments(x, sample_start, first_position, stop_position, channels, num_groups, stats):
    """Merge the moments of positions ``[first_position, stop_position)`` of one sample.

    ``stats[g]`` receives group ``g``'s ``(count, offset, m2)``, offsets about the sample's first
    value of that group, ``x[sample_start + g * channels_per_group]``.

    The lane sums live in memory, so each sweep adds four rows to them at once. The four rows come
    from the four quarters of the range: four long sequential streams that the hardware
    prefetchers follow (four adjacent rows would be four streams of a few lines each, which they
    do not, and the loop would wait on memory).
    """
    channels_per_group = channels // num_groups
    positions_per_row = lane_positions(channels, stop_position - first_position)
    width = positions_per_row * channels
    lane_group = np.empty(width, np.int64)
    for j in range(width):
        lane_group[j] = (j % channels) // channels_per_group
    lanes = np.empty((3, width))
    group_pivot = np.empty(num_groups)

    rows_start = sample_start + first_position * channels
    full_rows = (stop_position - first_position) // positions_per_row
    quarter = full_rows // 4
    # At least 16 sweeps per chunk, so that folding the lanes into groups (~width operations)
    # stays small next to the chunk's 64 * width values even when there are thousands of channels.
    sweeps_per_chunk = max(16, CHUNK // (4 * width))
    for sweep_start in range(0, quarter, sweeps_per_chunk):
        sweeps = min(sweeps_per_chunk, quarter - sweep_start)
        chunk_start = rows_start + sweep_start * width
        begin_chunk(x, chunk_start, width, channels_per_group, lane_group, group_pivot, lanes)
        for r in range(sweep_start, sweep_start + sweeps):
            row0 = x[rows_start + r * width : rows_start + (r + 1) * width]
            row1 = x[rows_start + (r + quarter) * width : rows_start + (r + quarter + 1) * width]
            row2 = x[
                rows_start + (r + 2 * quarter) * width : rows_start + (r + 2 * quarter + 1) * width
            ]
            row3 = x[
                rows_start + (r + 3 * quarter) * width : rows_start + (r + 3 * quarter + 1) * width
            ]
            for j in range(width):
                pivot = lanes[0, j]
                d0 = np.float64(row0[j]) - pivot
                d1 = np.float64(row1[j]) - pivot
                d2 = np.float64(row2[j]) - pivot
                d3 = np.float64(row3[j]) - pivot
                lanes[1, j] += (d0 + d1) + (d2 + d3)
                lanes[2, j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        end_chunk(x, sample_start, width, sweeps * 4 * positions_per_row * channels_per_group,
                  channels_per_group, group_pivot, lanes, stats)  # fmt: skip

    # What the quarters leave: up to three full rows, then fewer than a row of positions.
    leftover_rows = full_rows - 4 * quarter
    if leftover_rows:
        chunk_start = rows_start + 4 * quarter * width
        begin_chunk(x, chunk_start, width, channels_per_group, lane_group, group_pivot, lanes)
        accumulate_rows(x, chunk_start, width, leftover_rows, lanes)
        end_chunk(x, sample_start, width, leftover_rows * positions_per_row * channels_per_group,
                  channels_per_group, group_pivot, lanes, stats)  # fmt: skip
    tail_positions = stop_position - first_position - full_rows * positions_per_row
    if tail_positions:
        chunk_start = rows_start + full_rows * width
        begin_chunk(x, chunk_start, channels, channels_per_group, lane_group, group_pivot, lanes)
        accumulate_rows(x, chunk_start, channels, tail_positions, lanes)
        end_chunk(x, sample_start, channels, tail_positions * channels_per_group,
                  channels_per_group, group_pivot, lanes, stats)  # fmt: skip


@numba.njit(inline="always")
def apply_row(x, out, start, width, center, scale, shift):
    """Normalize ``width`` values from ``x[start]`` with lane coefficients (``out=None``: in place)."""
    source = x[start : start + width]
    target = destination(source, out, start, start + width)
    for j in range(width):
        target[j] = (source[j] - center[j]) * scale[j] + shift[j]


@numba.njit(inline="always")
def apply_positions(x, out, sample_start, first_position, stop_position, channels, coefficients):
    """Normalize positions ``[first_position, stop_position)`` of one sample, last rows first.

    ``coefficients`` holds the sample's ``(center, scale, shift)`` per channel, shape ``(C, 3)``.
    Each sweep normalizes one row from each quarter of the range, sharing the loads of the lane
    coefficients, in four long streams the hardware prefetchers can follow.
    """
    positions_per_row = lane_positions(channels, stop_position - first_position)
    width = positions_per_row * channels
    center = np.empty(width, x.dtype)
    scale = np.empty(width, x.dtype)
    shift = np.empty(width, x.dtype)
    for j in range(width):
        center[j] = coefficients[j % channels, 0]
        scale[j] = coefficients[j % channels, 1]
        shift[j] = coefficients[j % channels, 2]
    rows_start = sample_start + first_position * channels
    full_rows = (stop_position - first_position) // positions_per_row
    quarter = full_rows // 4

    tail_positions = stop_position - first_position - full_rows * positions_per_row
    for p in range(tail_positions - 1, -1, -1):
        apply_row(
            x, out, rows_start + full_rows * width + p * channels, channels, center, scale, shift
        )
    for r in range(full_rows - 1, 4 * quarter - 1, -1):
        apply_row(x, out, rows_start + r * width, width, center, scale, shift)
    for r in range(quarter - 1, -1, -1):
        starts = (
            rows_start + r * width,
            rows_start + (r + quarter) * width,
            rows_start + (r + 2 * quarter) * width,
            rows_start + (r + 3 * quarter) * width,
        )
        source0 = x[starts[0] : starts[0] + width]
        source1 = x[starts[1] : starts[1] + width]
        source2 = x[starts[2] : starts[2] + width]
        source3 = x[starts[3] : starts[3] + width]
        target0 = destination(source0, out, starts[0], starts[0] + width)
        target1 = destination(source1, out, starts[1], starts[1] + width)
        target2 = destination(source2, out, starts[2], starts[2] + width)
        target3 = destination(source3, out, starts[3], starts[3] + width)
        for j in range(width):
            c, a, b = center[j], scale[j], shift[j]
            target0[j] = (source0[j] - c) * a + b
            target1[j] = (source1[j] - c) * a + b
            target2[j] = (source2[j] - c) * a + b
            target3[j] = (source3[j] - c) * a + b


def _group_norm_fused(x, out, num_samples, spatial, channels, num_groups, weight, bias, eps):
    """Normalize one sample per parallel iteration: moments, then normalization from cache.

    Parameters
    ----------
    x : float32 or float64 array, shape (N * spatial * C,), C-contiguous
    out : array like ``x``, or None to normalize ``x`` in place
    weight, bias : float64 arrays, shape (C,)
    """
    channels_per_group = channels // num_groups
    sample_length = spatial * channels
    for n in numba.prange(num_samples):
        sample_start = n * sample_length
        stats = np.zeros((num_groups, 3))
        sample_moments(x, sample_start, 0, spatial, channels, num_groups, stats)
        coefficients = np.empty((channels, 3), x.dtype)
        for g in range(num_groups):
            ref = np.float64(x[sample_start + g * channels_per_group])
            mean_hi, mean_lo, _, rstd = finalize_group(
                ref, stats[g, 0], stats[g, 1], stats[g, 2], eps
            )
            for c in range(g * channels_per_group, (g + 1) * channels_per_group):
                fold_channel(coefficients, c, mean_hi, mean_lo, rstd, weight[c], bias[c])
        apply_positions(x, out, sample_start, 0, spatial, channels, coefficients)


group_norm_fused, group_norm_fused_serial = parallel_and_serial(_group_norm_fused)


def _partial_moments(x, num_samples, spatial, channels, num_groups, num_parts):
    """Moments of ``num_parts`` position ranges of every sample, for when samples are few.

    Returns
    -------
    partial : float64 array, shape (N * num_groups * num_parts, 3)
        ``(count, offset, m2)`` per (sample, group, part).
    refs : float64 array, shape (N * num_groups,)
        Each group's first value in its sample, the reference of its offsets.
    """
    channels_per_group = channels // num_groups
    sample_length = spatial * channels
    by_part = np.zeros((num_samples * num_parts, num_groups, 3))
    for item in numba.prange(num_samples * num_parts):
        start, stop = part_bounds(spatial, num_parts, item % num_parts)
        sample_start = (item // num_parts) * sample_length
        sample_moments(x, sample_start, start, stop, channels, num_groups, by_part[item])
    partial = np.empty((num_samples * num_groups * num_parts, 3))
    refs = np.empty(num_samples * num_groups)
    for n in range(num_samples):
        for g in range(num_groups):
            refs[n * num_groups + g] = x[n * sample_length + g * channels_per_group]
            for p in range(num_parts):
                partial[(n * num_groups + g) * num_parts + p] = by_part[n * num_parts + p, g]
    return partial, refs


partial_moments, partial_moments_serial = parallel_and_serial(_partial_moments)


@numba.njit(cache=True, parallel=True)
def apply_parts(x, out, coefficients, spatial, channels, num_parts):
    """Normalize ``num_parts`` position ranges of every sample in parallel.

    ``coefficients`` has one ``(center, scale, shift)`` row per (sample, channel).
    """
    sample_length = spatial * channels
    num_samples = x.shape[0] // sample_length
    for item in numba.prange(num_samples * num_parts):
        n = item // num_parts
        start, stop = part_bounds(spatial, num_parts, item % num_parts)
        apply_positions(
            x,
            out,
            n * sample_length,
            start,
            stop,
            channels,
            coefficients[n * channels : (n + 1) * channels],
        )
