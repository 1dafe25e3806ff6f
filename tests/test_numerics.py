"""Hostile data: the single-pass variance stays exact where the textbook formula collapses."""

import numpy as np
import pytest
from reference import from_channels_first, reference_group_norm, reference_moments

import nbgn


def _far_from_zero(dtype, mean, std, shape=(2, 4, 64, 64), seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * std + mean).astype(dtype)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 4, 256, 256)])  # serial; parallel split
def test_float32_mean_3e4_std_1e_2(layout, shape):
    x = _far_from_zero(np.float32, 3e4, 1e-2, shape)
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    expected = reference_group_norm(x, 1, layout=layout)
    error = np.abs(nbgn.group_norm(x, 1, layout=layout) - expected).max()
    assert error <= 1e-5
    y = x.copy()
    nbgn.group_norm(y, 1, layout=layout, out=y)
    assert np.abs(y - expected).max() <= 1e-5


def test_float32_naive_formula_fails_there():
    """Documents why: E[x^2] - E[x]^2 in float32 has no correct digits at mean 3e4, std 1e-2."""
    x = _far_from_zero(np.float32, 3e4, 1e-2).reshape(2, -1)
    naive_var = (x * x).mean(axis=1, dtype=np.float32) - x.mean(axis=1, dtype=np.float32) ** 2
    _, true_var = reference_moments(x[:, None], 1)
    assert np.all(np.abs(naive_var - true_var[:, 0]) > 0.5 * true_var[:, 0])


def test_torch_float32_is_off_there():
    torch = pytest.importorskip("torch")
    x = _far_from_zero(np.float32, 3e4, 1e-2)
    expected = reference_group_norm(x, 1)
    torch_error = np.abs(torch.nn.functional.group_norm(torch.from_numpy(x), 1).numpy() - expected)
    assert torch_error.max() > 1e-3  # PyTorch folds x * scale + shift and loses the digits
    assert np.abs(nbgn.group_norm(x, 1) - expected).max() < torch_error.max() / 100


def _symmetric_about(center, shape, seed=0):
    """Data whose exact mean is ``center`` (pairs +d, -d), so a float64 reference can be exact."""
    rng = np.random.default_rng(seed)
    n, c = shape[:2]
    half = rng.standard_normal((n, c // 2, *shape[2:]))
    x = center + np.concatenate([half, -half], axis=1)
    return x[:, rng.permutation(c)]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 4, 256, 256)])  # serial; parallel split
def test_float64_mean_1e8_std_1(layout, shape):
    x = _symmetric_about(1e8, shape)
    assert np.all(x.reshape(shape[0], -1).mean(axis=1) == 1e8)
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    expected = reference_group_norm(x, 1, layout=layout)
    assert np.abs(nbgn.group_norm(x, 1, layout=layout) - expected).max() <= 1e-9


def test_float64_mean_1e8_when_the_mean_is_not_representable():
    """nbgn carries the mean as an exact two-part sum: its output is closer to the exact result
    than the float64 reference's own rounding of the mean (up to 7.5e-9 at 1e8)."""
    from fractions import Fraction

    x = np.random.default_rng(3).standard_normal(4096) + 1e8
    exact_mean = sum(Fraction(v) for v in x) / x.size
    deviations = np.array([float(Fraction(v) - exact_mean) for v in x])
    expected = deviations / np.sqrt(np.mean(deviations**2) + 1e-5)
    result = nbgn.group_norm(x.reshape(1, 1, -1), 1).ravel()
    assert np.abs(result - expected).max() <= 1e-9


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_moments_relative_error_on_hostile_data(dtype, layout):
    mean, std = (3e4, 1e-2) if dtype == np.float32 else (1e8, 1.0)
    x = _far_from_zero(dtype, mean, std)
    if layout == "NHWC":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    got_mean, got_var = nbgn.group_moments(x, 2, layout=layout)
    ref_mean, ref_var = reference_moments(x, 2, layout)
    np.testing.assert_allclose(got_mean, ref_mean, rtol=1e-15, atol=0)
    np.testing.assert_allclose(got_var, ref_var, rtol=1e-9)


