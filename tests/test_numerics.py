"""Hostile data: the single-pass variance stays exact where the textbook formula collapses."""

import numpy as np
import pytest
from reference import reference_group_norm, reference_moments

import nbgn


def _far_from_zero(dtype, mean, std, shape=(2, 4, 64, 64), seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * std + mean).astype(dtype)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 4, 192, 192)])  # serial; parallel split
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
@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 4, 192, 192)])
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
