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

from .moments import (
    CHUNK,
    finalize_group,
    fold_channel,
    merge_shifted_sums,
    part_bounds,
)

#: Lanes per row to aim for: enough for several 512-bit vectors when there are few channels.
MIN_LANES = 256


@numba.njit(inline="always")
def lane_positions(channels):
    """Positions per row, so that a row has at least ``MIN_LANES`` values."""
    return max(1, MIN_LANES // channels)


@numba.njit(cache=True)
def sample_moments(x, sample_start, first_position, stop_position, channels, num_groups, stats):
    """Merge the moments of positions ``[first_position, stop_position)`` of one sample.

    ``stats[g]`` receives group ``g``'s ``(count, offset, m2)``, offsets about the sample's first
    value of that group, ``x[sample_start + g * channels_per_group]``.
    """
    channels_per_group = channels // num_groups
    positions_per_row = lane_positions(channels)
    lanes = positions_per_row * channels
    lane_group = np.empty(lanes, np.int64)
    for j in range(lanes):
        lane_group[j] = (j % channels) // channels_per_group
    lane_pivot = np.empty(lanes)
    lane_s1 = np.empty(lanes)
    lane_s2 = np.empty(lanes)
    group_pivot = np.empty(num_groups)
    group_s1 = np.empty(num_groups)
    group_s2 = np.empty(num_groups)
    rows_per_chunk = max(4, CHUNK // lanes)

    position = first_position
    while position < stop_position:
        row_positions = positions_per_row
        rows = min(rows_per_chunk, (stop_position - position) // row_positions)
        if rows == 0:
            # Fewer than a row of positions left: finish with rows of a single position.
            row_positions = 1
            rows = stop_position - position
        width = row_positions * channels
        chunk_start = sample_start + position * channels
        for g in range(num_groups):
            group_pivot[g] = x[chunk_start + g * channels_per_group]
            group_s1[g] = 0.0
            group_s2[g] = 0.0
        for j in range(width):
            lane_pivot[j] = group_pivot[lane_group[j]]
            lane_s1[j] = 0.0
            lane_s2[j] = 0.0
        # Four rows per sweep: the lane sums live in memory, so each sweep loads and stores them
        # once for four rows of data instead of once per row.
        quad_rows = rows - rows % 4
        for r in range(0, quad_rows, 4):
            block = x[chunk_start + r * width : chunk_start + (r + 4) * width]
            for j in range(width):
                d0 = np.float64(block[j]) - lane_pivot[j]
                d1 = np.float64(block[width + j]) - lane_pivot[j]
                d2 = np.float64(block[2 * width + j]) - lane_pivot[j]
                d3 = np.float64(block[3 * width + j]) - lane_pivot[j]
                lane_s1[j] += (d0 + d1) + (d2 + d3)
                lane_s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        for r in range(quad_rows, rows):
            row = x[chunk_start + r * width : chunk_start + (r + 1) * width]
            for j in range(width):
                d = np.float64(row[j]) - lane_pivot[j]
                lane_s1[j] += d
                lane_s2[j] += d * d
        for j in range(width):
            group_s1[lane_group[j]] += lane_s1[j]
            group_s2[lane_group[j]] += lane_s2[j]
        count = rows * row_positions * channels_per_group
        for g in range(num_groups):
            ref = np.float64(x[sample_start + g * channels_per_group])
            merge_shifted_sums(stats, g, count, group_s1[g], group_s2[g], group_pivot[g], ref)
        position += rows * row_positions


@numba.njit(inline="always")
def apply_positions(x, out, sample_start, first_position, stop_position, channels, coefficients):
    """Normalize positions ``[first_position, stop_position)`` of one sample, last row first.

    ``coefficients`` holds the sample's ``(center, scale, shift)`` per channel, shape ``(C, 3)``.
    """
    positions_per_row = lane_positions(channels)
    lanes = positions_per_row * channels
    center = np.empty(lanes, x.dtype)
    scale = np.empty(lanes, x.dtype)
    shift = np.empty(lanes, x.dtype)
    for j in range(lanes):
        center[j] = coefficients[j % channels, 0]
        scale[j] = coefficients[j % channels, 1]
        shift[j] = coefficients[j % channels, 2]
    full_rows = (stop_position - first_position) // positions_per_row
    rows_end = sample_start + (first_position + full_rows * positions_per_row) * channels
    for i in range(sample_start + stop_position * channels - 1, rows_end - 1, -1):
        j = (i - rows_end) % channels
        value = (x[i] - center[j]) * scale[j] + shift[j]
        if out is None:
            x[i] = value
        else:
            out[i] = value
    # Four rows per sweep share each load of the lane coefficients.
    first_row_start = sample_start + first_position * channels
    for r in range(full_rows - 1, full_rows - 1 - full_rows % 4, -1):
        source = x[first_row_start + r * lanes : first_row_start + (r + 1) * lanes]
        target = source if out is None else out[first_row_start + r * lanes :]
        for j in range(lanes):
            target[j] = (source[j] - center[j]) * scale[j] + shift[j]
    for r in range(full_rows - full_rows % 4 - 4, -1, -4):
        source = x[first_row_start + r * lanes : first_row_start + (r + 4) * lanes]
        target = source if out is None else out[first_row_start + r * lanes :]
        for j in range(lanes):
            c, a, b = center[j], scale[j], shift[j]
            target[j] = (source[j] - c) * a + b
            target[lanes + j] = (source[lanes + j] - c) * a + b
            target[2 * lanes + j] = (source[2 * lanes + j] - c) * a + b
            target[3 * lanes + j] = (source[3 * lanes + j] - c) * a + b


@numba.njit(cache=True, parallel=True)
def group_norm_fused(x, out, num_samples, spatial, channels, num_groups, weight, bias, eps):
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


@numba.njit(cache=True, parallel=True)
def partial_moments(x, num_samples, spatial, channels, num_groups, num_parts):
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