def test_outlier_pivot_stays_exact():
    """A group whose first value is an outlier far from everything else."""
    x = np.full((1, 2, 50_000), 1e6, dtype=np.float64)
    x[0, :, 1:] += np.random.default_rng(1).standard_normal((2, 49_999)) * 1e-3
    x[0, 0, 0] = -1e9
    got_mean, got_var = nbgn.group_moments(x, 2)
    ref_mean, ref_var = reference_moments(x, 2)
    np.testing.assert_allclose(got_var, ref_var, rtol=1e-9)
    # What matters for the output is the mean's error in units of the group's spread.
    assert np.all(np.abs(got_mean - ref_mean) <= 1e-12 * np.sqrt(ref_var))
    # Group 0, the outlier's; group 1 (mean/std = 1e9) is past what a float64 reference resolves.
    expected = reference_group_norm(x, 2)[:, 0]
    assert np.abs(nbgn.group_norm(x, 2)[:, 0] - expected).max() <= 1e-9


# float32 inputs have their moments summed in float32 blocks (see nbgn/kernels/moments.py); the
# tests below hold the guards that keep that exact: a pivot far from a block's mean is replaced,
# a sum that overflows float32 is redone in float64, and a near-zero eps keeps float64 sums.


def _in_layout(x, layout):
    """``x`` (N, C, *spatial) as a C-contiguous array in ``layout``."""
    return np.ascontiguousarray(from_channels_first(x, layout))


def _assert_close_to_reference(x, groups, layout, tolerance, eps=1e-5):
    """Both the allocating and the in-place result within ``tolerance`` of the reference, in units
    of the output (relative where the output is larger than 1)."""
    expected = reference_group_norm(x, groups, eps=eps, layout=layout)
    scale = np.maximum(1.0, np.abs(expected))
    result = nbgn.group_norm(x, groups, eps=eps, layout=layout)
    assert (np.abs(result - expected) / scale).max() <= tolerance
    y = x.copy()
    nbgn.group_norm(y, groups, eps=eps, layout=layout, out=y)
    assert (np.abs(y - expected) / scale).max() <= tolerance


SERIAL_AND_PARALLEL = [(2, 4, 32, 32), (1, 8, 128, 128)]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", SERIAL_AND_PARALLEL)
def test_float32_outlier_pivot_is_replaced(shape, layout):
    """The group's first value, the first pivot, is 1000 standard deviations away from the rest:
    float32 sums about it would lose ~1e-3 of the variance to rounding."""
    x = _far_from_zero(np.float32, 3e4, 1e-2, shape, seed=4)
    x[:, 0, 0, 0] = 3e4 + 10.0
    _assert_close_to_reference(_in_layout(x, layout), 1, layout, 2e-5)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", SERIAL_AND_PARALLEL)
def test_float32_jump_between_blocks(shape, layout):
    """A group whose first half sits at 0 and second half at 1e4 (std 1e-2 each): the pivot taken
    from the first values is far from the later blocks' means."""
    x = _far_from_zero(np.float32, 0.0, 1e-2, shape, seed=5)
    x[:, shape[1] // 2 :] += np.float32(1e4)
    _assert_close_to_reference(_in_layout(x, layout), 1, layout, 2e-5)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", SERIAL_AND_PARALLEL)
def test_float32_spread_beyond_float32_squares(shape, layout):
    """Spread 1e25: squared deviations overflow float32, so those sums are redone in float64."""
    x = _far_from_zero(np.float32, 0.0, 1e25, shape, seed=6)
    _assert_close_to_reference(_in_layout(x, layout), 2, layout, 2e-5)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [(1, 32, 8, 8), (1, 8, 256, 256)])  # serial; parallel
def test_float32_values_near_the_float32_limit(shape, layout):
    """Values of 1e38 to 1.1e38, 4 channels a group: a group's sum is beyond float32's range, so
    nothing may add values up in float32 (the first NHWC pivots, a mean over each group's channels
    at the first position, once came out inf and the groups NaN)."""
    rng = np.random.default_rng(8)
    x = _in_layout(rng.uniform(1.0e38, 1.1e38, shape).astype(np.float32), layout)
    groups = shape[1] // 4
    _assert_close_to_reference(x, groups, layout, 2e-5)
    mean, var = nbgn.group_moments(x, groups, layout=layout)
    expected_mean, expected_var = reference_moments(x, groups, layout)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(var, expected_var, rtol=1e-9)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", SERIAL_AND_PARALLEL)
