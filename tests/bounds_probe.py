"""Every kernel path once, compiled with Numba's bounds checks; run by ``test_bounds.py``.

Numba does not check indices by default: a kernel that indexes past an array (a scratch array of
the wrong shape, an off-by-one in a part's bounds) reads or writes memory it does not own, and may
still pass a comparison with the reference. Here ``NUMBA_BOUNDSCHECK=1`` (set by the caller, with
a fresh ``NUMBA_CACHE_DIR``) turns that into an ``IndexError``. The LLVM IR loops of ``simd.py``
are not covered: they index raw pointers.

Small inputs reach the parallel paths by lowering ``_schedule``'s thresholds: every size then
runs serially (the defaults), and again with fused, split and cooperative parallel plans, in place
and allocating (cooperative too), each result compared with the float64 reference. Prints one line per path taken
and ``ok``.
"""

import sys
import warnings
from pathlib import Path

import numpy as np
from numba.core.errors import NumbaWarning

import nbgn
from nbgn import _schedule, api
from nbgn._checks import check_geometry
from nbgn.kernels import simd

sys.path.insert(0, str(Path(__file__).parent))
from reference import from_channels_first, reference_group_norm, tolerance

# Compiled without LLVM's optimizations (see test_bounds.py), some kernels keep addresses of globals
# that Numba will not cache; this process's cache is thrown away anyway.
warnings.filterwarnings("ignore", "Cannot cache compiled function", NumbaWarning)

# The L1 that sends NHWC rows of 8 KiB one at a time out of place (read when a kernel compiles).
simd._host_l1_data_bytes = lambda: 48 * 1024
# Out-of-place runs stream from 4 KiB of input and output (read when a kernel compiles): the
# Numba loops around the streamed vectors (simd.apply_streamed) and rows (simd.apply_streamed_rows,
# NHWC) are checked too.
simd._host_stream_bytes = lambda: 4096

#: (N, C, *spatial) shapes and groups that reach each kernel: NCHW weight patterns, short slabs,
#: one value per channel, channels of one vector to 256 values, longer channels; NHWC small
#: samples, rows of whole vectors (in registers), rows too long for them (sweeps; out of place,
#: 8 KiB rows one at a time, given the 48 KiB L1 assumed above), one group.
CASES = [
    ((3, 16, 7, 7), 2),
    ((2, 8, 4, 4), 4),
    ((2, 64, 1), 8),
    ((2, 6, 17), 3),
    ((2, 32, 20, 20), 4),
    ((1, 12, 33, 31), 3),
    ((3, 8, 4, 4), 2),
    ((2, 32, 9, 9), 4),
    ((2, 100, 6, 6), 4),
    ((1, 48, 30, 30), 6),
    ((1, 3, 40, 40), 1),
    ((1, 2048, 2, 2), 32),
    ((1, 48, 7, 7), 1),
    ((1, 10, 9, 9), 1),
    ((1, 20, 17, 19), 1),
]

#: Thresholds low enough that these sizes run in parallel: fused (several units), split (one
#: unit) and, in place, cooperative (units above a kilobyte).
PARALLEL = {"SERIAL_ELEMENTS": 0, "MIN_PART_ELEMENTS": 64, "COOPERATIVE_BYTES": 1024}

#: And cooperative for units fewer than threads, too small to split, in place or not.
TOGETHER = {
    "SERIAL_ELEMENTS": 0,
    "MIN_PART_ELEMENTS": 1 << 30,
    "COOPERATIVE_BYTES": 1 << 30,
    "MIN_COOPERATIVE_PART_BYTES": 256,
}


def check(rng, shape, groups, layout, dtype, in_place) -> str:
    first = rng.standard_normal(shape) * 3.0 + 1e3  # far from zero: the pivots move
    first.reshape(shape[0], -1)[0, 5] = 4e3  # a far-out value: a block summed again
    x = np.ascontiguousarray(from_channels_first(first, layout)).astype(dtype)
    weight = rng.uniform(0.5, 1.5, shape[1]).astype(dtype)
    bias = rng.uniform(-1.0, 1.0, shape[1]).astype(dtype)
    expected = reference_group_norm(x, groups, weight, bias, layout=layout)
    if in_place:
        result = nbgn.group_norm(x, groups, weight, bias, layout=layout, out=x)
    else:
        result = nbgn.group_norm(x, groups, weight, bias, layout=layout)
    # In units of the output where it exceeds 1: the far-out value's own output is ~60, whose last
    # float32 digits (a few units of 8e-6) can add up to the tolerance.
    error = float(np.max(np.abs(result - expected) / np.maximum(1.0, np.abs(expected))))
    if not error <= tolerance(dtype):
        raise AssertionError(f"{shape}/{groups} {layout} {dtype} in_place={in_place}: {error}")
    if x.size < _schedule.SERIAL_ELEMENTS:
        return str(_schedule.SERIAL)
    geometry = check_geometry(x.shape, groups, layout)
    channels_last = geometry.channels_last and geometry.spatial > 1
    return f"{api._plan(geometry, channels_last, x.itemsize, in_place)} in_place={in_place}"


def main() -> None:
    rng = np.random.default_rng(4807)
    plans = set()
    for thresholds in ({}, PARALLEL, TOGETHER):
        for name, value in thresholds.items():
            setattr(_schedule, name, value)
        _schedule._parallel_plan.cache_clear()
        api._forget_kernels()  # the calls remembered under the other thresholds
        for shape, groups in CASES:
            for layout in ("NCHW", "NHWC"):
                for dtype in ("float32", "float64"):
                    for in_place in (False, True):
                        plans.add(check(rng, shape, groups, layout, dtype, in_place))
    for plan in sorted(plans):
        print(plan)
    print("ok")


if __name__ == "__main__":
    main()
