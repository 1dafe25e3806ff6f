"""Channels-first kernels: ``x`` is the flat C-contiguous buffer of an ``(N, C, spatial)`` array.

A (sample, group) pair owns one contiguous *slab* of ``channels_per_group * spatial`` elements, and
its channels are consecutive runs of ``spatial`` elements inside it. Every kernel takes ``out=None``
to write in place: Numba compiles that case separately with a single array, so the normalization
loop has no runtime alias check between input and output.

Parallel loops only call functions compiled on their own (``normalize_slabs``,
``normalize_slabs_patterned``, ``part_moments``, ``apply_part``, ``normalize_slabs_together``), and
call them through their addresses (``_compile.call_compiled``; the ``*_at`` arguments, as
``split_addresses`` and ``cooperative_address`` find them): the same code inlined into a ``prange``
body ran at half the speed, and linked into it took seconds more to compile. A group whose channels
share one weight and bias is normalized as one segment; channels of 2 to ``WINDOW_MAX_SPATIAL``
values, in groups of whole windows of a vector's worth of channels (half a vector's too in short
slabs), a window at a time (``normalize_windows``); otherwise a channel at a time: channels of a
vector to ``SHORT_CHANNEL`` values by ``simd.apply_channels``, shorter ones as rows of a 2-D view
(``normalize_rows``), and many short float32 channels of several samples by a flat loop against
per-group patterns of weight and bias. In place, slabs larger than a core's L2 go one after the
other, each by all threads together (``group_norm_cooperative``); so do slabs fewer than threads
and too small to split (``_schedule.MIN_COOPERATIVE_PART_BYTES``), in place or not.

Bytes moved per element (``b`` = itemsize): ``normalize_slabs`` reads a slab once for the moments and
normalizes it while it is still in L2, so it moves ``2b`` to and from memory when the slab fits in L2
and up to ``3b`` when it does not (reversed normalization keeps what the caches hold useful).
Out of place, a separate output adds ``b`` read before it is written, save where input and output
together outgrow the L3 (``simd.streams``): there the long runs stream past the caches
(``simd.apply_run``), and each thread ends with ``simd.fence_streams``. Shorter channels, which
neither start on nor cover whole 64-byte lines, are written through the caches, first channel
first (see ``simd``'s notes): streaming them through a scratch run of slabs measured slower once
the loops counted no references (``refcounts``).
"""

import numba
import numpy as np
from numba.extending import register_jitable

from . import _compile
from ._compile import (
    PARTIAL,
    cached_njit,
    call_compiled,
    compiled_address,
    parallel_and_serial,
)
from .atomics import atomic_add, claim, cooperative_counters, wait_for
from .moments import (
    APPLY_CHUNK,
    aligned_full,
    apply_contiguous,
    cast_like,
    chunk_bounds,
    contiguous_moments,
    destination,
    finalize_group,
    fold_channel,
    fold_group,
    merged_moments,
    part_bounds,
    pivot_stands,
    rounded_mean,
    shifted_sums,
)
from .refcounts import borrowed, keep_alive
from .simd import (
    apply_channel_windows,
    apply_channels,
    apply_run,
    channel_lanes,
    fence_streams,
    window_table,
    window_widths,
)


@numba.njit(inline="always")
def slab_moments(x, start, length, stats, sum_type, eps):
    """``(mean_hi, mean_lo, rstd)`` of the contiguous slab ``x[start : start + length]``, its
    moments summed in the type of ``sum_type`` about its first value; ``stats`` is (1, 3) scratch."""
    ref = np.float64(x[start])
    stats[0] = 0.0
    contiguous_moments(x, start, start + length, ref, stats, 0, sum_type)
    mean_hi, mean_lo, _, rstd = finalize_group(ref, stats[0, 0], stats[0, 1], stats[0, 2], eps)
    return mean_hi, mean_lo, rstd


@numba.njit(inline="always")
def uniform_affine(weight, bias, first_channel, num_channels):
    """Whether channels ``first_channel, ...`` share one weight and one bias."""
    for channel in range(first_channel + 1, first_channel + num_channels):
        if weight[channel] != weight[first_channel] or bias[channel] != bias[first_channel]:
            return False
    return True