def test_float32_tiny_spread_with_eps_zero(shape, layout):
    """Spread 1e-25 and eps=0: squared deviations underflow float32, so the sums stay float64 and
    the output has unit variance, not the exact bias of a constant group."""
    x = _in_layout(_far_from_zero(np.float32, 1e-20, 1e-25, shape, seed=7), layout)
    _assert_close_to_reference(x, 2, layout, 2e-5, eps=0.0)
    _, var = nbgn.group_moments(nbgn.group_norm(x, 2, eps=0.0, layout=layout), 2, layout=layout)
    np.testing.assert_allclose(var, 1.0, rtol=1e-5)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_error_is_at_the_output_rounding_level(dtype, layout):
    """Ordinary data, many blocks per group: the error stays within a few output ulps."""
    x = _far_from_zero(dtype, 5.0, 3.0, (2, 8, 96, 96), seed=8)
    expected = from_channels_first(reference_group_norm(x, 2), layout)
    ulp = np.finfo(dtype).eps * np.abs(expected).max()
    error = np.abs(nbgn.group_norm(_in_layout(x, layout), 2, layout=layout) - expected).max()
    assert error <= 8 * ulp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nhwc_rows_summed_in_registers_on_hostile_data(dtype):
    """NHWC rows whose lane sums stay in registers (12 channels: rows of whole vectors of 4 or 2
    positions in float32, 2 or 1 in float64, with AVX-512 or AVX2), over several blocks of
    ``nhwc.REGISTER_BLOCK_ROWS`` rows and positions that fill no row, on data far from zero that
    jumps by 1e6 standard deviations halfway: a later block must move its pivot."""
    from nbgn.kernels import nhwc

    mean, std, tolerance = (3e4, 1e-2, 2e-5) if dtype == np.float32 else (1e8, 1.0, 1e-7)
    shape = (2, 12, 97, 89)  # 8633 positions: not a multiple of 2 or 4
    assert 2 * nhwc.REGISTER_BLOCK_ROWS < 8633 // 4
    x = _far_from_zero(dtype, mean, std, shape, seed=9)
    x[:, :, 49:] += dtype(1e6 * std)
    for groups in (2, 3, 6):
        _assert_close_to_reference(_in_layout(x, "NHWC"), groups, "NHWC", tolerance)


def test_nhwc_rows_summed_in_registers_redone_in_float64():
    """Spread 1e25 in rows summed in registers, with positions that fill no row: the squares
    overflow float32, and those blocks are summed again in float64 (one stream, and the leftover)."""
    x = _far_from_zero(np.float32, 0.0, 1e25, (1, 12, 33, 31), seed=10)
    _assert_close_to_reference(_in_layout(x, "NHWC"), 3, "NHWC", 2e-5)


