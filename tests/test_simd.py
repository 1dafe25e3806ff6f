"""``nbgn/kernels/simd.py`` on other hosts: the vector width and the longest register row follow
the CPU (64-byte vectors and 512-byte rows with AVX-512, 32 and 128 with AVX2, 16 bytes
elsewhere). Each configuration is compiled in a child process with a fresh cache and checked
against the float64 reference, rows in registers and rows too long for them, and NCHW channels
around a vector's length, in place and not. The L1 size that chooses between the NHWC sweeps and
one row at a time is read from Linux's description of the caches, or assumed."""

import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest
from reference import past_line

from nbgn.kernels import moments, nchw, nhwc, simd

CHECK = """
import numpy as np
import nbgn.kernels.simd as simd
simd._host_row_limits = lambda: LIMITS
# Out of place streams from 4 KiB of input and output, so narrower vectors stream too (x86-64).
if simd._host_stream_bytes() is not None:
    simd._host_stream_bytes = lambda: 4096
import nbgn
from reference import reference_group_norm
worst = 0.0
for channels in (3, 8, 16, 48, 64, 128, 136):
    groups = 1 if channels == 3 else channels // 4
    for dtype, tolerance in ((np.float32, 1e-5), (np.float64, 1e-12)):
        rng = np.random.default_rng(channels)
        x = (rng.standard_normal((2, 9, 37, channels)) * 3 + 7).astype(dtype)
        weight = rng.standard_normal(channels).astype(dtype)
        bias = rng.standard_normal(channels).astype(dtype)
        expected = reference_group_norm(x, groups, weight, bias, 1e-5, "NHWC")
        y = nbgn.group_norm(x, groups, weight, bias, layout="NHWC")
        nbgn.group_norm(x, groups, weight, bias, layout="NHWC", out=x)
        worst = max(worst, abs(y - expected).max() / tolerance, abs(x - expected).max() / tolerance)
# NCHW channels around a vector's length (simd.apply_channels), in slabs too long for the short path.
for spatial in (7, 8, 9, 17, 49):
    for dtype, tolerance in ((np.float32, 1e-5), (np.float64, 1e-12)):
        rng = np.random.default_rng(spatial)
        x = (rng.standard_normal((1, 128, spatial)) * 3 + 7).astype(dtype)
        weight = rng.standard_normal(128).astype(dtype)
        bias = rng.standard_normal(128).astype(dtype)
        expected = reference_group_norm(x, 4, weight, bias, 1e-5, "NCHW")
        y = nbgn.group_norm(x, 4, weight, bias)
        nbgn.group_norm(x, 4, weight, bias, out=x)
        worst = max(worst, abs(y - expected).max() / tolerance, abs(x - expected).max() / tolerance)
print(worst)
"""


@pytest.mark.slow
@pytest.mark.parametrize("limits", [(32, 128)])  # AVX2: compiling takes minutes
def test_other_vector_widths_match_reference(tmp_path, limits):
    assert _printed_at(CHECK, limits, tmp_path) <= 1.0