@cached_njit()
def normalize_rows(x, out, start, spatial, first_channel, num_channels, mean_hi, mean_lo, rstd,
                   weight, bias, coefficients):  # fmt: skip
    """Normalize a group's ``num_channels`` channels of ``spatial`` values (at most
    ``APPLY_CHUNK``) from flat ``start``, the last first; ``first_channel`` indexes ``weight`` and
    ``bias``, ``coefficients`` is ``(3, num_channels)`` scratch of x's dtype, the rest is
    ``moments.finalize_group``'s.

    The coefficients are folded first (``moments.fold_group``), then each channel is a row of a 2-D view:
    with channels of a few dozen values the per-channel overhead is half the cost, and that is the
    cheapest loop Numba makes. Compiled on its own: inlined, it slowed the callers' other paths.
    (Merging runs of equal rows inside the loop stopped LLVM vectorizing it: callers check
    ``uniform_affine`` first.)
    """
    fold_group(coefficients, 0, first_channel, num_channels, mean_hi, mean_lo, rstd, weight, bias)
    rows = x[start : start + num_channels * spatial].reshape((num_channels, spatial))
    for k in range(num_channels - 1, -1, -1):
        center = coefficients[0, k]
        scale = coefficients[1, k]
        shift = coefficients[2, k]
        source = rows[k]
        row_start = start + k * spatial
        target = destination(source, out, row_start, row_start + spatial)
        for i in range(spatial):
            target[i] = (source[i] - center) * scale + shift


@numba.njit(inline="always")
def against_coefficients(mean_hi, mean_lo, rstd, x):
    """``(center, rstd, offset)`` in x's dtype for ``((x - center) * rstd - offset)``: ``center``
    is the mean rounded to x's dtype, ``offset`` the rounding residual times ``rstd``."""
    center, residual = rounded_mean(mean_hi, mean_lo, x)
    return center, cast_like(rstd, x), cast_like(residual * rstd, x)


@numba.njit(inline="always")
def normalize_against(x, out, start, length, mean_hi, mean_lo, rstd, scales, shifts):
    """Normalize ``length`` values from ``x[start]`` with per-value ``scales`` and ``shifts`` (a
    group's weights and biases, one per value): one flat loop, ``((x - center) * rstd - offset) *
    scale + shift``, where ``offset`` is the mean's rounding residual times ``rstd`` (the fold of
    ``fold_channel``, written out per value)."""
    center, typed_rstd, offset = against_coefficients(mean_hi, mean_lo, rstd, x)
    source = x[start : start + length]
    target = destination(source, out, start, start + length)
    for i in range(length):
        target[i] = ((source[i] - center) * typed_rstd - offset) * scales[i] + shifts[i]


@cached_njit(fastmath={"contract"})
def normalize_pair_against(x, out, start, other_start, length, mean_hi, mean_lo, rstd, other_hi,
                           other_lo, other_rstd, scales, shifts):  # fmt: skip
    """``normalize_against`` for two runs of ``length`` values at once, each with its own moments,
    sharing each load of ``scales`` and ``shifts``.

    Compiled on its own with ``contract``, which makes the five operations a value three (two
    fma, one rounding each) in this loop only: the moments of the kernel that calls it keep IEEE
    semantics. A call per pair of slabs costs nothing next to its thousands of values (a call per
    short slab did: ``normalize_against`` stays inline).
    """
    center, typed_rstd, offset = against_coefficients(mean_hi, mean_lo, rstd, x)
    other_center, other_typed_rstd, other_offset = against_coefficients(other_hi, other_lo,
                                                                        other_rstd, x)  # fmt: skip
    source = x[start : start + length]
    other_source = x[other_start : other_start + length]
    target = destination(source, out, start, start + length)
    other_target = destination(other_source, out, other_start, other_start + length)
    for i in range(length):
        scale = scales[i]
        shift = shifts[i]
        target[i] = ((source[i] - center) * typed_rstd - offset) * scale + shift
        other_target[i] = (
            (other_source[i] - other_center) * other_typed_rstd - other_offset
        ) * scale + shift


@numba.njit(inline="always")
def normalize_values(x, out, start, first_channel, num_channels, mean_hi, mean_lo, rstd, weight,
                     bias):  # fmt: skip
    """Normalize a group of channels of one value each (no spatial dimensions) against its slices
    of ``weight`` and ``bias`` (a loop per channel of one value cost 30-110 ns a group)."""
    last = first_channel + num_channels
    normalize_against(x, out, start, num_channels, mean_hi, mean_lo, rstd,
                      weight[first_channel:last], bias[first_channel:last])  # fmt: skip


#: Groups of at least this many channels of at most ``APPLY_CHUNK`` values normalize them as rows
#: of a 2-D view (see ``normalize_rows``); making the view costs more than it saves on fewer.
ROWS_MIN_CHANNELS = 8


@numba.njit(inline="always")
def normalize_segment(x, out, slab_start, slab_length, channel, mean_hi, mean_lo, rstd, weight,
                      bias):  # fmt: skip
    """Normalize a whole slab whose channels all have ``channel``'s weight and bias (see
    ``uniform_affine``): one segment, one loop."""
    center, scale, shift = fold_channel(mean_hi, mean_lo, rstd, weight[channel], bias[channel], x)
    apply_run(x, out, slab_start, slab_start + slab_length, center, scale, shift)