# (C, groups, positions): lcm(C, 16) > 128 float32, so the rows go in sweeps; each group whole
# vectors, folded 1 (C = 512), 2 (C = 256) and 4 (C = 768, 4 groups: 12 vectors) vectors to a lane
# vector in float32, 2, 4 and 4 in float64. 437 positions: several blocks of SWEEPS_PER_BLOCK sweeps and
# leftover positions; 3 positions: no sweep, a block of leftovers only.
FOLDED_CASES = [(512, 32, (19, 23)), (256, 8, (19, 23)), (768, 4, (19, 23)), (512, 32, (1, 3))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", FOLDED_CASES)
def test_nhwc_folded_lanes_on_hostile_data(case, dtype):
    """NHWC groups of whole vectors, their vectors folded into a few lanes
    (``simd.folded_lane_sums``), on data far from zero that jumps by 1e6 standard deviations
    halfway along H: each sweep takes rows from four quarters of the positions, so every block
    holds both levels, and its float32 sums must keep the spread's digits. One sample (split
    across threads) and two (whole samples)."""
    from nbgn.kernels import nhwc, simd

    channels, groups, spatial = case
    mean, std, tolerance = (3e4, 1e-2, 2e-5) if dtype == np.float32 else (1e8, 1.0, 1e-7)
    vector = simd._host_row_limits()[0] // np.dtype(dtype).itemsize
    assert (channels // groups) % vector == 0
    positions = spatial[0] * spatial[1]
    assert positions < 4 or positions // 4 > 2 * nhwc.SWEEPS_PER_BLOCK
    for samples in (1, 2):
        x = _far_from_zero(dtype, mean, std, (samples, channels, *spatial), seed=11)
        x[:, :, spatial[0] // 2 :] += dtype(1e6 * std)
        _assert_close_to_reference(_in_layout(x, "NHWC"), groups, "NHWC", tolerance)
        got_mean, got_var = nbgn.group_moments(_in_layout(x, "NHWC"), groups, layout="NHWC")
        ref_mean, ref_var = reference_moments(_in_layout(x, "NHWC"), groups, "NHWC")
        np.testing.assert_allclose(got_var, ref_var, rtol=1e-7 if dtype == np.float32 else 1e-9)
        assert np.all(np.abs(got_mean - ref_mean) <= 1e-6 * np.sqrt(ref_var))


@pytest.mark.parametrize("shape", [(1, 256, 19, 23), (2, 512, 1, 3)])
def test_nhwc_folded_lanes_redone_in_float64(shape):
    """Spread 1e25 in folded lanes: the squares overflow float32, and those blocks are summed
    again in float64 (sweeps with leftover positions; a block of leftovers only)."""
    x = _far_from_zero(np.float32, 0.0, 1e25, shape, seed=12)
    _assert_close_to_reference(_in_layout(x, "NHWC"), 8, "NHWC", 2e-5)


def test_nhwc_folded_first_pivots_near_the_float32_limit():
    """Values of 1e38 to 1.1e38 in groups of 32 channels: the first pivots, each group's mean at
    the first position (``simd.float64_run_sums``), are summed in float64, not to inf."""
    x = np.random.default_rng(13).uniform(1.0e38, 1.1e38, (1, 256, 5, 7)).astype(np.float32)
    x = _in_layout(x, "NHWC")
    _assert_close_to_reference(x, 8, "NHWC", 2e-5)
    mean, var = nbgn.group_moments(x, 8, layout="NHWC")
    expected_mean, expected_var = reference_moments(x, 8, "NHWC")
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-12)
    np.testing.assert_allclose(var, expected_var, rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("channels", "groups"), [(256, 8), (768, 4), (2048, 32)])
def test_nhwc_folded_lanes_move_and_redo_pivots(channels, groups, dtype):
    """Folded lanes whose pivots change between blocks. Groups of different means with the first
    position 1000 standard deviations out: every group's first pivot (its mean there) is far from
    its data, so the first block moves the pivots and spreads them over the folded lanes again.
    In float32, a value of 1e20 in the first block instead: that block is redone in float64, and
    the later ones sum in float32 about the pivots it leaves. One sample and two."""
    mean, std, tolerance = (3e4, 1e-1, 2e-5) if dtype == np.float32 else (1e8, 1.0, 1e-9)
    rng = np.random.default_rng(14)
    group_means = mean + 50.0 * np.arange(groups)
    for samples in (1, 2):
        x = rng.standard_normal((samples, channels, 19, 23)) * std
        x += np.repeat(group_means, channels // groups)[None, :, None, None]
        far_first = x.copy()
        far_first[:, :, 0, 0] += 1000 * std
        _assert_close_to_reference(_in_layout(far_first.astype(dtype), "NHWC"), groups, "NHWC",
                                   tolerance)  # fmt: skip
        if dtype == np.float64:
            got_mean, got_var = nbgn.group_moments(_in_layout(far_first, "NHWC"), groups,
                                                   layout="NHWC")  # fmt: skip
            ref_mean, ref_var = reference_moments(_in_layout(far_first, "NHWC"), groups, "NHWC")
            np.testing.assert_allclose(got_var, ref_var, rtol=1e-9)
            assert np.all(np.abs(got_mean - ref_mean) <= 1e-9 * np.sqrt(ref_var))
        else:
            overflowing = x.copy()
            overflowing[:, 0, 0, 5] = 1e20
            _assert_close_to_reference(_in_layout(overflowing.astype(dtype), "NHWC"), groups,
                                       "NHWC", tolerance)  # fmt: skip