def _printed_at(code, limits, cache_dir):
    """What ``code`` prints, run in a child process whose ``simd._host_row_limits()`` are
    ``limits`` (``LIMITS`` in the code), with a fresh Numba cache in ``cache_dir``."""
    env = {
        **os.environ,
        "NUMBA_CACHE_DIR": str(cache_dir),
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }
    done = subprocess.run(
        [sys.executable, "-c", code.replace("LIMITS", repr(limits))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


GROUP_ROWS = """
import numpy as np
import nbgn.kernels.simd as simd
simd._host_row_limits = lambda: LIMITS
from nbgn.kernels import nhwc
from nbgn.kernels.moments import aligned_full
worst = 0.0
for dtype, channels, groups in ((np.float32, 2048, 32), (np.float32, 512, 8), (np.float64, 1024, 64)):
    itemsize, positions = np.dtype(dtype).itemsize, 3
    rng = np.random.default_rng(channels)
    coefficients = rng.standard_normal((3, channels)).astype(dtype)
    coefficients[0] = np.repeat(rng.uniform(-50, 50, groups), channels // groups)  # a group's
    for skip in range(64 // itemsize):
        for in_place in (False, True):
            buffer = rng.standard_normal((positions + 1) * channels).astype(dtype)
            start = (-buffer.ctypes.data % 64) // itemsize + skip
            x = buffer[start : start + positions * channels]
            rows = x.reshape(positions, channels).astype(np.float64)
            expected = ((rows - coefficients[0]) * coefficients[1] + coefficients[2]).ravel()
            out = None if in_place else np.full_like(x, np.nan)
            space = aligned_full(3 * channels + groups, dtype(0))
            nhwc.apply_positions(x, out, 0, 0, positions, channels, groups, coefficients, space)
            error = np.abs((x if in_place else out) - expected).max() / np.abs(expected).max()
            worst = max(worst, float(error))
print(worst)
"""


@pytest.mark.slow
@pytest.mark.parametrize("limits", [(64, 512), (32, 128), (16, 128)])
def test_channels_last_group_rows_at_every_vector_width(tmp_path, limits):
    """NHWC rows of one position whose groups are whole 64-byte lines (C = 512, 1024, 2048), at
    every start within a line, in place and not: with 64-byte vectors they take
    ``apply_group_rows``, whose offset into a group is counted in lines; narrower vectors must not
    (they raised, or wrote wrong values, before ``nhwc.apply_positions`` checked the width)."""
    # Relative to the largest value; float32 rounds at 6e-8.
    assert _printed_at(GROUP_ROWS, limits, tmp_path) < 1e-6


def _describe_caches(root, *caches):
    """Write sysfs-like cache folders ``index0, ...`` of ``(level, type, size)`` under ``root``."""
    for i, (level, kind, size) in enumerate(caches):
        index = root / f"index{i}"
        index.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (index / name).write_text(f"{value}\n")


@pytest.mark.parametrize(
    ("caches", "expected"),
    [
        (((1, "Instruction", "32K"), (1, "Data", "48K"), (2, "Unified", "1024K")), 48 * 1024),
        (((2, "Unified", "512K"), (1, "Data", "32K")), 32 * 1024),
        (((1, "Unified", "64K"),), 64 * 1024),
        (((1, "Instruction", "64K"), (2, "Unified", "1024K")), 32 * 1024),  # no L1 data: assumed
        (((1, "Data", "big"),), 32 * 1024),  # unreadable size: assumed
    ],
)
def test_l1_data_bytes_read_from_sysfs(tmp_path, monkeypatch, caches, expected):
    _describe_caches(tmp_path, *caches)
    monkeypatch.setattr(simd, "_CACHE_INFO", tmp_path)
    assert simd._host_l1_data_bytes.__wrapped__() == expected


def test_l1_data_bytes_without_sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(simd, "_CACHE_INFO", tmp_path / "missing")
    assert simd._host_l1_data_bytes.__wrapped__() == 32 * 1024


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lane_sums_in_registers_match_float64_sums(dtype):
    """Every row length (in vectors) the switch has, row counts around the sets and the spills,
    any start: the sums of ``x - pivot`` and its square added to the lanes, nothing else written."""
    lanes_per_vector = simd._host_row_limits()[0] // np.dtype(dtype).itemsize
    rng = np.random.default_rng(1)
    run = numba.njit(lambda x, start, rows, count, lanes: simd.lane_sums_in_registers(
        x, start, rows, count, lanes))  # fmt: skip
    for count in range(1, simd._sum_row_vectors() + 1):
        sets = simd._sum_row_vectors() // count
        spill = simd.SPILL_ROWS
        for rows in sorted({0, 1, sets - 1, sets + 1, spill - 1, spill, spill + 1, 3 * spill + 5}):
            width = count * lanes_per_vector
            start = 3
            x = (rng.standard_normal(start + rows * width + 5) * 2 + 7).astype(dtype)
            lanes = np.zeros((3, width + 4), dtype)
            lanes[0, :width] = 7 + rng.standard_normal(width)
            lanes[1:, :width] = [[1.0], [2.0]]
            before = lanes.copy()
            run(x, start, rows, count, lanes)
            d = x[start : start + rows * width].reshape(rows, width).astype(np.float64)
            d -= before[0, :width].astype(np.float64)
            tolerance = 1e-4 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(lanes[1, :width], 1.0 + d.sum(0), rtol=tolerance,
                                       atol=tolerance * (1 + rows))  # fmt: skip
            np.testing.assert_allclose(lanes[2, :width], 2.0 + (d * d).sum(0), rtol=tolerance)
            np.testing.assert_array_equal(lanes[0], before[0])
            np.testing.assert_array_equal(lanes[:, width:], before[:, width:])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nhwc_lane_sums_take_the_registers_for_short_consecutive_rows(dtype):
    """``nhwc.lane_sums`` without streams, on rows of whole vectors short enough: the very sums of
    ``nhwc.register_lane_sums`` (the registers, compiled without fastmath), within rounding of the
    float64 sums; on float64 lanes of float32 values (float64 sums), its own loop."""
    from nbgn.kernels import nhwc

    lanes_per_vector = simd._host_row_limits()[0] // np.dtype(dtype).itemsize
    width = 2 * lanes_per_vector
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(100 * width) + 3e4).astype(dtype)
    lanes = np.zeros((3, width), dtype)
    lanes[0] = x[:width]
    registers = lanes.copy()
    nhwc.lane_sums(x, 0, width, 0, 100, lanes, 0)
    nhwc.register_lane_sums(x, 0, 100, 2, registers)
    np.testing.assert_array_equal(lanes, registers)
    d = x.reshape(100, width).astype(np.float64) - lanes[0]
    tolerance = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(lanes[1], d.sum(0), rtol=tolerance, atol=tolerance * 100)
    np.testing.assert_allclose(lanes[2], (d * d).sum(0), rtol=tolerance)
    wide = np.zeros((3, width))
    wide[0] = lanes[0]
    nhwc.lane_sums(x, 0, width, 0, 100, wide, 0)
    np.testing.assert_allclose(wide[1], d.sum(0), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_folded_lane_sums_match_float64_sums(dtype):
    """Every fold the switch has, four streams and one, any start, rows of several lane vectors:
    each lane vector gets the sums of ``x - pivot`` and its square over its ``fold`` vectors of
    every row, nothing else is written."""
    vector = simd._host_row_limits()[0] // np.dtype(dtype).itemsize
    rng = np.random.default_rng(3)
    run = numba.njit(lambda x, start, stride, rows, width, fold, lanes: simd.folded_lane_sums(
        x, start, stride, rows, width, fold, lanes))  # fmt: skip
    for fold in simd.FOLDS:
        width = 3 * fold * vector  # three lane vectors a row
        lane_width = width // fold
        for streams, rows in ((4, 0), (4, 1), (4, 5), (1, 1), (1, 7)):
            start = 5
            stride = (rows + 2) * width if streams == 4 else 0
            x = (rng.standard_normal(start + 4 * (rows + 2) * width) * 2 + 7).astype(dtype)
            table = np.zeros((3, lane_width), dtype)  # its rows are lane_width apart
            table[0] = np.repeat(7 + rng.standard_normal(3), vector)
            table[1:] = [[1.0], [2.0]]
            before = table.copy()
            run(x, start, stride, rows, width, fold, table)
            expected1 = np.ones(lane_width)
            expected2 = np.full(lane_width, 2.0)
            for k in range(streams):
                for r in range(rows):
                    row = x[start + k * stride + r * width :][:width].astype(np.float64)
                    d = row.reshape(3, fold, vector) - before[0].reshape(3, 1, vector)
                    expected1 += d.sum(1).ravel()
                    expected2 += (d * d).sum(1).ravel()
            tolerance = 1e-5 if dtype == np.float32 else 1e-13
            np.testing.assert_allclose(table[1], expected1, rtol=tolerance, atol=tolerance * 100)
            np.testing.assert_allclose(table[2], expected2, rtol=tolerance)
            np.testing.assert_array_equal(table[0], before[0])


def test_lane_fold_takes_the_largest_fold_dividing_a_group():
    fold = numba.njit(
        lambda x, lanes, channels_per_group: simd.lane_fold(x, lanes, channels_per_group)
    )
    vector = simd._host_row_limits()[0] // 4
    x = np.zeros(4, np.float32)
    lanes = np.zeros((3, 4), np.float32)
    assert fold(x, lanes, vector) == 1
    assert fold(x, lanes, 2 * vector) == 2
    assert fold(x, lanes, 3 * vector) == 1
    assert fold(x, lanes, 12 * vector) == 4
    assert fold(x, lanes, 64 * vector) == 4
    assert fold(x, lanes, vector + 1) == 0  # not whole vectors
    assert fold(x, np.zeros((3, 4)), vector) == 0  # float64 sums of float32 values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float64_run_sums(dtype):
    """Runs of one and several vectors from any start into one column of a float64 table, the
    other cells untouched; runs out of bounds or not whole vectors refused before any write."""
    vector = simd._host_row_limits()[0] // np.dtype(dtype).itemsize
    run = numba.njit(lambda values, start, length, runs, totals, column: simd.float64_run_sums(
        values, start, length, runs, totals, column))  # fmt: skip
    values = (np.random.default_rng(4).standard_normal(40 * vector + 7) * 1e30).astype(dtype)
    for length, runs, start in ((vector, 32, 3), (4 * vector, 9, 0), (3 * vector, 13, 7)):
        totals = np.full((runs + 2, 3), -1.0)
        run(values, start, length, runs, totals, 1)
        expected = values[start : start + runs * length].astype(np.float64)
        np.testing.assert_allclose(totals[:runs, 1], expected.reshape(runs, length).sum(1),
                                   rtol=1e-12)  # fmt: skip
        assert np.all(totals[:, [0, 2]] == -1.0)
        assert np.all(totals[runs:, 1] == -1.0)
    totals = np.full((4, 3), -1.0)
    for bad in ((0, vector + 1, 2, 0), (values.size - vector + 1, vector, 1, 0),
                (0, vector, 5, 0), (0, vector, 2, 3)):  # fmt: skip
        with pytest.raises(ValueError, match="float64_run_sums"):
            run(values, *bad[:3], totals, bad[3])
    assert np.all(totals == -1.0)


def test_folded_lane_sums_refuse_out_of_bounds_rows_and_lanes():
    """Rows past x's end (with and without streams), or a lane table too narrow or short,
    raise before any write."""
    vector = simd._host_row_limits()[0] // 4
    run = numba.njit(lambda x, start, stride, rows, width, fold, lanes: simd.folded_lane_sums(
        x, start, stride, rows, width, fold, lanes))  # fmt: skip
    x = np.ones(8 * vector, np.float32)
    lanes = np.zeros((3, 2 * vector), np.float32)
    for start, stride, rows, width, fold, table in (
        (1, 0, 4, 2 * vector, 1, lanes),  # one value past the end
        (0, 2 * vector, 2, 2 * vector, 1, lanes),  # the fourth stream past the end
        (-1, 0, 1, 2 * vector, 1, lanes),
        (0, 0, 1, 4 * vector, 1, lanes),  # rows wider than the lanes
        (0, 0, 1, 2 * vector, 1, lanes[:2].copy()),
        (0, 0, 1, 2 * vector, 3, lanes),  # not a fold
    ):
        with pytest.raises(ValueError, match="folded_lane_sums"):
            run(x, start, stride, rows, width, fold, table)
    assert np.all(lanes == 0.0)
    run(x, 0, 2 * vector, 1, 2 * vector, 1, lanes)  # the largest that fits: four rows
    np.testing.assert_array_equal(lanes[1], 4.0)


# simd.apply_group_rows is inlined into its callers: a jitted caller for the tests.
_apply_group_rows = numba.njit(
    lambda x, out, start, rows, vectors, groups, own, centers, scale, shift: simd.apply_group_rows(
        x, out, start, rows, vectors, groups, own, centers, scale, shift
    )
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_apply_group_rows_match_numpy(dtype, in_place):
    """Each run of a row takes its own center, but the last ``lanes - own_lanes`` lanes of its
    last vector (none to all of them) the next run's (the first run's after the last); scale and
    shift per lane. Every vector count, several runs and rows, a start past zero; nothing outside
    the rows is written."""
    lanes = simd._host_row_limits()[0] // np.dtype(dtype).itemsize
    run = _apply_group_rows
    rng = np.random.default_rng(7)
    for vectors in range(1, simd.MAX_GROUP_VECTORS + 1):
        for groups, own in ((1, lanes), (3, lanes), (3, 1), (3, 0), (5, lanes - 3)):
            rows, start = 3, 2 * lanes
            row_length = groups * vectors * lanes
            x = rng.standard_normal(start + rows * row_length + lanes).astype(dtype)
            centers = rng.standard_normal(groups).astype(dtype)
            scale = rng.standard_normal(row_length).astype(dtype)
            shift = rng.standard_normal(row_length).astype(dtype)
            lane_center = np.repeat(centers, vectors * lanes)
            for k in range(groups):  # the last vector's lanes past ``own``: the next run's
                last = (k + 1) * vectors * lanes - lanes
                lane_center[last + own : last + lanes] = centers[(k + 1) % groups]
            rows_of_x = x[start : start + rows * row_length].astype(np.float64).reshape(rows, -1)
            expected = (rows_of_x - lane_center) * scale + shift
            source = x.copy()
            out = None if in_place else np.full_like(x, np.nan)
            run(source, out, start, rows, vectors, groups, own, centers, scale, shift)
            result = source if in_place else out
            if dtype == np.float32:  # float64 lane tables (float64 sums): converted exactly
                again = x.copy()
                wide = [table.astype(np.float64) for table in (centers, scale, shift)]
                run(again, None, start, rows, vectors, groups, own, *wide)
                span = slice(start, start + rows * row_length)
                np.testing.assert_array_equal(again[span], result[span])
            got = result[start : start + rows * row_length].reshape(rows, -1)
            np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == np.float32 else 1e-13,
                                       atol=1e-5 if dtype == np.float32 else 1e-13)  # fmt: skip
            outside = np.r_[0:start, start + rows * row_length : x.size]
            if in_place:
                np.testing.assert_array_equal(result[outside], x[outside])
            else:
                assert np.isnan(result[outside]).all()


def test_apply_group_rows_refuse_bad_layouts_before_writing():
    vector = simd._host_row_limits()[0] // 4
    run = _apply_group_rows
    x = np.ones(8 * vector, np.float32)
    out = np.zeros_like(x)
    centers = np.zeros(2, np.float32)
    lane_table = np.ones(4 * vector, np.float32)
    for start, rows, vectors, groups, own, table, target in (
        (1, 2, 2, 2, vector, lane_table, out),  # one value past the end
        (-1, 1, 2, 2, vector, lane_table, out),
        (0, 1, simd.MAX_GROUP_VECTORS + 1, 1, vector, lane_table, out),
        (0, 1, 2, 2, -1, lane_table, out),  # fewer than no lanes of its own
        (0, 1, 2, 2, vector + 1, lane_table, out),
        (0, 1, 2, 3, vector, lane_table, out),  # more groups than centers
        (0, 1, 4, 2, vector, lane_table, out),  # rows longer than the lane tables
        (0, 1, 2, 2, vector, lane_table, out[:-1]),  # out smaller than x
    ):
        with pytest.raises(ValueError, match="apply_group_rows"):
            run(x, target, start, rows, vectors, groups, own, centers, table, table)
    assert np.all(out == 0.0)
    run(x, out, 0, 2, 2, 2, vector, centers, lane_table, lane_table)  # the largest that fits
    np.testing.assert_array_equal(out, 2.0)


_apply_channels = numba.njit(
    lambda x, out, start, channels, spatial, coefficients: simd.apply_channels(
        x, out, start, channels, spatial, coefficients
    )
)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_channels_match_numpy_in_place_and_not(dtype):
    """Channel ``k`` of the run takes column ``k`` of the coefficients, ``(x - center) * scale +
    shift``: channels of one vector to several with a tail, one channel and several, a start off
    a vector; in place (last channel first) and out of place (first first) the very same bits, and
    nothing outside the run written."""
    rng = np.random.default_rng(17)
    lanes = simd._host_row_limits()[0] // np.dtype(dtype).itemsize
    for spatial in (lanes, lanes + 1, 3 * lanes - 1, 49):
        for channels in (1, 2, 5):
            start, length = 3, channels * spatial
            x = (rng.standard_normal(start + length + 5) * 2 + 40).astype(dtype)
            coefficients = np.stack([rng.standard_normal(channels) + 40,
                                     rng.random(channels) + 0.5,
                                     rng.standard_normal(channels)]).astype(dtype)  # fmt: skip
            run = x[start : start + length].astype(np.float64).reshape(channels, spatial)
            center, scale, shift = (coefficients[i, :, None].astype(np.float64) for i in range(3))
            expected = (run - center) * scale + shift
            out = np.full_like(x, np.nan)
            _apply_channels(x, out, start, channels, spatial, coefficients)
            got = out[start : start + length].reshape(channels, spatial)
            np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == np.float32 else 1e-13)
            assert np.isnan(np.r_[out[:start], out[start + length :]]).all()
            in_place = x.copy()
            _apply_channels(in_place, None, start, channels, spatial, coefficients)
            np.testing.assert_array_equal(in_place[start : start + length],
                                          out[start : start + length])  # fmt: skip
            np.testing.assert_array_equal(in_place[:start], x[:start])
            np.testing.assert_array_equal(in_place[start + length :], x[start + length :])


@numba.njit
def _apply_channel_windows(x, out, start, channels, spatial, mean_hi, mean_lo, rstd, weight, bias,
                           first, table, lanes):  # fmt: skip
    simd.apply_channel_windows(x, out, start, channels, spatial, mean_hi, mean_lo, rstd, weight,
                               bias, first, table, lanes)  # fmt: skip


_window_table = numba.njit(lambda spatial, lanes: simd.window_table(spatial, lanes))


def _window_widths(dtype):
    """The host's window widths for ``dtype`` (skips where it has none)."""
    widths = [w for w in simd.host_window_widths(np.dtype(dtype).itemsize) if w]
    if not widths:
        pytest.skip("this host has no vector permutes for this dtype")
    return widths


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_apply_channel_windows_match_numpy(dtype, in_place):
    """Channel ``k`` of the run takes ``fold_channel`` of weight and bias ``first + k`` (computed
    here in float64 from the same mean and rstd); every window width of the host (a vector's
    channels, and half a vector's where it has the permute); channels shorter than a vector, of
    one, and of odd lengths; one and several windows; a start past zero; nothing outside the run
    written."""
    rng = np.random.default_rng(11)
    tolerance = 1e-5 if dtype == np.float32 else 1e-13
    for lanes in _window_widths(dtype):
        for spatial in (1, 3, 9, 16, 17, 49, 64):
            table = _window_table(spatial, lanes)
            assert table.ctypes.data % 64 == 0
            np.testing.assert_array_equal(table, np.arange(spatial * lanes) // spatial)
            for windows in (1, 3):
                channels, start, first = windows * lanes, 5, 3
                length = channels * spatial
                x = (rng.standard_normal(start + length + 7) * 2 + 40).astype(dtype)
                weight = rng.standard_normal(first + channels + 2).astype(dtype)
                bias = rng.standard_normal(first + channels + 2).astype(dtype)
                mean_hi, mean_lo, rstd = 40.123456789, 1e-15, 0.4871
                run = x[start : start + length].astype(np.float64).reshape(channels, spatial)
                w = weight[first : first + channels, None].astype(np.float64)
                b = bias[first : first + channels, None].astype(np.float64)
                expected = (run - (mean_hi + mean_lo)) * rstd * w + b
                source = x.copy()
                out = None if in_place else np.full_like(x, np.nan)
                _apply_channel_windows(source, out, start, channels, spatial, mean_hi, mean_lo,
                                       rstd, weight, bias, first, table, lanes)  # fmt: skip
                result = source if in_place else out
                got = result[start : start + length].reshape(channels, spatial)
                np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
                outside = np.r_[0:start, start + length : x.size]
                if in_place:
                    np.testing.assert_array_equal(result[outside], x[outside])
                else:
                    assert np.isnan(result[outside]).all()


def test_apply_channel_windows_refuse_bad_layouts_before_writing():
    lanes = _window_widths(np.float32)[0]
    spatial = 3
    x = np.ones(2 * lanes * spatial, np.float32)
    out = np.zeros_like(x)
    weight = np.ones(2 * lanes, np.float32)
    table = _window_table(spatial, lanes)
    for start, channels, first, target, lane_table, width in (
        (0, lanes + 1, 0, out, table, lanes),  # not whole windows
        (1, 2 * lanes, 0, out, table, lanes),  # one value past the end
        (-1, lanes, 0, out, table, lanes),
        (0, lanes, lanes + 1, out, table, lanes),  # past the weights
        (0, lanes, -1, out, table, lanes),
        (0, 2 * lanes, 0, out[:-1], table, lanes),  # out smaller than x
        (0, lanes, 0, out, table[:-1], lanes),  # a table too short for the channels' length
        (0, lanes, 0, out, table, 0),  # no width
        (0, lanes, 0, out, table, lanes // 4),  # a width the host has no permute for
    ):
        with pytest.raises(ValueError, match="apply_channel_windows"):
            _apply_channel_windows(x, target, start, channels, spatial, 0.5, 0.0, 2.0, weight,
                                   weight, first, lane_table, width)  # fmt: skip
    assert np.all(out == 0.0)
    _apply_channel_windows(x, out, 0, 2 * lanes, spatial, 0.5, 0.0, 2.0, weight, weight, 0, table,
                           lanes)  # fmt: skip
    np.testing.assert_array_equal(out, 2.0)  # (1 - 0.5) * 2 * 1 + 1, the largest that fits


# simd.apply_streamed and simd.streams are inlined into their callers: jitted callers for the tests.
_apply_streamed = numba.njit(
    lambda x, out, start, stop, center, scale, shift: simd.apply_streamed(
        x, out, start, stop, center, scale, shift
    )
)
_apply_reversed = numba.njit(
    lambda x, out, start, stop, center, scale, shift: moments.apply_reversed(
        x, out, start, stop, center, scale, shift
    )
)
_streams = numba.njit(lambda x, out: simd.streams(x, out))


def _aligned_view(length, dtype, skip):
    """A ``length``-value view ``skip`` values past a 64-byte boundary, in a NaN-filled buffer."""
    buffer = np.full(length + 128 // np.dtype(dtype).itemsize, np.nan, dtype)
    first = past_line(buffer, skip)
    return buffer[first : first + length]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_streamed_matches_apply_reversed(dtype):
    """Runs at every offset from the output's vectors, of no values, fewer than a vector, whole
    vectors and more than a chunk: bitwise the values of ``moments.apply_reversed`` (the same
    roundings), nothing outside the run written."""
    lanes = simd._host_row_limits()[0] // np.dtype(dtype).itemsize
    rng = np.random.default_rng(11)
    coefficients = (dtype(0.7), dtype(1.3), dtype(-0.2))
    for length in (0, 1, lanes - 1, lanes, 5 * lanes + 3, moments.APPLY_CHUNK + 2 * lanes + 7):
        for skip in range(lanes):
            for start in (0, 3):
                x = rng.standard_normal(start + length + 5).astype(dtype)
                out = _aligned_view(x.size, dtype, skip)
                _apply_streamed(x, out, start, start + length, *coefficients)
                expected = np.full_like(x, np.nan)
                _apply_reversed(x, expected, start, start + length, *coefficients)
                np.testing.assert_array_equal(out, expected)


def test_apply_streamed_refuses_bad_runs_before_writing():
    x = np.ones(64, np.float32)
    out = np.zeros_like(x)
    raw = np.zeros(x.nbytes + 4, np.uint8)
    unaligned = raw[1 : 1 + x.nbytes].view(np.float32)
    for target, start, stop in ((out, -1, 8), (out, 0, 65), (out[:32], 0, 8), (unaligned, 0, 8)):
        with pytest.raises(ValueError, match="apply_streamed"):
            _apply_streamed(x, target, start, stop, np.float32(0), np.float32(1), np.float32(0))
        assert not target.any()


def test_streams_from_three_quarters_of_the_l3():
    """Out of place, from ``STREAM_L3_FRACTION`` of the L3 in input and output together; never in
    place, nor into an output not aligned to its items. (Arrays this large are left untouched:
    the OS maps no pages for them.)"""
    limit = simd._host_stream_bytes()
    if limit is None:
        pytest.skip("this host describes no L3, or is not x86-64: nothing streams")
    values = limit // 8  # float32 values in each of x and out at the limit
    x = np.empty(values, np.float32)
    assert _streams(x, np.empty(values, np.float32))
    assert not _streams(x, np.empty(values - 1, np.float32))
    assert not _streams(x, None)
    raw = np.empty(4 * values + 4, np.uint8)
    assert not _streams(x, raw[1 : 1 + 4 * values].view(np.float32))


@pytest.mark.parametrize(
    ("caches", "expected"),
    [
        (((1, "Data", "32K"), (2, "Unified", "1024K"), (3, "Unified", "32768K")), 24 << 20),
        (((3, "Unified", "96M"),), None),  # unreadable size
        (((1, "Data", "48K"), (2, "Unified", "2048K")), None),  # no L3
    ],
)
def test_stream_bytes_read_from_sysfs(tmp_path, monkeypatch, caches, expected):
    if simd._host_stream_bytes() is None:
        pytest.skip("not x86-64, or compiling for a named CPU: nothing streams, whatever the L3")
    _describe_caches(tmp_path, *caches)
    monkeypatch.setattr(simd, "_CACHE_INFO", tmp_path)
    assert simd._host_stream_bytes.__wrapped__() == expected


# simd.apply_streamed_rows and simd.streamed_rows_skew are inlined into their callers, as above.
_apply_streamed_rows = numba.njit(
    lambda x, out, start, rows, width, center, scale, shift: simd.apply_streamed_rows(
        x, out, start, rows, width, center, scale, shift
    )
)
_streamed_rows_skew = numba.njit(
    lambda x, out, start, width: simd.streamed_rows_skew(x, out, start, width)
)


@numba.njit(fastmath={"contract"})  # one fma a value, as nhwc.apply_positions' loops
def _apply_lane_rows(x, out, start, rows, width, center, scale, shift):
    for r in range(rows):
        for j in range(width):
            i = start + r * width + j
            out[i] = (x[i] - center[j]) * scale[j] + shift[j]


def _skip_unless_streaming():
    if simd._host_stream_bytes() is None:
        pytest.skip("this host describes no L3, or is not x86-64: nothing streams")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_streamed_rows_match_the_lane_loop(dtype):
    """Rows of one to 40 lines, none to several, from a 64-byte line of ``out`` that ``x`` need
    not share: bitwise the values of the rows' loop in ``nhwc.apply_positions`` (one fma a
    value), nothing outside the rows written."""
    _skip_unless_streaming()
    line = 64 // np.dtype(dtype).itemsize
    rng = np.random.default_rng(12)
    for width in (line, 3 * line, 40 * line):
        center, scale, shift = (rng.standard_normal(width).astype(dtype) for _ in range(3))
        for rows in (0, 1, 5):
            for x_skip in (0, 1):
                size = 3 * line + rows * width + 5
                x = _aligned_view(size, dtype, x_skip)
                x[:] = rng.standard_normal(size)
                out = _aligned_view(size, dtype, 0)
                _apply_streamed_rows(x, out, 2 * line, rows, width, center, scale, shift)
                expected = np.full_like(x, np.nan)
                _apply_lane_rows(x, expected, 2 * line, rows, width, center, scale, shift)
                np.testing.assert_array_equal(out, expected)


def test_apply_streamed_rows_refuse_bad_rows_before_writing():
    """In place, a row off out's 64-byte lines, rows of part of a line, rows past the end, an
    output of another size, lanes shorter than a row: ValueError, nothing written."""
    _skip_unless_streaming()
    lanes = np.ones(32, np.float32)
    x = np.ones(256, np.float32)
    out = _aligned_view(256, np.float32, 0)
    out[:] = 0.0
    for target, start, rows, width, lane in (
        (out, 1, 1, 16, lanes),  # off a line
        (out, 0, 1, 8, lanes),  # half a line a row
        (out, 0, 1, 0, lanes),  # empty rows
        (out, 16, 8, 32, lanes),  # past the end
        (out, -16, 1, 16, lanes),
        (out[:128], 0, 1, 16, lanes),  # not x's size
        (out, 0, 1, 32, lanes[:16]),  # lanes shorter than a row
    ):
        with pytest.raises(ValueError, match="apply_streamed_rows"):
            _apply_streamed_rows(x, target, start, rows, width, lane, lane, lane)
        assert not out.any()
    with pytest.raises(ValueError, match="apply_streamed_rows: nothing streams in place"):
        _apply_streamed_rows(x, None, 0, 1, 16, lanes, lanes, lanes)
    np.testing.assert_array_equal(x, 1.0)


def test_streamed_rows_start_on_out_lines_past_the_limit():
    """``streamed_rows_skew``: where ``streams`` and rows of whole 64-byte lines, the values up
    to out's next line (whatever x's alignment); -1 in place, below the limit, and for rows of
    part of a line. (Arrays this large are left untouched: the OS maps no pages for them.)"""
    _skip_unless_streaming()
    values = simd._host_stream_bytes() // 8  # float32 values in each of x and out at the limit
    x = np.empty(values, np.float32)
    buffer = np.empty(values + 32, np.float32)
    for skip in (0, 1, 15):
        out = buffer[past_line(buffer, skip) :][:values]
        for start in (0, 5, 16):
            skew = _streamed_rows_skew(x, out, start, 512)
            assert 0 <= skew < 16
            assert (out.ctypes.data + (start + skew) * 4) % 64 == 0
        assert _streamed_rows_skew(x, out, 0, 520) == -1  # rows of 32.5 lines
    assert _streamed_rows_skew(x, None, 0, 512) == -1
    assert _streamed_rows_skew(x[1:], buffer[: values - 1], 0, 512) == -1


def test_streamed_stores_are_non_temporal():
    """The streamed vectors compile to non-temporal stores (``movntps``/``movntpd`` on x86), and
    every kernel that may issue them, NCHW and NHWC, fences them (``sfence``) before its thread is
    done."""
    if simd._host_stream_bytes() is None:
        pytest.skip("this host describes no L3, or is not x86-64: nothing streams")
    streamed = re.compile(r"\bv?movntp[sd]\b")
    for dtype in (np.float32, np.float64):
        run = numba.njit(_apply_streamed.py_func)  # compiled here: cached code cannot be inspected
        x = np.ones(256, dtype)
        run(x, np.empty_like(x), 0, x.size, dtype(0.5), dtype(2.0), dtype(1.0))
        assert streamed.search(run.inspect_asm(run.signatures[-1])), dtype
    x = np.linspace(-1.0, 1.0, 2 * 16 * 64).astype(np.float32)
    weight, bias = np.ones(16, np.float32), np.zeros(16, np.float32)
    zero = np.float32(0)
    partial = np.array([[512.0, 0.0, 100.0]] * 4)
    out = np.empty_like(x)
    affine = (weight, bias, 1e-5)
    progress, together_partial, refs, started = nhwc.cooperative_scratch(x, 2, 64, 16, 2, 1)
    # thread 0 of 1, with the cooperative kernel's counters and scratch
    together = (x, out, 2, 64, 16, 2, *affine, zero, 0, 1, progress, together_partial, refs,
                started)  # fmt: skip
    calls = {
        nchw.normalize_slabs: (x, out, 0, 4, 16, 64, 2, *affine, zero),
        nchw.normalize_slabs_patterned: (x, out, 0, 4, 2, 16, 64, 2, *affine, zero),
        nchw.apply_part: (x, out, partial, np.zeros(2), 16, 64, 2, 2, 1, *affine),
        # NHWC: 2 samples of 64 positions of 16 channels, 2 groups
        nhwc.normalize_samples: (x, out, 0, 2, 64, 16, 2, *affine, zero),
        nhwc.apply_part: (x, out, partial, np.zeros(4), 64, 16, 2, 2, 1, *affine),
        nhwc.normalize_samples_together: together,
    }
    for kernel, arguments in calls.items():
        run = numba.njit(kernel.py_func)
        run(*arguments)
        code = run.inspect_asm(run.signatures[-1])
        assert streamed.search(code), kernel.__name__
        assert re.search(r"\bsfence\b", code), kernel.__name__