#: Channels of at least a vector and at most this many values are normalized by
#: ``simd.apply_channels``; Numba's loop is as fast on longer ones (784 values: 16.7 against 18.0 us
#: for (1, 256, 28, 28)/32 on one thread) and handles the shorter ones.
SHORT_CHANNEL = 256

#: Channels of 2 to this many values, in groups of whole windows, are normalized by
#: ``simd.apply_channel_windows``. One value a channel is a flat loop against the weights already
#: (``normalize_values``): windows of single vectors took 1.6-2.0x its time. Longer channels lose
#: more to the permutes and the larger table than they save on each channel's setup: in place,
#: two threads, against the paths before windows: (16, 2048, 7, 7)/32 0.68-0.70 of the time,
#: (8, 1024, 3, 3)/32 0.66-0.72, but (4, 512, 16, 16)/32 float32 1.09-1.11 and (2, 64, 10, 10)/4
#: 1.15-1.22.
WINDOW_MAX_SPATIAL = 64


@register_jitable
def windows_fit(lanes, channels_per_group, spatial):
    """Whether a group's channels go through ``simd.apply_channel_windows`` on a host whose
    windows are ``lanes`` channels (0: none): whole windows of channels of 2 to
    ``WINDOW_MAX_SPATIAL`` values."""
    return lanes > 0 and channels_per_group % lanes == 0 and 1 < spatial <= WINDOW_MAX_SPATIAL


@numba.njit(inline="always")
def fitting_windows(wide, narrow, channels_per_group, spatial):
    """``(lanes, table)``: the first of the window widths ``wide`` and ``narrow`` (0: none) whose
    windows fit a group (``windows_fit``), 0 if neither, and its ``simd.window_table`` (of one
    entry without windows)."""
    lanes = wide if windows_fit(wide, channels_per_group, spatial) else 0
    if lanes == 0 and windows_fit(narrow, channels_per_group, spatial):
        lanes = narrow
    return lanes, window_table(spatial if lanes else 1, max(lanes, 1))


#: Slabs of at most this many values take ``normalize_short_slabs``.
SHORT_SLAB = 256

#: Short slabs whose moments are summed, then finished, then applied together.
SHORT_BATCH = 64


@cached_njit()
def normalize_windows(x, out, start, num_channels, spatial, mean_hi, mean_lo, rstd, weight, bias,
                      first_channel, table, lanes):  # fmt: skip
    """``simd.apply_channel_windows``, compiled on its own: inlined into
    ``normalize_short_slabs``, it slowed that kernel's other paths (one value a channel: 36-43 us
    became 62-69 for (64, 512)/32 float32 on one thread), so it is a call in both slab kernels."""
    apply_channel_windows(x, out, start, num_channels, spatial, mean_hi, mean_lo, rstd, weight,
                          bias, first_channel, table, lanes)  # fmt: skip


@cached_njit()
def normalize_short_slabs(x, out, first_slab, stop_slab, channels, spatial, num_groups, weight,
                          bias, eps):  # fmt: skip
    """``normalize_slabs`` for slabs of at most ``SHORT_SLAB`` values, ``SHORT_BATCH`` at a time.

    A short slab's cost is the chain from its sums through two divisions and a square root to its
    coefficients (~50 ns a slab one after the other). Batched, the chains of different slabs
    overlap: each slab's float64 shifted sums about its first value, then every slab's mean and
    ``rstd``, then the normalization (by channel windows where they fit, else a loop per channel).

    A slab whose first value lies more than ``sqrt(REPIVOT)`` standard deviations from its mean
    is summed again by ``moments.contiguous_moments`` (in float64), which moves the pivot to the
    mean: the rounding error of ``s2`` grows with that distance, and that value's own output
    multiplies it by as much again (float64 outputs 2e-12 off with a first value 32 standard
    deviations out, against 1e-14). NaN and Inf make the slab's output NaN.
    """
    channels_per_group = channels // num_groups
    slab_length = channels_per_group * spatial
    # Per slab of a batch: its sums (s1, s2), then its (mean_hi, mean_lo, rstd). One allocation:
    # a tiny call's three took a seventh of its kernel time.
    scratch_memory = np.empty((min(SHORT_BATCH, stop_slab - first_slab), 3))
    # Half-vector windows too (8 float32 channels with AVX-512): a short slab's channels of a few
    # values cost their loop setup each, where long slabs have the weight patterns instead.
    wide, narrow = window_widths(x)
    lanes, table_memory = fitting_windows(wide, narrow, channels_per_group, spatial)
    # No reference counts in the loops: see refcounts.
    x = borrowed(x)
    out = borrowed(out)
    weight = borrowed(weight)
    bias = borrowed(bias)
    scratch = borrowed(scratch_memory)
    table = borrowed(table_memory)
    for batch_start in range(first_slab, stop_slab, SHORT_BATCH):
        batch = min(SHORT_BATCH, stop_slab - batch_start)
        for i in range(batch):
            start = (batch_start + i) * slab_length
            s1, s2 = shifted_sums(x[start : start + slab_length], np.float64(x[start]))
            scratch[i, 0] = s1
            scratch[i, 1] = s2
        for i in range(batch):
            slab_start = (batch_start + i) * slab_length
            ref = np.float64(x[slab_start])
            s1 = scratch[i, 0]
            s2 = scratch[i, 1]
            if pivot_stands(slab_length, s1, s2):
                offset = s1 / slab_length
                m2 = s2 - s1 * offset
            else:  # rare: the slab's first value lies far from its mean
                stats = np.zeros((1, 3))
                contiguous_moments(x, slab_start, slab_start + slab_length, ref, stats, 0, 0.0)
                offset = stats[0, 1]
                m2 = stats[0, 2]
            mean_hi, mean_lo, _, rstd = finalize_group(ref, slab_length, offset, m2, eps)
            scratch[i, 0] = mean_hi
            scratch[i, 1] = mean_lo
            scratch[i, 2] = rstd
        for i in range(batch):
            slab = batch_start + i
            slab_start = slab * slab_length
            mean_hi = scratch[i, 0]
            mean_lo = scratch[i, 1]
            rstd = scratch[i, 2]
            first_channel = (slab % num_groups) * channels_per_group
            if lanes:
                normalize_windows(x, out, slab_start, channels_per_group, spatial, mean_hi,
                                  mean_lo, rstd, weight, bias, first_channel, table,
                                  lanes)  # fmt: skip
                continue
            if spatial == 1:
                normalize_values(x, out, slab_start, first_channel, channels_per_group, mean_hi,
                                 mean_lo, rstd, weight, bias)  # fmt: skip
                continue
            for k in range(channels_per_group):
                channel = first_channel + k
                center, scale, shift = fold_channel(
                    mean_hi, mean_lo, rstd, weight[channel], bias[channel], x
                )
                apply_contiguous(x, out, slab_start + k * spatial, slab_start + (k + 1) * spatial,
                                 center, scale, shift)  # fmt: skip
    keep_alive((scratch_memory, table_memory))


