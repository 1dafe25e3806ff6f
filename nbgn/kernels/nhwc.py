"""Channels-last kernels: ``x`` is the flat C-contiguous buffer of an ``(N, spatial, C)`` array.

The groups of a sample interleave along the contiguous channel axis, so the kernels walk a sample's
positions in *rows* of ``lane_positions(C)`` positions (``width = positions * C`` values) and keep
one accumulator per *lane* (a column of rows): the inner loop runs along contiguous memory and
vectorizes even for three channels. Every lane of a group shares the group's pivot, so lanes add up
into group sums without a merge. A *block* of rows is summed in the input's precision, then its lane
sums are added up per channel and per group in float64 and merged with Chan's formula, with the
same checks as ``moments.contiguous_moments``. Where the shortest row of whole vectors (lcm(C, 16)
float32 values with AVX-512) is short enough (128 values: C = 3, 16, 48, 128, ...), the rows go one
after the other and their lane sums stay in registers (``simd.lane_sums_in_registers``);
otherwise in sweeps of four rows.

Bytes moved per element: the moments pass reads a sample once and the normalization reads it again in
reverse (from L2/L3 when a sample fits there) and writes it: ``2b`` to ``3b`` per element. The
normalization's rows start on a 64-byte boundary of ``x`` (its lanes rotated to match), since a
512-bit load across two cache lines costs two. With one group, a sample's moments are one
contiguous run (``moments.contiguous_moments``). Out of place, where input and output together
fill three quarters of the L3 (``simd.streams``), the rows start on the output's 64-byte lines
instead and are stored past the caches (``simd.apply_streamed_rows``): ``2b`` to and from memory
where ordinary stores would read each output line first; each thread ends with
``simd.fence_streams``.

Work is split into ``num_chunks`` contiguous runs of samples, one per thread, so that each thread
allocates its scratch once rather than once per sample; samples of at most ``SMALL_SAMPLE`` values
are normalized row by row, without lanes, by a kernel of their own (``group_norm_small``). In place,
samples larger than a core's L2 go one after the other, each by all threads together
(``group_norm_cooperative``); so do samples fewer than threads and too small to split
(``_schedule.MIN_COOPERATIVE_PART_BYTES``), in place or not.
Parallel loops only call functions compiled on their own (``normalize_samples``,
``normalize_small_samples``, ``part_moments``, ``apply_part``, ``normalize_samples_together``), and
call them through their addresses (``_compile.call_compiled``; the ``*_at`` arguments, as
``split_addresses`` and ``cooperative_address`` find them): the same code inlined into a ``prange``
body ran at half the speed, and linked into it took seconds more to compile.
"""

import numba
import numpy as np
from numba.extending import overload

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
    REDUCTION_FASTMATH,
    aligned_full,
    cast_like,
    chunk_bounds,
    contiguous_moments,
    destination,
    finalize_group,
    finalize_rows,
    fold_group,
    merge_shifted_sums,
    merged_group_coefficients,
    part_bounds,
    pivot_stands,
    written,
)
from .refcounts import borrowed, keep_alive
from .simd import (
    MAX_GROUP_VECTORS,
    SPILL_ROWS,
    apply_group_rows,
    apply_rows,
    apply_streamed_rows,
    channel_lanes,
    fence_streams,
    float64_run_sums,
    folded_lane_sums,
    l1_data_bytes,
    lane_fold,
    lane_sums_in_registers,
    registers_hold_rows,
    row_limits,
    streamed_rows_skew,
)

#: Lanes per row to aim for: enough for several 512-bit vectors when there are few channels, and
#: long rows, so that a block (``SWEEPS_PER_BLOCK`` sweeps of four rows) holds many values for its
#: fixed cost (per group: sums, pivot check, merge). A 512 KiB float32 sample in L2, C = 128, 32
#: groups, one thread: moments 4.6 us with 256 lanes, 3.8 with 512, 4.2 with 1024.
MIN_LANES = 512

#: Samples of at most this many values go through ``normalize_small_samples``, without lanes: the
#: lanes' fixed cost per sample, about a microsecond, is more than such a sample's whole work.
SMALL_SAMPLE = 1024

#: Values per row of a small sample, at least (whole positions): rows of one position of a few
#: channels pay a loop's setup for every position. Measured on samples of 3 to 64 channels; longer
#: rows cost more per sample (lane bookkeeping) than they save.
SMALL_ROW = 12

#: Runs of fewer values are added in order, inline (``group_total``); longer ones go through
#: ``float64_sum`` (vectorized, a call).
FEW_CHANNELS = 16

#: Sweeps (of four rows) per block: each lane adds 32 sums of four values before the flush to
#: float64, about as precise as ``moments.BLOCK``; the flush (~4 operations a lane) costs ~3%.
SWEEPS_PER_BLOCK = 32

#: Rows per block where the lane sums stay in registers: each lane adds 32 sums of at most
#: ``simd.SPILL_ROWS`` (32) values before the flush, some 64 roundings deep, as ``moments.BLOCK``'s
#: runs are (the sweeps' lanes, 32 sums of four values, some 34).
REGISTER_BLOCK_ROWS = 32 * SPILL_ROWS


