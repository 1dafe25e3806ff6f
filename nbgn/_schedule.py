"""How to run a group norm: serial or parallel, and how to split it, decided from the shape alone.

The unit of work is a (sample, group) *slab* for NCHW and a *sample* for NHWC: the fused kernels give
each unit to one thread, which reads it once for the moments and normalizes it while it is still in
its L2 cache. That moves the minimum, ``2 * itemsize`` bytes per element, to and from memory.

- Below ``SERIAL_ELEMENTS`` elements the fused kernel's per-thread function runs on the calling
  thread, over all the units: launching a parallel region costs a few microseconds, more than such
  a call takes on one core. So does every call with one thread (``numba.set_num_threads(1)``),
  and every call in a process forked after GNU OpenMP threads ran, where a parallel launch would
  kill it (``_threading.serial_only``).
- When there are fewer units than threads (one image at inference, one group), or so few that the
  threads would finish unevenly, each unit is split into ``parts``: one call runs a parallel loop
  over the parts' moments, and a second one that normalizes each part (in place in reverse, so
  that what the first loop left in the caches is reused), with its unit's moments merged exactly
  (Chan). Parts smaller than ``MIN_PART_ELEMENTS`` are not worth two launches; a single unit not
  worth splitting runs serially, unless several threads take it together (below).
- In place, units larger than a core's L2 (``COOPERATIVE_BYTES``) are normalized one after the
  other by all threads together, a part each, waiting for each other's moments once a unit: each
  thread's second read then comes from its own L2 rather than from L3 or memory.
- So, by as many threads as get a part of ``MIN_COOPERATIVE_PART_BYTES`` or more, are units
  fewer than threads but too small to split into parts (in place or not), where that makes more
  threads than units: one launch where the split kernel takes two, the parts' moments meeting on
  atomic counters.
- NCHW slabs of short channels with their own weights, whole windows of a vector's worth of
  channels, go a window at a time with permuted coefficients (``nchw.windows_fit``); other float32
  slabs of many short channels go through per-group weight patterns (``channel_patterns``): one
  flat loop per slab instead of one per channel.
- Out of place, where input and output together fill three quarters of the L3 or more
  (``simd.streams``, decided inside the kernels from the arrays' sizes), NCHW channels of more
  than ``nchw.SHORT_CHANNEL`` values, slabs whose channels share one weight and bias, and NHWC
  samples and parts (not samples of at most ``nhwc.SMALL_SAMPLE`` values, nor ranges of a few
  positions, whose rows are not whole 64-byte lines) are written with non-temporal stores: ``2 * itemsize`` bytes per element to and from memory, where ordinary
  stores read the output's lines first (``3 * itemsize``).
- NCHW slabs of at most ``nchw.SHORT_SLAB`` values (spatial dimensions of a few values, or none)
  are normalized in batches (``nchw.normalize_short_slabs``): a short slab costs the latency of its
  divisions and square root, which a batch overlaps.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

from . import _threading
from .kernels.nchw import SHORT_SLAB, windows_fit
from .kernels.simd import host_window_widths

#: Below this many elements a parallel launch costs more than it saves (measured: ~3 us launch,
#: ~4 us for 32K elements on one core).
SERIAL_ELEMENTS = 1 << 15

#: Below this many elements a part costs more than it saves: a split unit takes two launches and
#: its data moves between the passes (measured: a 0.5 MiB float32 group, 2 parts of 64K elements,
#: took 13 us against 9 us on one core; 1 MiB, 2 parts of 128K, 14 us against 17 us).
MIN_PART_ELEMENTS = 1 << 17

#: In place, units of more than this many bytes are normalized by all threads together, one unit
#: after the other (``nhwc.group_norm_cooperative``, ``nchw.group_norm_cooperative``): a thread's
#: part then fits its L2 (1 MiB here) for the second read, where a whole unit would come again from
#: L3 or memory. Seed (64, 16, 112, 112)/4 NHWC float64, 1.6 MB samples: 3.73-3.80 ms alone,
#: 3.20-3.24 ms together (0.93-0.98 of the roofline); (1, 32, 512, 512)/8 NCHW float32, 4 MiB slabs:
#: 752 -> 667 us. Smaller units together were slower (0.8 MB NHWC samples, 0.4 MB NCHW slabs). A
#: single unit: as fast as the split kernel, in one launch instead of two. Not out of place: into a
#: warm output it gained little, into a new one NHWC lost 18% (two threads taking the OS's fresh
#: pages of one unit at once); but see ``MIN_COOPERATIVE_PART_BYTES`` for units too small to split.
COOPERATIVE_BYTES = 1 << 20

#: Fewer units than threads, too small for parts of ``MIN_PART_ELEMENTS``, are normalized one
#: after the other by threads together (``cooperative``), as many as get a part of at least this
#: many bytes, where they outnumber the units; else a unit per thread (``fused``), or serially. In
#: place, one unit of 392 KiB gained nothing, but every larger one did. Two threads against one,
#: one sample of (1, 8, H, W)/1 (NCHW and NHWC alike): 392 KiB of float32, allocating 10.4 -> 8.3
#: us, in place 6.8 -> 6.9; 800 KiB, 24.0 -> 13.1 and 13.9 -> 9.6; float64, 400 KiB, 11.8 -> 8.3
#: and 7.4 -> 7.2; 324 KiB, 8.6 -> 8.5 and 6.6 -> 6.7; 256 KiB, 6.9 -> 7.4 and 5.7 -> 6.4.
#: (1, 64, 56, 56)/32 NHWC float32, 784 KiB: 23.5 -> 12.8 and 12.6 -> 8.8.
MIN_COOPERATIVE_PART_BYTES = 192 << 10

#: With at least this many units per thread, uneven finishing costs at most ~1/8 of a unit each.
BALANCED_UNITS_PER_THREAD = 4


#: NCHW channels of at most this many values, in groups of at least ``PATTERN_MIN_CHANNELS``, are
#: normalized through per-group weight patterns (``channel_patterns``).
PATTERN_MAX_SPATIAL = 64
PATTERN_MIN_CHANNELS = 8


class Plan(NamedTuple):
    """``parallel``: use the parallel kernels; ``parts``: pieces per unit (1: the fused kernel);
    ``chunks``: runs of whole units the fused kernel hands out, one per thread (1 when serial);
    ``cooperative``: the units one after the other, each by all threads, a part each."""

    parallel: bool
    parts: int
    chunks: int
    cooperative: bool = False


SERIAL = Plan(parallel=False, parts=1, chunks=1)


def plan(units: int, unit_elements: int, unit_bytes: int = 0, in_place: bool = False) -> Plan:
    """The plan for ``units`` work units of ``unit_elements`` elements each; ``unit_bytes`` is a
    unit's size in bytes where the layout has a cooperative kernel (a group norm), else 0 (the
    moments alone); ``in_place``: a group norm in place."""
    if units * unit_elements < SERIAL_ELEMENTS or _threading.serial_only():
        return SERIAL
    return _parallel_plan(units, unit_elements, _threading.num_threads(), unit_bytes, in_place)


@functools.lru_cache(maxsize=256)
def _parallel_plan(
    units: int, unit_elements: int, threads: int, unit_bytes: int, in_place: bool
) -> Plan:
    """Cached: a call's Python overhead is part of what a small group norm costs."""
    if threads == 1:
        return SERIAL
    if in_place and unit_bytes > COOPERATIVE_BYTES:
        return Plan(parallel=True, parts=threads, chunks=threads, cooperative=True)
    parts = num_parts(units, unit_elements, threads)
    if units < threads and parts == 1:
        # Fewer helpers than units would give each more than the fused plan's unit a thread.
        helpers = min(threads, unit_bytes // MIN_COOPERATIVE_PART_BYTES)
        if helpers > units:
            return Plan(parallel=True, parts=helpers, chunks=helpers, cooperative=True)
    if units == 1 and parts == 1:
        return SERIAL  # one unit, not worth splitting: a parallel launch would run one chunk
    return Plan(parallel=True, parts=parts, chunks=min(units, threads))


def num_parts(units: int, unit_elements: int, threads: int) -> int:
    """How many parts to split each of ``units`` work units of ``unit_elements`` elements into."""
    if threads <= 1 or units >= BALANCED_UNITS_PER_THREAD * threads or units % threads == 0:
        return 1
    wanted = threads // math.gcd(units, threads)
    affordable = unit_elements // MIN_PART_ELEMENTS
    return max(1, min(wanted, affordable))


def channel_patterns(
    num_samples: int, channels_per_group: int, spatial: int, itemsize: int
) -> bool:
    """Whether NCHW slabs are normalized through per-group patterns of weight and bias
    (``nchw.normalize_slabs_patterned``) rather than a loop per channel.

    A loop over a channel of a few dozen values spends as much on its setup as on its values;
    the pattern turns a slab into one flat loop, with two more (L1-resident) loads per value. The
    slabs go in group-major order, so a thread builds a group's pattern once and uses it for every
    sample of that group in its run: worth it from two samples on. Measured on float32 channels of
    49 values, one thread: 226 -> 168 us in place for (16, 2048, 7, 7)/32. Not for float64 (the
    extra loads cost more than the loop setup saves) nor for channels beyond
    ``PATTERN_MAX_SPATIAL`` values (196: slower), nor for slabs of at most ``SHORT_SLAB`` values,
    which ``nchw.normalize_short_slabs`` takes in batches (one thread, (64, 512)/32: 85 -> 28 us;
    (8, 256, 4, 4)/32: 14 -> 11 us). Nor where the channels fit ``nchw.windows_fit``: the windows
    load no pattern (the late layers above: 0.55-0.91 of the patterned kernel's time in place).
    """
    if windows_fit(host_window_widths(itemsize)[0], channels_per_group, spatial):
        return False
    return (
        itemsize == 4
        and spatial <= PATTERN_MAX_SPATIAL
        and channels_per_group >= PATTERN_MIN_CHANNELS
        and num_samples >= 2
        and channels_per_group * spatial > SHORT_SLAB
    )