@cached_njit()
def normalize_slabs(x, out, first_slab, stop_slab, channels, spatial, num_groups, weight, bias,
                    eps, sum_type):  # fmt: skip
    """Normalize slabs ``[first_slab, stop_slab)`` one after the other: each slab's moments, then
    its normalization while it is still in cache. Arguments as for ``_group_norm_fused``."""
    channels_per_group = channels // num_groups
    slab_length = channels_per_group * spatial
    if slab_length <= SHORT_SLAB:
        normalize_short_slabs(x, out, first_slab, stop_slab, channels, spatial, num_groups,
                              weight, bias, eps)  # fmt: skip
        return
    stats_memory = np.empty((1, 3))
    coefficients_memory = np.empty((3, channels_per_group), x.dtype)
    # The whole vector's windows only: half a vector's lost to the weight patterns on long slabs.
    lanes, table_memory = fitting_windows(window_widths(x)[0], 0, channels_per_group, spatial)
    # No reference counts in the loop: see refcounts.
    x = borrowed(x)
    out = borrowed(out)
    weight = borrowed(weight)
    bias = borrowed(bias)
    stats = borrowed(stats_memory)
    coefficients = borrowed(coefficients_memory)
    table = borrowed(table_memory)
    for slab in range(first_slab, stop_slab):
        slab_start = slab * slab_length
        mean_hi, mean_lo, rstd = slab_moments(x, slab_start, slab_length, stats, sum_type, eps)
        first_channel = (slab % num_groups) * channels_per_group
        if uniform_affine(weight, bias, first_channel, channels_per_group):
            normalize_segment(x, out, slab_start, slab_length, first_channel, mean_hi, mean_lo,
                              rstd, weight, bias)  # fmt: skip
        else:
            normalize_channels(x, out, slab_start, spatial, first_channel, channels_per_group,
                               mean_hi, mean_lo, rstd, weight, bias, coefficients, table,
                               lanes)  # fmt: skip
    fence_streams(x, out)
    keep_alive((stats_memory, coefficients_memory, table_memory))


#: Out of place, the loop per channel takes a slab's channels in ascending order in slabs of at
#: most this many bytes: the prefetchers follow the output's reads for ownership (see ``simd``'s
#: notes), and the moments left the whole slab in L2 (1 MiB here) for either order. Larger slabs
#: go last channel first, to read their tail again from L2: (1, 32, 512, 512)/8 float32, 4 MiB
#: slabs, two threads, allocating, 2.03-2.25 ms last first against 2.13-2.49 first first in three
#: runs. Channels of at most ``SHORT_CHANNEL`` values (windows, ``simd.apply_channels``) always
#: go first first out of place: their slabs fit the L2 unless a group has thousands of them.
FORWARD_SLAB_BYTES = 512 << 10