@numba.njit(inline="always")
def lane_positions(channels, positions):
    """Positions per row: enough for ``MIN_LANES`` values per row, in whole 64-byte vectors of
    float32 where the channel count allows (16 lanes: no scalar remainder), but no more than there
    are."""
    step = 16 // np.gcd(channels, 16)
    wanted = -(-MIN_LANES // channels)
    return max(1, min(-(-wanted // step) * step, positions))


@numba.njit(inline="always")
def lane_scratch(positions, channels, num_groups, sum_type):
    """Scratch for ``sample_moments`` and ``apply_positions`` on ranges of up to ``positions``:
    ``(lane_space, wide)``, in the type of ``sum_type`` and float64 (see ``sample_moments``);
    ``lane_space`` with ``STAGGER_ROOM`` to spare, for ``staggered`` views.

    Separate arrays, carved into views where they are used: a named tuple of such arrays read freed
    memory under Numba 0.68.
    """
    lane_space = lane_space_for(positions, channels, num_groups, sum_type)
    wide = np.empty(2 * channels + 4 * num_groups)
    return lane_space, wide


@numba.njit(inline="always")
def lane_space_for(positions, channels, num_groups, fill):
    """Lanes for ranges of up to ``positions``, of ``fill``'s type, 64-byte aligned: three rows of
    them (pivots and sums; or centers, scales and shifts), one value a group (pivots; or centers),
    and ``STAGGER_ROOM`` to spare for ``staggered`` views."""
    width = lane_positions(channels, positions) * channels
    return aligned_full(3 * width + num_groups + STAGGER_ROOM, fill)


#: Values a lane scratch has to spare for ``staggered``: a page (4 KiB) of float32, two of float64.
STAGGER_ROOM = 1024

#: How far past the values stored ``staggered`` puts the scratch, modulo a page (see there).
STAGGER_BYTES = 512


@numba.njit(inline="always")
def staggered(space, target, start):
    """The view of ``space`` (64-byte aligned, ``STAGGER_ROOM`` values to spare) whose first value
    lies ``STAGGER_BYTES`` past ``target[start]``, modulo a page (4 KiB), rounded down to a 64-byte
    boundary (449 to 512 bytes past).

    A load whose address matches an earlier store's in its low 12 bits waits as if it depended on
    it (4K aliasing). The kernels store to ``target`` from ``start`` on while they load lane sums
    or coefficients from ``space``: with the scratch 64-128 bytes below the rows modulo 4 KiB, the
    group rows of C = 2048 float32 took 1.2-1.5 times as long (in L2, one thread), and (16, 7, 7,
    2048)/32 in place 1.3 times, at 2 of 32 placements of x in a page. Rows of lanes that do not
    stay in registers are whole KiB long (at least 512 float32 values), so rows of x and of the
    scratch lie whole KiB apart from their first ones: 512 bytes on keeps each clear of the others.
    At 2 KiB on, rows of 2 KiB met at the same offset, and C = 512's moments took 5% longer.
    """
    page = 4096
    wanted = (target.ctypes.data + start * target.itemsize + STAGGER_BYTES) % page
    skip = (wanted - space.ctypes.data % page) % page // 64 * 64 // space.itemsize
    return space[skip : skip + space.size - STAGGER_ROOM]


@cached_njit()
def register_lane_sums(x, start, rows, row_vectors, lanes):
    """``simd.lane_sums_in_registers``, compiled on its own, without ``lane_sums``' fastmath (which
    Numba applies to every instruction of a function): reassociation would allow the sums of
    ``x - pivot`` to become a sum of ``x`` minus a multiple of the pivot, the very cancellation the
    pivot is there to prevent (LLVM was not seen to do it; nothing would stop it)."""
    lane_sums_in_registers(x, start, rows, row_vectors, lanes)


@cached_njit()
def register_folded_sums(x, start, stream_stride, rows, width, fold, lanes):
    """``simd.folded_lane_sums``, compiled on its own without fastmath, as ``register_lane_sums``."""
    folded_lane_sums(x, start, stream_stride, rows, width, fold, lanes)


@numba.njit(inline="always")
def lane_count(width, fold):
    """Lanes that rows of ``width`` values add into: one per value, or one per ``fold`` vectors
    (``simd.folded_lane_sums``)."""
    return width // fold if fold > 0 else width


@cached_njit(fastmath=REDUCTION_FASTMATH)
def lane_sums(x, start, width, stream_stride, rows, lanes, fold):
    """Add ``x - pivot`` and its square per lane to ``lanes[1]`` and ``lanes[2]``, in their type,
    about ``lanes[0]``, over ``rows`` rows of ``width`` values from ``x[start]``; with a positive
    ``stream_stride``, each of those rows together with the rows ``stream_stride``, 2 and 3 times
    ``stream_stride`` further (a *sweep*).

    Four rows from four distant places are four long sequential streams that the hardware
    prefetchers follow (four adjacent rows would be four streams of a few lines each, which they do
    not), and they share each load and store of the lane sums. Consecutive rows (no
    ``stream_stride``) of whole vectors short enough go through ``simd.lane_sums_in_registers``.
    A positive ``fold`` adds that many vectors of a group into each vector of lanes
    (``simd.folded_lane_sums``; ``width / fold`` lanes).
    """
    lanes_used = lane_count(width, fold)
    pivot, s1, s2 = lanes[0, :lanes_used], lanes[1, :lanes_used], lanes[2, :lanes_used]
    if fold > 0:
        register_folded_sums(x, start, stream_stride, rows, width, fold, lanes)
    elif stream_stride == 0 and registers_hold_rows(x, lanes, width):
        register_lane_sums(x, start, rows, width // channel_lanes(x), lanes)
    elif stream_stride > 0:
        for r in range(rows):
            base = start + r * width
            row0 = x[base : base + width]
            row1 = x[base + stream_stride : base + stream_stride + width]
            row2 = x[base + 2 * stream_stride : base + 2 * stream_stride + width]
            row3 = x[base + 3 * stream_stride : base + 3 * stream_stride + width]
            for j in range(width):
                p = pivot[j]
                d0 = row0[j] - p
                d1 = row1[j] - p
                d2 = row2[j] - p
                d3 = row3[j] - p
                s1[j] += (d0 + d1) + (d2 + d3)
                s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    else:
        for r in range(rows):
            row = x[start + r * width : start + (r + 1) * width]
            for j in range(width):
                d = row[j] - pivot[j]
                s1[j] += d
                s2[j] += d * d


@cached_njit(fastmath=REDUCTION_FASTMATH)
def float64_sum(values):
    """The sum of ``values`` in float64, in any order: vectorized, where a sum in order is a chain
    of dependent additions (at C = 2048, a sample's 64 of them per group and sum took 3 us)."""
    total = 0.0
    for i in range(values.size):
        total += np.float64(values[i])
    return total


@numba.njit(inline="always")
def group_total(values):
    """The float64 sum of a group's values (one per channel): inline and in order for fewer than
    ``FEW_CHANNELS``, where a call would cost more than the additions, else ``float64_sum``."""
    if values.size >= FEW_CHANNELS:
        return float64_sum(values)
    total = 0.0
    for i in range(values.size):
        total += np.float64(values[i])
    return total


@numba.njit(inline="always")
def group_sums(lanes, width, channel_sums, sums):
    """Add the lane sums (``lanes[1:3, :width]``) up per channel, whole rows of contiguous vector
    adds, then per group (contiguous channels), in float64, into ``sums[:, 0:2]``."""
    channels = channel_sums.shape[1]
    channels_per_group = channels // sums.shape[0]
    for c in range(channels):
        channel_sums[0, c] = lanes[1, c]
        channel_sums[1, c] = lanes[2, c]
    for row_start in range(channels, width, channels):
        for c in range(channels):
            channel_sums[0, c] += np.float64(lanes[1, row_start + c])
            channel_sums[1, c] += np.float64(lanes[2, row_start + c])
    for g in range(sums.shape[0]):
        first = g * channels_per_group
        sums[g, 0] = group_total(channel_sums[0, first : first + channels_per_group])
        sums[g, 1] = group_total(channel_sums[1, first : first + channels_per_group])


@numba.njit(inline="always")
def expand_pivots(group_pivot, channels, lanes):
    """Set every lane's pivot (``lanes[0]``) to its group's: lane ``j`` holds channel ``j % C``,
    so each row of ``C`` lanes is the groups' pivots, each repeated over its channels."""
    channels_per_group = channels // group_pivot.size
    for row_start in range(0, lanes.shape[1], channels):
        for g in range(group_pivot.size):
            first = row_start + g * channels_per_group
            lanes[0, first : first + channels_per_group] = group_pivot[g]


@numba.njit(inline="always")
def repivot(group_pivot, sums, count):
    """Move the pivot of every group whose pivot did not stand to its block mean; True if any."""
    moved = False
    for g in range(group_pivot.size):
        if not pivot_stands(count, sums[g, 0], sums[g, 1]):
            moved = True
            shifted = np.float64(group_pivot[g]) + sums[g, 0] / count
            group_pivot[g] = cast_like(shifted, group_pivot)
    return moved


@cached_njit()
def block_group_sums(x, start, width, stream_stride, rows, tail_start, tail_rows, count, lanes,
                     channel_sums, group_pivot, sums, fold):  # fmt: skip
    """Group sums ``sums[:, 0:2]`` of one block (and its ``tail_rows`` positions from
    ``tail_start``) about ``group_pivot`` (expanded in ``lanes[0]``), in the type of ``lanes``;
    summed again, once, about the block's means where a pivot did not stand (the moved pivots stay
    for the next blocks). ``fold`` as for ``lane_sums``."""
    channels = channel_sums.shape[1]
    lane_channels = lane_count(channels, fold)
    for attempt in range(2):
        # Cleared here, not by a flag of lane_sums, and np.intp(0), not 0: Numba compiles a
        # function once more for each literal it is called with (a literal True, False or 0).
        lanes[1:3, : lane_count(width, fold)] = 0.0
        lane_sums(x, start, width, stream_stride, rows, lanes, fold)
        if tail_rows > 0:
            lane_sums(x, tail_start, channels, np.intp(0), tail_rows, lanes, fold)
        if fold > 0:  # each group's lanes a run of whole vectors
            lanes_per_group = lanes.shape[1] // sums.shape[0]
            float64_run_sums(lanes[1], 0, lanes_per_group, sums.shape[0], sums, 0)
            float64_run_sums(lanes[2], 0, lanes_per_group, sums.shape[0], sums, 1)
        else:
            group_sums(lanes, width, channel_sums, sums)
        if attempt == 1 or not repivot(group_pivot, sums, count):
            break
        expand_pivots(group_pivot, lane_channels, lanes)


@cached_njit()
def float64_block_group_sums(x, start, width, stream_stride, rows, tail_start, tail_rows, count,
                             group_pivot, channel_sums, sums):  # fmt: skip
    """``block_group_sums`` in float64, value by value, for the rare block whose float32 sums are
    not finite (an overflow, or NaN/Inf in the data). ``group_pivot`` is float64."""
    channels = channel_sums.shape[1]
    num_groups = group_pivot.size
    channels_per_group = channels // num_groups
    streams = 4 if stream_stride > 0 else 1
    for _attempt in range(2):
        channel_sums[:] = 0.0
        for stream in range(streams + 1):
            for r in range(rows if stream < streams else 1):
                row_start = start + stream * stream_stride + r * width
                row_stop = row_start + width
                if stream == streams:  # the tail positions
                    row_start = tail_start
                    row_stop = tail_start + tail_rows * channels
                for position_start in range(row_start, row_stop, channels):
                    for g in range(num_groups):
                        pivot = group_pivot[g]
                        for c in range(g * channels_per_group, (g + 1) * channels_per_group):
                            d = np.float64(x[position_start + c]) - pivot
                            channel_sums[0, c] += d
                            channel_sums[1, c] += d * d
        for g in range(num_groups):
            first = g * channels_per_group
            sums[g, 0] = np.sum(channel_sums[0, first : first + channels_per_group])
            sums[g, 1] = np.sum(channel_sums[1, first : first + channels_per_group])
        if _attempt == 1 or not repivot(group_pivot, sums, count):
            break


@cached_njit()
def block_group_moments(x, start, width, stream_stride, rows, tail_start, tail_rows, count, refs,
                        stats, lanes, channel_sums, group_pivot, sums, fold):  # fmt: skip
    """Merge the moments of one block of rows into ``stats[g]`` for every group ``g``.

    ``count`` values of each group lie in the block (its rows, and ``tail_rows`` positions from
    ``tail_start``). Summed in the type of ``lanes`` (``fold`` as for ``lane_sums``), and redone
    in float64 where a sum is not finite, as in ``moments.contiguous_moments``. The arrays are
    ``sample_moments``'s scratch.
    """
    num_groups = group_pivot.size
    block_group_sums(x, start, width, stream_stride, rows, tail_start, tail_rows, count, lanes,
                     channel_sums, group_pivot, sums, fold)  # fmt: skip
    finite = True
    for g in range(num_groups):
        finite = finite and np.isfinite(sums[g, 1])
    if finite:
        for g in range(num_groups):
            pivot = np.float64(group_pivot[g])
            merge_shifted_sums(stats, g, count, sums[g, 0], sums[g, 1], pivot, refs[g])
        return
    group_pivot64 = sums[:, 2]
    for g in range(num_groups):
        group_pivot64[g] = group_pivot[g]
    float64_block_group_sums(x, start, width, stream_stride, rows, tail_start, tail_rows, count,
                             group_pivot64, channel_sums, sums)  # fmt: skip
    for g in range(num_groups):
        merge_shifted_sums(stats, g, count, sums[g, 0], sums[g, 1], group_pivot64[g], refs[g])
        group_pivot[g] = cast_like(group_pivot64[g], group_pivot)
    expand_pivots(group_pivot, lane_count(channel_sums.shape[1], fold), lanes)


@cached_njit()
def sample_moments(x, sample_start, first_position, stop_position, channels, num_groups, stats,
                   lane_space, wide):  # fmt: skip
    """Merge the moments of positions ``[first_position, stop_position)`` of one sample.

    ``stats[g]`` receives group ``g``'s ``(count, offset, m2)``, offsets about the sample's first
    value of that group, ``x[sample_start + g * channels_per_group]``. The scratch comes from
    ``lane_scratch``; the moments are summed in the type of ``lane_space``, which holds per lane
    (pivot, s1, s2) and per group the pivot. ``wide`` holds float64 (s1, s2) per channel and per
    group the reference and (s1, s2, float64 pivot).

    With one group the range is one contiguous run of that group's values: the channels-first
    moments (``moments.contiguous_moments``) take it, at their lower cost per value.
    """
    if num_groups == 1:
        contiguous_moments(x, sample_start + first_position * channels,
                           sample_start + stop_position * channels, np.float64(x[sample_start]),
                           stats, 0, lane_space[0])  # fmt: skip
        return
    channels_per_group = channels // num_groups
    positions = stop_position - first_position
    # Rows of whole vectors short enough for their lane sums to stay in registers (see
    # simd.lane_sums_in_registers) go one after the other; longer ones in sweeps.
    vector = channel_lanes(x)
    vector_row = channels * (vector // np.gcd(channels, vector))
    in_registers = vector_row <= positions * channels and registers_hold_rows(
        x, lane_space, vector_row
    )
    positions_per_row = vector_row // channels if in_registers else lane_positions(channels,
                                                                                   positions)  # fmt: skip
    # Rows too long for that whose groups are whole vectors go one position a row, in sweeps, a
    # group's vectors folded into a few lanes (simd.folded_lane_sums).
    fold = 0 if in_registers else lane_fold(x, lane_space, channels_per_group)
    if fold > 0:
        positions_per_row = 1
    width = positions_per_row * channels
    lane_width = lane_count(width, fold)
    lanes = lane_space[: 3 * lane_width].reshape(3, lane_width)
    group_pivot = lane_space[3 * lane_width : 3 * lane_width + num_groups]
    per_channel = wide[: 2 * channels].reshape(2, channels)
    refs = wide[2 * channels : 2 * channels + num_groups]
    sums = wide[2 * channels + num_groups : 2 * channels + 4 * num_groups].reshape(num_groups, 3)
    for g in range(num_groups):
        refs[g] = x[sample_start + g * channels_per_group]
    # First pivots: each group's mean over its channels at the range's first position; they move
    # only where a block finds them too far from its mean (see moments.contiguous_moments). A
    # single value as pivot would, with 32 groups, leave some group's pivot more than two standard
    # deviations out, and the whole block to be summed again, three times in four.
    rows_start = sample_start + first_position * channels
    # float64: float32 values near 3e38 would add up to inf, and the group to NaN
    if channels_per_group % vector == 0:
        float64_run_sums(x, rows_start, channels_per_group, num_groups, sums, 2)
    else:
        for g in range(num_groups):
            first = rows_start + g * channels_per_group
            sums[g, 2] = group_total(x[first : first + channels_per_group])
    for g in range(num_groups):
        group_pivot[g] = cast_like(sums[g, 2] / channels_per_group, group_pivot)
    expand_pivots(group_pivot, lane_count(channels, fold), lanes)

    # Blocks of rows: sweeps over the four quarters of the rows (in registers: one stream of all
    # of them), then what the quarters leave, position by position (up to three rows and a partial
    # one): with the last block when there are at most SWEEPS_PER_BLOCK of those positions (a
    # block's fixed cost, ~2 us at C = 2048, is more than such a tail's), else in blocks of their
    # own. One call site, with arguments of one type: each kind of block compiled separately (as a
    # literal 0 stride would be) doubled the compile time.
    full_rows = positions // positions_per_row
    streams = 1 if in_registers else 4
    block_rows = REGISTER_BLOCK_ROWS if in_registers else SWEEPS_PER_BLOCK
    quarter = full_rows // streams
    sweep_blocks = -(-quarter // block_rows)
    tail_start = rows_start + streams * quarter * width
    tail_positions = positions - streams * quarter * positions_per_row
    joined = sweep_blocks > 0 and tail_positions <= SWEEPS_PER_BLOCK
    tail_blocks = 0 if joined else -(-tail_positions // (4 * SWEEPS_PER_BLOCK))
    for block in range(sweep_blocks + tail_blocks):
        extra_start = 0
        extra_rows = 0
        if block < sweep_blocks:
            first_sweep = block * block_rows
            rows = min(block_rows, quarter - first_sweep)
            block_start = rows_start + first_sweep * width
            block_width = width
            stream_stride = quarter * width if streams > 1 else 0
            count = rows * streams * positions_per_row * channels_per_group
            if joined and block == sweep_blocks - 1:
                extra_start = tail_start
                extra_rows = tail_positions
                count += tail_positions * channels_per_group
        else:
            first_position_of_block = (block - sweep_blocks) * 4 * SWEEPS_PER_BLOCK
            rows = min(4 * SWEEPS_PER_BLOCK, tail_positions - first_position_of_block)
            block_start = tail_start + first_position_of_block * channels
            block_width = channels
            stream_stride = 0
            count = rows * channels_per_group
        block_group_moments(x, block_start, block_width, stream_stride, rows, extra_start,
                            extra_rows, count, refs, stats, lanes, per_channel,
                            group_pivot, sums, fold)  # fmt: skip


@numba.njit(inline="always")
def apply_row(x, out, start, width, center, scale, shift):
    """Normalize ``width`` values from ``x[start]`` with lane coefficients (``out=None``: in place)."""
    source = x[start : start + width]
    target = destination(source, out, start, start + width)
    for j in range(width):
        target[j] = (source[j] - center[j]) * scale[j] + shift[j]


@numba.njit(inline="always")
def spread_lanes(coefficients, first_channel, width, lane_space):
    """Write the lane coefficients of rows of ``width`` values (whole positions) whose first lane
    holds channel ``first_channel``: each row of ``coefficients`` (``(3, C)``), rotated and
    repeated, into ``lane_space[k * width : (k + 1) * width]`` for k = 0, 1, 2.

    Rows of a few positions are copied a contiguous run at a time (C = 2048: 0.14 us, against
    1.0 us value by value, a fifth of the sample's normalization); rows of many positions of a few
    channels value by value.
    """
    channels = coefficients.shape[1]
    if width // channels <= 8:
        wrap = channels - first_channel
        for k in range(3):
            row = coefficients[k]
            for position_start in range(k * width, (k + 1) * width, channels):
                # Loops, not slice assignments: Numba's check of those for overlap cost more.
                lanes = lane_space[position_start : position_start + channels]
                for j in range(wrap):
                    lanes[j] = row[first_channel + j]
                for j in range(first_channel):
                    lanes[wrap + j] = row[j]
        return
    channel = first_channel
    for j in range(width):
        for k in range(3):
            lane_space[k * width + j] = coefficients[k, channel]
        channel = channel + 1 if channel + 1 < channels else 0


def lanes_of_dtype(x, lane_space, positions, channels, num_groups):
    """``lane_space`` (from ``lane_scratch``) where its dtype is x's, else ``apply_scratch``'s: the
    normalization's lanes hold coefficients in x's dtype, which every row kind computes in (the
    moments' lanes are float64 for float32 x where ``eps`` is below ``moments.NATIVE_MIN_EPS``)."""


@overload(lanes_of_dtype, inline="always")
def _lanes_of_dtype(x, lane_space, positions, channels, num_groups):
    if lane_space.dtype == x.dtype:
        return lambda x, lane_space, positions, channels, num_groups: lane_space
    return lambda x, lane_space, positions, channels, num_groups: apply_scratch(
        x, positions, channels, num_groups
    )


@numba.njit(inline="always")
def apply_scratch(x, positions, channels, num_groups):
    """``lane_space`` for ``apply_positions`` on ranges of up to ``positions``, of x's dtype: the
    lane coefficients (three rows' worth) and the groups' centers, without which it would not
    take group rows (``simd.apply_group_rows``); with ``STAGGER_ROOM`` to spare (``staggered``)."""
    return lane_space_for(positions, channels, num_groups, cast_like(0.0, x))


@cached_njit(fastmath={"contract"})  # (x - c) * a + b as one rounding: fma
def apply_positions(x, out, sample_start, first_position, stop_position, channels, num_groups,
                    coefficients, lane_space):  # fmt: skip
    """Normalize positions ``[first_position, stop_position)`` of one sample, last chunks first.

    ``coefficients`` holds the sample's centers, scales and shifts per channel, shape ``(3, C)``;
    they are spread over the lanes in ``lane_space`` (from ``lane_scratch`` or
    ``apply_scratch``, 64-byte aligned).
    The rows start ``skew`` values in, where ``x`` is 64-byte aligned (group rows of groups of
    several vectors: never at the range's first value), and the lanes are rotated to match: a
    512-bit load that straddles two cache lines costs two.

    Out of place past three quarters of the L3 (``simd.streamed_rows_skew``), every row of the
    lane width, whole 64-byte lines, goes through ``simd.apply_streamed_rows`` instead, starting
    on a line of ``out`` (x's loads then may straddle lines; the stores are what costs): against
    ordinary stores in one process, 1.08-1.81 times as fast on 15-128 MiB arrays (two threads,
    allocating and into ``out=``; (4, 256, 50, 76)/32 float32 1.10, float64 1.58-1.81; (64,
    2048, 7, 7)/32 1.46-1.51; (1, 128, 512, 512)/32 1.30-1.35).

    Rows of whole 64-byte lines of at most ``simd.row_limits()[1]`` bytes (with AVX-512, 512: C
    dividing 128 for float32, 64 for float64, and multiples of their divisors such as 48) go
    through ``simd.apply_rows``, which keeps a row's coefficients in registers. Longer rows go in
    sweeps: one row from each quarter of the range, sharing the loads of the lane coefficients, in
    four long streams the hardware prefetchers can follow; or, out of place, one at a time where
    a sweep overflows the L1 and one row of x and of out fits it with the coefficients
    (``simd.l1_data_bytes``). Rows of one position whose groups are whole vectors (C = 2048 with
    32 groups) go one at a time through ``simd.apply_group_rows``, a broadcast center a group:
    without the per-lane centers the coefficients of C = 2048 float32 are 16 KiB, which stay in a
    32 KiB L1 beside the row (Zen 4, 16 samples in place, two threads: 0.88 of the sweeps' time in
    float32, 0.70 in float64). Out of place only where a row of x, one of out and the coefficients
    fit the L1: (16, 7, 7, 2048)/32 float32 into a warm ``out``, 0.80-0.84 of the sweeps' time
    (one and two threads, three runs), allocating 0.92-0.98; rows of 1024 values, which take
    them too, 0.96-1.01; float64 rows of 2048 (32 KiB of coefficients) keep the sweeps. Group
    rows need the host's vectors to be 64 bytes (AVX-512), the unit of ``skew``.
    """
    lane_width = lane_positions(channels, stop_position - first_position) * channels
    total = (stop_position - first_position) * channels
    range_start = sample_start + first_position * channels
    vector = 64 // x.itemsize
    # The shortest row of whole vectors: lcm(C, vector). Its lanes fit in lane_space when it is no
    # longer than the sweeps' rows (which lane_space_for sized), i.e. the range has a row of it.
    vector_row = channels * (vector // np.gcd(channels, vector))
    vector_bytes, max_row_bytes = row_limits()
    # Out of place past the L3 (simd.streams), rows of whole 64-byte lines of out are stored past
    # the caches; they start on out's lines rather than x's.
    stream_skew = streamed_rows_skew(x, out, range_start, lane_width)
    streamed = stream_skew >= 0
    in_registers = (
        not streamed and vector_row * x.itemsize <= max_row_bytes and vector_row <= lane_width
    )
    width = vector_row if in_registers else lane_width
    channels_per_group = channels // num_groups
    group_vectors = channels_per_group // vector
    # Out of place, a row of x and one of out beside the coefficients must fit the L1 (C = 2048
    # float32, 32 KiB L1); else the sweeps' shared loads win. Only with 64-byte vectors: the group
    # rows' vectors are the host's, and their offset into a group (vector - skew) is counted in
    # 64-byte lines, which narrower vectors would misread.
    group_rows = (
        not streamed
        and vector_bytes == 64
        and (out is None or (2 * x.itemsize + 2 * lane_space.itemsize) * width <= l1_data_bytes())
        and not in_registers
        and width == channels
        and channels_per_group % vector == 0
        and group_vectors <= MAX_GROUP_VECTORS
        and 3 * width + num_groups <= lane_space.size
    )
    if streamed:
        skew = min(total, stream_skew)
    else:
        skew = min(total, (vector - (x.ctypes.data // x.itemsize + range_start) % vector) % vector)
    if group_rows and skew == 0 and group_vectors > 1:
        # Group rows that start on a group's first channel ran 1.13-1.26 times as long as rows
        # started any other vector-aligned way (groups of 2 and 4 vectors: C = 1024 and 2048
        # float32, in L2, one thread; groups of one vector, C = 512, did not), for a reason not
        # found: such a range starts its rows a vector in, in the middle of a group.
        skew = min(total, vector)
    center = lane_space[:width]
    scale = lane_space[width : 2 * width]
    shift = lane_space[2 * width : 3 * width]
    spread_lanes(coefficients, skew % channels, width, lane_space)
    rows_start = range_start + skew
    full_rows = (total - skew) // width
    tail = total - skew - full_rows * width
    apply_row(x, out, rows_start + full_rows * width, tail, center, scale, shift)
    # Backwards a chunk of rows at a time, each chunk forwards: the prefetchers follow ascending
    # runs of a chunk's length, not rows that step back every few dozen cache lines (one row at a
    # time, in reverse, ran a 16 MiB float64 part at 0.7 of this speed).
    chunk_rows = max(1, APPLY_CHUNK // width)
    if streamed or in_registers or group_rows:
        # Group rows (rows of one position whose groups are whole vectors) broadcast each group's
        # center (simd.apply_group_rows). The groups' centers go after the lane coefficients, in
        # the room lane_space_for leaves for them (and for the moments' group pivots, unused
        # until the next sample).
        centers = lane_space[3 * width : 3 * width + num_groups]
        if group_rows:
            for g in range(num_groups):
                centers[g] = coefficients[0, g * channels_per_group]
        chunk_stop = full_rows
        while chunk_stop > 0:
            chunk_start = max(0, chunk_stop - chunk_rows)
            first_row = rows_start + chunk_start * width
            rows = chunk_stop - chunk_start
            if streamed:
                apply_streamed_rows(x, out, first_row, rows, width, center, scale, shift)
            elif in_registers:
                apply_rows(x, out, first_row, rows, width * x.itemsize // vector_bytes, center,
                           scale, shift)  # fmt: skip
            else:
                apply_group_rows(x, out, first_row, rows, group_vectors, num_groups,
                                 vector - skew, centers, scale, shift)  # fmt: skip
            chunk_stop = chunk_start
    else:
        # Out of place, a sweep touches the lane coefficients and four rows each of x and out.
        # Where that overflows the L1 but one row of each and the coefficients fit, the rows go
        # one at a time and the coefficients stay in L1 (48 KiB L1, C = 2048 float32, 8 KiB rows:
        # 7.3 -> 6.0 us a sample in L2); where even that overflows (16 KiB rows), the sweeps'
        # shared loads win, and so they do in place at 8 KiB rows (3.8 against 4.9 us).
        coefficient_bytes = 3 * width * lane_space.itemsize
        row_bytes = width * x.itemsize
        l1_bytes = l1_data_bytes()
        one_at_a_time = (
            out is not None
            and coefficient_bytes + 8 * row_bytes > l1_bytes
            and coefficient_bytes + 2 * row_bytes <= l1_bytes
        )
        quarter = 0 if one_at_a_time else full_rows // 4
        chunk_stop = full_rows
        while chunk_stop > 4 * quarter:
            chunk_start = max(4 * quarter, chunk_stop - chunk_rows)
            for r in range(chunk_start, chunk_stop):
                apply_row(x, out, rows_start + r * width, width, center, scale, shift)
            chunk_stop = chunk_start
        sweeps_per_chunk = max(1, chunk_rows // 4)
        chunk_stop = quarter
        while chunk_stop > 0:
            chunk_start = max(0, chunk_stop - sweeps_per_chunk)
            for r in range(chunk_start, chunk_stop):
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
            chunk_stop = chunk_start
    # The skew's values are channels 0, 1, ...: the last lanes, since width is a multiple of C.
    apply_row(x, out, range_start, skew, center[width - skew :], scale[width - skew :],
              shift[width - skew :])  # fmt: skip


@cached_njit()
def normalize_small_samples(x, out, first_sample, stop_sample, spatial, channels, num_groups,
                            weight, bias, eps):  # fmt: skip
    """``normalize_samples`` for samples of at most ``SMALL_SAMPLE`` values, with short lanes: rows
    of ``k`` positions (``k * C`` values, at least ``SMALL_ROW`` where the sample allows), float64
    sums per lane, added up per group; then the rows normalized with per-lane coefficients.

    Each group's sums are shifted by its first value; a group whose first value lies more than
    ``sqrt(REPIVOT)`` standard deviations from its mean is summed again about the mean, as in
    ``moments.contiguous_moments``.
    """
    channels_per_group = channels // num_groups
    sample_length = spatial * channels
    count = channels_per_group * spatial
    row_positions = min(spatial, max(1, SMALL_ROW // channels))
    width = row_positions * channels
    full_rows = spatial // row_positions
    quads = full_rows // 4
    tail = sample_length - full_rows * width
    lanes_memory = np.empty((3, width))  # per lane: its group's first value, s1, s2
    coefficients_memory = np.empty((3, width), x.dtype)  # per lane: center, scale, shift
    # Each lane's offset from its group's first value (lane j holds channel j % C).
    group_first_memory = np.empty(width, np.int64)
    finals_memory = np.empty((3, num_groups))
    # No reference counts in the loops: see refcounts.
    x = borrowed(x)
    out = borrowed(out)
    weight = borrowed(weight)
    bias = borrowed(bias)
    lanes = borrowed(lanes_memory)
    coefficients = borrowed(coefficients_memory)
    group_first = borrowed(group_first_memory)
    finals = borrowed(finals_memory)
    pivot, s1, s2 = lanes[0], lanes[1], lanes[2]
    center, scale, shift = coefficients[0], coefficients[1], coefficients[2]
    for lane in range(width):
        channel = lane % channels
        group_first[lane] = channel - channel % channels_per_group
    for n in range(first_sample, stop_sample):
        sample_start = n * sample_length
        sample = x[sample_start : sample_start + sample_length]
        for lane in range(width):
            pivot[lane] = sample[group_first[lane]]
        s1[:] = 0.0
        s2[:] = 0.0
        # Four rows a loop: a loop's setup costs about as much as a row of 16 values.
        for r in range(0, 4 * quads, 4):
            base = sample_start + r * width
            row0 = x[base : base + width]
            row1 = x[base + width : base + 2 * width]
            row2 = x[base + 2 * width : base + 3 * width]
            row3 = x[base + 3 * width : base + 4 * width]
            for j in range(width):
                p = pivot[j]
                d0 = np.float64(row0[j]) - p
                d1 = np.float64(row1[j]) - p
                d2 = np.float64(row2[j]) - p
                d3 = np.float64(row3[j]) - p
                s1[j] += (d0 + d1) + (d2 + d3)
                s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        for r in range(4 * quads, full_rows):
            row = x[sample_start + r * width : sample_start + (r + 1) * width]
            for j in range(width):
                d = np.float64(row[j]) - pivot[j]
                s1[j] += d
                s2[j] += d * d
        row = x[sample_start + full_rows * width : sample_start + sample_length]
        for j in range(tail):
            d = np.float64(row[j]) - pivot[j]
            s1[j] += d
            s2[j] += d * d
        for lane in range(channels, width):  # per channel: its lanes' sums, into lanes 0..C-1
            s1[lane % channels] += s1[lane]
            s2[lane % channels] += s2[lane]
        for g in range(num_groups):
            first = g * channels_per_group
            group_s1 = 0.0
            group_s2 = 0.0
            for c in range(first, first + channels_per_group):
                group_s1 += s1[c]
                group_s2 += s2[c]
            ref = pivot[first]
            offset = group_s1 / count
            m2 = group_s2 - group_s1 * offset
            if not pivot_stands(count, group_s1, group_s2):
                # Rare: the group's first value lies far from its mean. Summed again about the
                # mean, as moments.contiguous_moments would (see normalize_short_slabs).
                mean = ref + offset
                group_s1 = 0.0
                group_s2 = 0.0
                for p in range(spatial):
                    values = x[sample_start + p * channels + first :]
                    for c in range(channels_per_group):
                        d = np.float64(values[c]) - mean
                        group_s1 += d
                        group_s2 += d * d
                mean_shift = group_s1 / count
                offset = (mean - ref) + mean_shift
                m2 = group_s2 - group_s1 * mean_shift
            finals[0, g] = ref
            finals[1, g] = offset
            finals[2, g] = m2
        # The groups' divisions and square roots in a loop of their own, where they overlap
        # across groups (moments.finalize_rows): (256, 64, 4, 4)/8 float32 in place, one thread,
        # 92 -> 74 us; two, 49 -> 39 us (float64 56 -> 47).
        finalize_rows(finals, count, eps)
        for g in range(num_groups):
            first = g * channels_per_group
            fold_group(coefficients, first, first, channels_per_group, finals[0, g], finals[1, g],
                       finals[2, g], weight, bias)  # fmt: skip
        for lane in range(channels, width):
            center[lane] = center[lane - channels]
            scale[lane] = scale[lane - channels]
            shift[lane] = shift[lane - channels]
        for r in range(0, 4 * quads, 4):
            base = sample_start + r * width
            source = x[base : base + 4 * width]
            target = destination(source, out, base, base + 4 * width)
            for j in range(width):
                c, a, b = center[j], scale[j], shift[j]
                target[j] = (source[j] - c) * a + b
                target[width + j] = (source[width + j] - c) * a + b
                target[2 * width + j] = (source[2 * width + j] - c) * a + b
                target[3 * width + j] = (source[3 * width + j] - c) * a + b
        for r in range(4 * quads, full_rows + 1):
            row_start = sample_start + r * width
            row_stop = min(row_start + width, sample_start + sample_length)
            source = x[row_start:row_stop]
            target = destination(source, out, row_start, row_stop)
            for j in range(row_stop - row_start):
                target[j] = (source[j] - center[j]) * scale[j] + shift[j]
    keep_alive((lanes_memory, coefficients_memory, group_first_memory, finals_memory))


@cached_njit()
def normalize_samples(x, out, first_sample, stop_sample, spatial, channels, num_groups, weight,
                      bias, eps, sum_type):  # fmt: skip
    """Normalize samples ``[first_sample, stop_sample)`` one after the other: each sample's moments,
    then its normalization while it is still in cache. Arguments as for ``_group_norm_fused``."""
    channels_per_group = channels // num_groups
    sample_length = spatial * channels
    lane_memory, wide_memory = lane_scratch(spatial, channels, num_groups, sum_type)
    apply_memory = lanes_of_dtype(x, lane_memory, spatial, channels, num_groups)
    stats_memory = np.empty((num_groups, 3))
    coefficients_memory = np.empty((3, channels), x.dtype)
    # No reference counts in the loop: see refcounts.
    x = borrowed(x)
    out = borrowed(out)
    weight = borrowed(weight)
    bias = borrowed(bias)
    lane_space = borrowed(lane_memory)
    wide = borrowed(wide_memory)
    apply_lanes = borrowed(apply_memory)
    stats = borrowed(stats_memory)
    coefficients = borrowed(coefficients_memory)
    for n in range(first_sample, stop_sample):
        sample_start = n * sample_length
        stats[:] = 0.0
        # np.intp(0), not a literal 0: the split kernels' part_moments and apply_part then share
        # these specializations (see block_group_sums).
        sample_moments(x, sample_start, np.intp(0), spatial, channels, num_groups, stats,
                       staggered(lane_space, x, sample_start), wide)  # fmt: skip
        for g in range(num_groups):
            ref = np.float64(x[sample_start + g * channels_per_group])
            mean_hi, mean_lo, _, rstd = finalize_group(
                ref, stats[g, 0], stats[g, 1], stats[g, 2], eps
            )
            first_channel = g * channels_per_group
            fold_group(coefficients, first_channel, first_channel, channels_per_group, mean_hi,
                       mean_lo, rstd, weight, bias)  # fmt: skip
        apply_space = staggered(apply_lanes, written(x, out), sample_start)
        apply_positions(x, out, sample_start, np.intp(0), spatial, channels, num_groups,
                        coefficients, apply_space)  # fmt: skip
    fence_streams(x, out)
    keep_alive((lane_memory, wide_memory, apply_memory, stats_memory, coefficients_memory))


def _group_norm_fused(normalize_samples_at, x, out, num_samples, spatial, channels, num_groups,
                      weight, bias, eps, sum_type, num_chunks):  # fmt: skip
    """Normalize whole samples, ``num_chunks`` runs of them in parallel (``normalize_samples``,
    which serial calls run themselves: see ``_compile``).

    Parameters
    ----------
    normalize_samples_at : int
        ``normalize_samples``' address for these arguments (``_compile.compiled_address``).
    x : float32 or float64 array, shape (N * spatial * C,), C-contiguous
    out : array like ``x``, or None to normalize ``x`` in place
    weight, bias : arrays of x's dtype, shape (C,)
    sum_type : float32 or float64 scalar
        A zero of the type the moments are summed in (see ``moments``); Numba compiles one kernel
        per type.
    num_chunks : int
        Runs of samples, at most N: one per thread.
    """
    for chunk in numba.prange(num_chunks):
        first_sample, stop_sample = chunk_bounds(num_samples, num_chunks, chunk)
        call_compiled(normalize_samples_at, (x, out, first_sample, stop_sample, spatial, channels,
                                             num_groups, weight, bias, eps, sum_type))  # fmt: skip


group_norm_fused = cached_njit(parallel=True)(_group_norm_fused)


def _group_norm_small(normalize_at, x, out, num_samples, spatial, channels, num_groups, weight,
                      bias, eps, sum_type, num_chunks):  # fmt: skip
    """``_group_norm_fused`` for samples of at most ``SMALL_SAMPLE`` values, through
    ``normalize_small_samples`` (at ``normalize_at``). A kernel of its own, so that a first call
    compiles either the channels-first path or the lanes, not both."""
    for chunk in numba.prange(num_chunks):
        first_sample, stop_sample = chunk_bounds(num_samples, num_chunks, chunk)
        call_compiled(normalize_at, (x, out, first_sample, stop_sample, spatial, channels,
                                     num_groups, weight, bias, eps))  # fmt: skip


group_norm_small = cached_njit(parallel=True)(_group_norm_small)


@numba.njit(inline="always")
def store_part_moments(x, spatial, channels, num_groups, num_parts, item, partial, stats,
                       lane_space, wide):  # fmt: skip
    """``part_moments`` with its scratch given: ``stats``, ``(num_groups, 3)``, and
    ``lane_scratch``'s arrays for the part's positions."""
    n = item // num_parts
    part = item % num_parts
    start, stop = part_bounds(spatial, num_parts, part)
    stats[:] = 0.0
    sample_start = n * spatial * channels
    moments_space = staggered(lane_space, x, sample_start + start * channels)
    sample_moments(x, sample_start, start, stop, channels, num_groups, stats, moments_space,
                   wide)  # fmt: skip
    for g in range(num_groups):
        for k in range(3):
            partial[(n * num_groups + g) * num_parts + part, k] = stats[g, k]


@cached_njit()
def part_moments(x, spatial, channels, num_groups, num_parts, item, partial, sum_type):
    """Moments of position range ``item % num_parts`` of sample ``item // num_parts``, group by
    group, into rows ``(n * num_groups + g) * num_parts + item % num_parts`` of ``partial``."""
    start, stop = part_bounds(spatial, num_parts, item % num_parts)
    lane_memory, wide_memory = lane_scratch(stop - start, channels, num_groups, sum_type)
    stats_memory = np.empty((num_groups, 3))
    # No reference counts in the loops: see refcounts.
    store_part_moments(borrowed(x), spatial, channels, num_groups, num_parts, item,
                       borrowed(partial), borrowed(stats_memory), borrowed(lane_memory),
                       borrowed(wide_memory))  # fmt: skip
    keep_alive((lane_memory, wide_memory, stats_memory))


@cached_njit()
def split_scratch(x, num_samples, spatial, channels, num_groups, num_parts):
    """``partial`` (filled by ``part_moments``) and ``refs`` (each group's first value in its
    sample); see ``_partial_moments``. Compiled on its own: in a parallel function ``np.zeros``
    would be a parallel loop of its own, another launch."""
    channels_per_group = channels // num_groups
    partial = np.empty((num_samples * num_groups * num_parts, 3))
    refs = np.empty(num_samples * num_groups)
    for n in range(num_samples):
        for g in range(num_groups):
            refs[n * num_groups + g] = x[n * spatial * channels + g * channels_per_group]
    return partial, refs


def _partial_moments(part_moments_at, x, num_samples, spatial, channels, num_groups, num_parts,
                     sum_type):  # fmt: skip
    """Moments of ``num_parts`` position ranges of every sample (``part_moments``, at
    ``part_moments_at``: see ``part_moments_address``), for when samples are few.

    Returns
    -------
    partial : float64 array, shape (N * num_groups * num_parts, 3)
        ``(count, offset, m2)`` per (sample, group, part).
    refs : float64 array, shape (N * num_groups,)
        Each group's first value in its sample, the reference of its offsets.
    """
    partial, refs = split_scratch(x, num_samples, spatial, channels, num_groups, num_parts)
    for item in numba.prange(num_samples * num_parts):
        call_compiled(part_moments_at, (x, spatial, channels, num_groups, num_parts, item, partial,
                                        sum_type))  # fmt: skip
    return partial, refs


partial_moments, partial_moments_serial = parallel_and_serial(_partial_moments)


@numba.njit(inline="always")
def apply_part_with(x, out, partial, refs, spatial, channels, num_groups, num_parts, item, weight,
                    bias, eps, coefficients, stats, lane_space):  # fmt: skip
    """``apply_part`` with its scratch given: ``coefficients``, ``(3, C)`` of x's dtype; ``stats``,
    ``(1, 3)``; ``lane_space`` from ``apply_scratch`` for the part's positions (see
    ``apply_positions``)."""
    n = item // num_parts
    channels_per_group = channels // num_groups
    for g in range(num_groups):
        merged_group_coefficients(partial, refs, num_parts, n * num_groups + g, num_groups,
                                  channels_per_group, weight, bias, eps, stats, coefficients,
                                  g * channels_per_group)  # fmt: skip
    start, stop = part_bounds(spatial, num_parts, item % num_parts)
    sample_start = n * spatial * channels
    apply_space = staggered(lane_space, written(x, out), sample_start + start * channels)
    apply_positions(x, out, sample_start, start, stop, channels, num_groups, coefficients,
                    apply_space)  # fmt: skip


@cached_njit()
def apply_part(x, out, partial, refs, spatial, channels, num_groups, num_parts, item, weight, bias,
               eps):  # fmt: skip
    """Normalize position range ``item % num_parts`` of sample ``item // num_parts``, with the
    sample's moments merged from ``partial``."""
    start, stop = part_bounds(spatial, num_parts, item % num_parts)
    lane_memory = apply_scratch(x, stop - start, channels, num_groups)
    coefficients_memory = np.empty((3, channels), x.dtype)
    merge_memory = np.empty((1, 3))
    # No reference counts in the loops: see refcounts.
    x = borrowed(x)
    out = borrowed(out)
    weight = borrowed(weight)
    bias = borrowed(bias)
    apply_part_with(x, out, borrowed(partial), borrowed(refs), spatial, channels, num_groups,
                    num_parts, item, weight, bias, eps, borrowed(coefficients_memory),
                    borrowed(merge_memory), borrowed(lane_memory))  # fmt: skip
    fence_streams(x, out)
    keep_alive((lane_memory, coefficients_memory, merge_memory))


def _group_norm_split(part_moments_at, apply_part_at, x, out, num_samples, spatial, channels,
                      num_groups, weight, bias, eps, sum_type, num_parts):  # fmt: skip
    """Normalize every sample in ``num_parts`` position ranges: the ranges' moments in one
    parallel loop (``part_moments``), then each range, with its sample's merged moments, in a
    second one (``apply_part``); their addresses from ``split_addresses``. For samples fewer than
    threads; arguments as for ``_group_norm_fused``. One call, two launches."""
    partial, refs = split_scratch(x, num_samples, spatial, channels, num_groups, num_parts)
    for item in numba.prange(num_samples * num_parts):
        call_compiled(part_moments_at, (x, spatial, channels, num_groups, num_parts, item, partial,
                                        sum_type))  # fmt: skip
    for item in numba.prange(num_samples * num_parts):
        call_compiled(apply_part_at, (x, out, partial, refs, spatial, channels, num_groups,
                                      num_parts, item, weight, bias, eps))  # fmt: skip


# Not fused into one loop: each piece needs the moments of all its unit's pieces. Numba sees no
# dependence between the loops, whose calls through addresses hide their array arguments.
group_norm_split = cached_njit(parallel={"fusion": False})(_group_norm_split)


@cached_njit()
def cooperative_scratch(x, num_samples, spatial, channels, num_groups, num_threads):
    """``(progress, partial, refs, started)`` for ``_group_norm_cooperative``: per sample a count
    of finished moment parts and a claim per moment and per normalization part; the parts'
    moments and each group's first value (as for ``split_scratch``); a flag per thread, set when
    it starts. Compiled on its own, like ``split_scratch``."""
    partial, refs = split_scratch(x, num_samples, spatial, channels, num_groups, num_threads)
    progress, started = cooperative_counters(num_samples, num_threads)
    return progress, partial, refs, started


@cached_njit()
def normalize_samples_together(x, out, num_samples, spatial, channels, num_groups, weight, bias,
                               eps, sum_type, thread, num_threads, progress, partial, refs,
                               started):  # fmt: skip
    """``thread``'s share of ``_group_norm_cooperative``: for each sample in turn, the moments of
    its part of the positions (``store_part_moments``), a wait for the other parts' moments, then
    the normalization of its part with the sample's merged moments (``apply_part_with``). The
    scratch of both is allocated once."""
    positions = spatial // num_threads + 16  # part_bounds' parts, rounded down to 16 positions
    lane_memory, wide_memory = lane_scratch(positions, channels, num_groups, sum_type)
    apply_memory = apply_scratch(x, positions, channels, num_groups)
    stats_memory = np.empty((num_groups, 3))
    merge_memory = np.empty((1, 3))
    coefficients_memory = np.empty((3, channels), x.dtype)
    # No reference counts in the loop: see refcounts.
    x = borrowed(x)
    out = borrowed(out)
    weight = borrowed(weight)
    bias = borrowed(bias)
    progress = borrowed(progress)
    partial = borrowed(partial)
    refs = borrowed(refs)
    started = borrowed(started)
    lane_space = borrowed(lane_memory)
    wide = borrowed(wide_memory)
    apply_space = borrowed(apply_memory)
    stats = borrowed(stats_memory)
    merge_space = borrowed(merge_memory)
    coefficients = borrowed(coefficients_memory)
    atomic_add(started, thread, 1)
    for n in range(num_samples):
        slots = n * (1 + 2 * num_threads)  # moments done, then a claim per part and phase
        for i in range(num_threads):
            part = (thread + i) % num_threads
            if claim(progress, started, slots + 1 + part, part, thread, num_threads):
                store_part_moments(x, spatial, channels, num_groups, num_threads,
                                   n * num_threads + part, partial, stats, lane_space,
                                   wide)  # fmt: skip
                atomic_add(progress, slots, 1)
        wait_for(progress, slots, num_threads)
        for i in range(num_threads):
            part = (thread + i) % num_threads
            if claim(progress, started, slots + 1 + num_threads + part, part, thread,
                     num_threads):  # fmt: skip
                apply_part_with(x, out, partial, refs, spatial, channels, num_groups, num_threads,
                                n * num_threads + part, weight, bias, eps, coefficients,
                                merge_space, apply_space)  # fmt: skip
    fence_streams(x, out)
    keep_alive((lane_memory, wide_memory, apply_memory, stats_memory, merge_memory,
                coefficients_memory))  # fmt: skip


def _group_norm_cooperative(together_at, x, out, num_samples, spatial, channels, num_groups,
                            weight, bias, eps, sum_type, num_threads):  # fmt: skip
    """Normalize the samples one after the other, each by all ``num_threads`` threads together,
    a range of positions each (``normalize_samples_together``, at ``together_at``: see
    ``cooperative_address``); arguments as for ``_group_norm_fused``. For samples larger than a
    core's L2, which a thread alone would read again from L3 or memory (a thread's range is read
    again from its own L2), and for samples fewer than threads, too small to split. One launch;
    the threads wait for each other once a sample, on atomic counters."""
    progress, partial, refs, started = cooperative_scratch(x, num_samples, spatial, channels,
                                                           num_groups, num_threads)  # fmt: skip
    for thread in numba.prange(num_threads):
        call_compiled(together_at, (x, out, num_samples, spatial, channels, num_groups, weight,
                                    bias, eps, sum_type, thread, num_threads, progress, partial,
                                    refs, started))  # fmt: skip


group_norm_cooperative = cached_njit(parallel=True)(_group_norm_cooperative)


# The addresses of what the split and cooperative kernels call (see ``_compile.PARTIAL``).
def part_moments_address(x, sum_type):
    """``part_moments``' address for ``_partial_moments`` and ``_group_norm_split``."""
    return compiled_address(part_moments, (x, 0, 0, 0, 0, 0, PARTIAL, sum_type))


def split_addresses(x, out, sum_type):
    """``(part_moments, apply_part)``'s addresses for ``_group_norm_split``."""
    return part_moments_address(x, sum_type), _compile.apply_part_address(apply_part, x, out)


def cooperative_address(x, out, sum_type):
    """``normalize_samples_together``'s address for ``_group_norm_cooperative``."""
    return _compile.together_address(normalize_samples_together, x, out, sum_type)