@numba.njit(inline="always")
def forward_order(x, out, length):
    """Whether runs of ``length`` values that the moments just read go first run first: out of
    place (see ``simd``'s notes), save beyond ``FORWARD_SLAB_BYTES``, whose tail the moments left
    in L2; in place the last first."""
    return out is not None and length * x.itemsize <= FORWARD_SLAB_BYTES


@numba.njit(inline="always")
def normalize_pieces(x, out, slab_start, begin, end, spatial, first_channel, mean_hi, mean_lo,
                     rstd, weight, bias, forward):  # fmt: skip
    """Normalize values ``[begin, end)`` of a slab from flat ``slab_start`` a run per channel (or
    piece of one), each with its own fold, the first run first if ``forward`` (see
    ``forward_order``), else the last."""
    position = begin if forward else end
    while (position < end) if forward else (position > begin):
        if forward:
            run_start = position
            run_stop = min(end, (position // spatial + 1) * spatial)
        else:
            run_stop = position
            run_start = max(begin, ((position - 1) // spatial) * spatial)
        channel = first_channel + run_start // spatial
        center, scale, shift = fold_channel(mean_hi, mean_lo, rstd, weight[channel], bias[channel],
                                            x)  # fmt: skip
        apply_run(x, out, slab_start + run_start, slab_start + run_stop, center, scale, shift)
        position = run_stop if forward else run_start


@numba.njit(inline="always")
def normalize_channels(x, out, slab_start, spatial, first_channel, num_channels, mean_hi, mean_lo,
                       rstd, weight, bias, coefficients, table, lanes):  # fmt: skip
    """Normalize a slab's ``num_channels`` channels of ``spatial`` values from flat
    ``slab_start``, each with its own weight and bias: by windows (``lanes`` and ``table`` from
    ``fitting_windows``), as values, by ``simd.apply_channels``, as rows, or a channel at a time;
    ``coefficients`` is ``(3, num_channels)`` scratch of x's dtype, the rest as in
    ``normalize_slabs``."""
    if lanes:
        normalize_windows(x, out, slab_start, num_channels, spatial, mean_hi, mean_lo, rstd,
                          weight, bias, first_channel, table, lanes)  # fmt: skip
    elif spatial == 1:
        normalize_values(x, out, slab_start, first_channel, num_channels, mean_hi, mean_lo, rstd,
                         weight, bias)  # fmt: skip
    elif channel_lanes(x) <= spatial <= SHORT_CHANNEL:
        fold_group(coefficients, 0, first_channel, num_channels, mean_hi, mean_lo, rstd, weight,
                   bias)  # fmt: skip
        apply_channels(x, out, slab_start, num_channels, spatial, coefficients)
    elif out is None and num_channels >= ROWS_MIN_CHANNELS and spatial <= APPLY_CHUNK:
        # In place only: writing rows of a separate output measured slower than channels.
        normalize_rows(x, out, slab_start, spatial, first_channel, num_channels, mean_hi, mean_lo,
                       rstd, weight, bias, coefficients)  # fmt: skip
    else:
        normalize_pieces(x, out, slab_start, 0, num_channels * spatial, spatial, first_channel,
                         mean_hi, mean_lo, rstd, weight, bias,
                         forward_order(x, out, num_channels * spatial))  # fmt: skip


@cached_njit()
def normalize_slabs_patterned(x, out, first_item, stop_item, num_samples, channels, spatial,
                              num_groups, weight, bias, eps, sum_type):  # fmt: skip
    """``normalize_slabs`` for many short channels with their own weight and bias: items
    ``[first_item, stop_item)`` in group-major order (item ``g * N + n`` is slab ``n * G + g``).

    A group's weight and bias, spread over its slab (``spatial`` copies of each channel's), are
    built once and serve every sample of the group, so each slab is normalized by one flat loop
    (``normalize_against``) instead of a loop per channel of a few dozen values. Consecutive items
    of one group go in pairs, both slabs' moments first, then one loop over both
    (``normalize_pair_against``), which loads each value of the pattern once for two.
    """
    channels_per_group = channels // num_groups
    slab_length = channels_per_group * spatial
    stats_memory = np.empty((1, 3))
    scales_memory = aligned_full(slab_length, cast_like(0.0, x))
    shifts_memory = aligned_full(slab_length, cast_like(0.0, x))
    # No reference counts in the loop: see refcounts.
    x = borrowed(x)
    out = borrowed(out)
    weight = borrowed(weight)
    bias = borrowed(bias)
    stats = borrowed(stats_memory)
    scales = borrowed(scales_memory)
    shifts = borrowed(shifts_memory)
    scale_rows = scales.reshape((channels_per_group, spatial))
    shift_rows = shifts.reshape((channels_per_group, spatial))
    pattern_group = -1
    item = first_item
    while item < stop_item:
        group = item // num_samples
        paired = item + 1 < stop_item and (item + 1) // num_samples == group
        slab = (item - group * num_samples) * num_groups + group
        slab_start = slab * slab_length
        mean_hi, mean_lo, rstd = slab_moments(x, slab_start, slab_length, stats, sum_type, eps)
        first_channel = group * channels_per_group
        if uniform_affine(weight, bias, first_channel, channels_per_group):
            normalize_segment(x, out, slab_start, slab_length, first_channel, mean_hi, mean_lo,
                              rstd, weight, bias)  # fmt: skip
            item += 1
            continue
        if group != pattern_group:
            pattern_group = group
            for k in range(channels_per_group):
                scale_rows[k] = weight[first_channel + k]
                shift_rows[k] = bias[first_channel + k]
        if not paired:
            normalize_against(x, out, slab_start, slab_length, mean_hi, mean_lo, rstd, scales,
                              shifts)  # fmt: skip
            item += 1
            continue
        other_start = slab_start + num_groups * slab_length  # the next sample's slab
        other_hi, other_lo, other_rstd = slab_moments(x, other_start, slab_length, stats,
                                                      sum_type, eps)  # fmt: skip
        normalize_pair_against(x, out, slab_start, other_start, slab_length, mean_hi, mean_lo,
                               rstd, other_hi, other_lo, other_rstd, scales, shifts)  # fmt: skip
        item += 2
    fence_streams(x, out)  # after the slabs of one weight and bias (normalize_segment)
    keep_alive((stats_memory, scales_memory, shifts_memory))


def _group_norm_fused(normalize_slabs_at, x, out, num_samples, channels, spatial, num_groups,
                      weight, bias, eps, sum_type, num_chunks):  # fmt: skip
    """Normalize whole slabs, ``num_chunks`` runs of them in parallel (``normalize_slabs``, which
    serial calls run themselves: see ``_compile``).

    Parameters
    ----------
    normalize_slabs_at : int
        ``normalize_slabs``' address for these arguments (``_compile.compiled_address``).
    x : float32 or float64 array, shape (N * C * spatial,), C-contiguous
    out : array like ``x``, or None to normalize ``x`` in place
    weight, bias : arrays of x's dtype, shape (C,)
    sum_type : float32 or float64 scalar
        A zero of the type the moments are summed in (see ``moments``); Numba compiles one kernel
        per type.
    num_chunks : int
        Runs of slabs, at most N * num_groups: one per thread.
    """
    num_slabs = num_samples * num_groups
    for chunk in numba.prange(num_chunks):
        first_slab, stop_slab = chunk_bounds(num_slabs, num_chunks, chunk)
        call_compiled(normalize_slabs_at, (x, out, first_slab, stop_slab, channels, spatial,
                                           num_groups, weight, bias, eps, sum_type))  # fmt: skip


group_norm_fused = cached_njit(parallel=True)(_group_norm_fused)


def _group_norm_patterned(normalize_at, x, out, num_samples, channels, spatial, num_groups,
                          weight, bias, eps, sum_type, num_chunks):  # fmt: skip
    """``_group_norm_fused`` through ``normalize_slabs_patterned`` (at ``normalize_at``), over
    ``num_chunks`` runs of (sample, group) items in group-major order (see
    ``_schedule.channel_patterns``). A kernel of its own, so that only the calls that use it
    compile it."""
    num_items = num_samples * num_groups
    for chunk in numba.prange(num_chunks):
        first_item, stop_item = chunk_bounds(num_items, num_chunks, chunk)
        call_compiled(normalize_at, (x, out, first_item, stop_item, num_samples, channels, spatial,
                                     num_groups, weight, bias, eps, sum_type))  # fmt: skip


group_norm_patterned = cached_njit(parallel=True)(_group_norm_patterned)


@cached_njit()
def part_moments(x, slab_length, num_parts, item, ref, partial, sum_type):
    """Write the moments of part ``item % num_parts`` of slab ``item // num_parts`` to
    ``partial[item]``."""
    slab_start = (item // num_parts) * slab_length
    start, stop = part_bounds(slab_length, num_parts, item % num_parts)
    # No reference counts in the loop: see refcounts.
    x = borrowed(x)
    partial = borrowed(partial)
    partial[item] = 0.0
    contiguous_moments(x, slab_start + start, slab_start + stop, ref, partial, item, sum_type)


@cached_njit()
def split_scratch(x, num_slabs, slab_length, num_parts):
    """``partial`` (uninitialized) and ``refs`` (each slab's first element) for ``num_parts``
    pieces of each of ``num_slabs`` slabs; see ``_partial_moments``.

    Compiled on its own: inside a parallel function, ``np.zeros`` or a row copy would each be a
    parallel loop of their own, another launch.
    """
    partial = np.empty((num_slabs * num_parts, 3))
    refs = np.empty(num_slabs)
    for slab in range(num_slabs):
        refs[slab] = x[slab * slab_length]
    return partial, refs


def _partial_moments(part_moments_at, x, num_samples, channels, spatial, num_groups, num_parts,
                     sum_type):  # fmt: skip
    """Moments of ``num_parts`` pieces of every slab (``part_moments``, at ``part_moments_at``: see
    ``part_moments_address``), for when slabs are fewer than threads.

    Returns
    -------
    partial : float64 array, shape (N * num_groups * num_parts, 3)
        ``(count, offset, m2)`` of each piece, offsets about the slab's first element.
    refs : float64 array, shape (N * num_groups,)
        The slab's first element, the reference of its offsets.
    """
    slab_length = (channels // num_groups) * spatial
    partial, refs = split_scratch(x, num_samples * num_groups, slab_length, num_parts)
    for item in numba.prange(num_samples * num_groups * num_parts):
        call_compiled(part_moments_at, (x, slab_length, num_parts, item, refs[item // num_parts],
                                        partial, sum_type))  # fmt: skip
    return partial, refs


partial_moments, partial_moments_serial = parallel_and_serial(_partial_moments)


@cached_njit()
def apply_part(x, out, partial, refs, channels, spatial, num_groups, num_parts, item, weight, bias,
               eps):  # fmt: skip
    """Normalize part ``item % num_parts`` of slab ``item // num_parts`` with the slab's moments
    merged from ``partial``: the channels (or windows of channels) wholly inside the part as
    ``normalize_slabs`` does (``normalize_channels``), the pieces of channels at its ends a run
    each (``normalize_pieces``), in the order of ``forward_order``.

    A loop of runs alone spent more on each short channel's setup than on its values: one group of
    (1, 2560, 8, 8) float32 in two parts took 23 us against 16 us serially (two threads, in place).
    """
    slab = item // num_parts
    channels_per_group = channels // num_groups
    slab_length = channels_per_group * spatial
    stats_memory = np.empty((1, 3))
    coefficients_memory = np.empty((3, channels_per_group), x.dtype)
    lanes, table_memory = fitting_windows(window_widths(x)[0], 0, channels_per_group, spatial)
    # No reference counts in the loop: see refcounts.
    x = borrowed(x)
    out = borrowed(out)
    partial = borrowed(partial)
    refs = borrowed(refs)
    weight = borrowed(weight)
    bias = borrowed(bias)
    stats = borrowed(stats_memory)
    coefficients = borrowed(coefficients_memory)
    table = borrowed(table_memory)
    mean_hi, mean_lo, rstd = merged_moments(partial, refs, num_parts, slab, eps, stats)
    first_channel = (slab % num_groups) * channels_per_group
    slab_start = slab * slab_length
    start, stop = part_bounds(slab_length, num_parts, item % num_parts)
    if uniform_affine(weight, bias, first_channel, channels_per_group):
        normalize_segment(x, out, slab_start + start, stop - start, first_channel, mean_hi,
                          mean_lo, rstd, weight, bias)  # fmt: skip
    else:
        # Whole windows where the group's channels go by windows, else whole channels.
        step = max(lanes, 1) * spatial
        whole_start = min(stop, -(-start // step) * step)
        whole_stop = max(whole_start, (stop // step) * step)
        forward = forward_order(x, out, stop - start)
        first_piece, last_piece = (start, whole_start), (whole_stop, stop)
        if not forward:
            first_piece, last_piece = last_piece, first_piece
        normalize_pieces(x, out, slab_start, first_piece[0], first_piece[1], spatial,
                         first_channel, mean_hi, mean_lo, rstd, weight, bias, forward)  # fmt: skip
        if whole_start < whole_stop:
            normalize_channels(x, out, slab_start + whole_start, spatial,
                               first_channel + whole_start // spatial,
                               (whole_stop - whole_start) // spatial, mean_hi, mean_lo, rstd,
                               weight, bias, coefficients, table, lanes)  # fmt: skip
        normalize_pieces(x, out, slab_start, last_piece[0], last_piece[1], spatial,
                         first_channel, mean_hi, mean_lo, rstd, weight, bias, forward)  # fmt: skip
    fence_streams(x, out)
    keep_alive((stats_memory, coefficients_memory, table_memory))


def _group_norm_split(part_moments_at, apply_part_at, x, out, num_samples, channels, spatial,
                      num_groups, weight, bias, eps, sum_type, num_parts):  # fmt: skip
    """Normalize every slab in ``num_parts`` pieces: the pieces' moments in one parallel loop
    (``part_moments``), then each piece, with its slab's merged moments, in a second one
    (``apply_part``); their addresses from ``split_addresses``. For slabs fewer than threads;
    arguments as for ``_group_norm_fused``. One call, two launches."""
    slab_length = (channels // num_groups) * spatial
    partial, refs = split_scratch(x, num_samples * num_groups, slab_length, num_parts)
    num_items = num_samples * num_groups * num_parts
    for item in numba.prange(num_items):
        call_compiled(part_moments_at, (x, slab_length, num_parts, item, refs[item // num_parts],
                                        partial, sum_type))  # fmt: skip
    for item in numba.prange(num_items):
        call_compiled(apply_part_at, (x, out, partial, refs, channels, spatial, num_groups,
                                      num_parts, item, weight, bias, eps))  # fmt: skip


# Not fused into one loop: each piece needs the moments of all its unit's pieces. Numba sees no
# dependence between the loops, whose calls through addresses hide their array arguments.
group_norm_split = cached_njit(parallel={"fusion": False})(_group_norm_split)


@cached_njit()
def cooperative_scratch(x, num_slabs, slab_length, num_threads):
    """``(progress, partial, refs, started)`` for ``_group_norm_cooperative``: the counters of
    ``atomics.cooperative_counters`` and the scratch of ``split_scratch``. Compiled on its own,
    like ``split_scratch``."""
    partial, refs = split_scratch(x, num_slabs, slab_length, num_threads)
    progress, started = cooperative_counters(num_slabs, num_threads)
    return progress, partial, refs, started


@cached_njit()
def normalize_slabs_together(x, out, num_slabs, channels, spatial, num_groups, weight, bias, eps,
                             sum_type, thread, num_threads, progress, partial, refs,
                             started):  # fmt: skip
    """``thread``'s share of ``_group_norm_cooperative``: for each slab in turn, the moments of its
    part (``part_moments``), a wait for the other parts' moments, then the normalization of its
    part with the slab's merged moments (``apply_part``)."""
    slab_length = (channels // num_groups) * spatial
    # No reference counts in the loop: see refcounts.
    x = borrowed(x)
    out = borrowed(out)
    weight = borrowed(weight)
    bias = borrowed(bias)
    progress = borrowed(progress)
    partial = borrowed(partial)
    refs = borrowed(refs)
    started = borrowed(started)
    atomic_add(started, thread, 1)
    for slab in range(num_slabs):
        slots = slab * (1 + 2 * num_threads)  # moments done, then a claim per part and phase
        for i in range(num_threads):
            part = (thread + i) % num_threads
            if claim(progress, started, slots + 1 + part, part, thread, num_threads):
                part_moments(x, slab_length, num_threads, slab * num_threads + part, refs[slab],
                             partial, sum_type)  # fmt: skip
                atomic_add(progress, slots, 1)
        wait_for(progress, slots, num_threads)
        for i in range(num_threads):
            part = (thread + i) % num_threads
            if claim(progress, started, slots + 1 + num_threads + part, part, thread,
                     num_threads):  # fmt: skip
                apply_part(x, out, partial, refs, channels, spatial, num_groups, num_threads,
                           slab * num_threads + part, weight, bias, eps)  # fmt: skip


def _group_norm_cooperative(together_at, x, out, num_samples, channels, spatial, num_groups,
                            weight, bias, eps, sum_type, num_threads):  # fmt: skip
    """Normalize the slabs one after the other, each by all ``num_threads`` threads together, a
    part each (``normalize_slabs_together``, at ``together_at``: see ``cooperative_address``);
    arguments as for ``_group_norm_fused``. For slabs larger than a core's L2 (a thread's part is
    read again from its own L2), and for slabs fewer than threads, too small to split. One launch;
    the threads wait for each other once a slab, on atomic counters."""
    num_slabs = num_samples * num_groups
    slab_length = (channels // num_groups) * spatial
    progress, partial, refs, started = cooperative_scratch(x, num_slabs, slab_length, num_threads)
    for thread in numba.prange(num_threads):
        call_compiled(together_at, (x, out, num_slabs, channels, spatial, num_groups, weight, bias,
                                    eps, sum_type, thread, num_threads, progress, partial, refs,
                                    started))  # fmt: skip


group_norm_cooperative = cached_njit(parallel=True)(_group_norm_cooperative)


# The addresses of what the split and cooperative kernels call (see ``_compile.PARTIAL``).
def part_moments_address(x, sum_type):
    """``part_moments``' address for ``_partial_moments`` and ``_group_norm_split``."""
    return compiled_address(part_moments, (x, 0, 0, 0, 0.0, PARTIAL, sum_type))


def split_addresses(x, out, sum_type):
    """``(part_moments, apply_part)``'s addresses for ``_group_norm_split``."""
    return part_moments_address(x, sum_type), _compile.apply_part_address(apply_part, x, out)


def cooperative_address(x, out, sum_type):
    """``normalize_slabs_together``'s address for ``_group_norm_cooperative``."""
    return _compile.together_address(normalize_slabs_together, x, out, sum_type)
