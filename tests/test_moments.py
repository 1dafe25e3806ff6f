"""group_moments: float64 (N, num_groups) mean and population variance, both layouts."""

import numpy as np
import pytest
from reference import make_input, reference_moments

import nbgn


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "groups"), [((3, 8), 2), ((2, 8, 5), 4), ((4, 6, 9, 7), 3), ((1, 16, 128, 64), 4)]
)
def test_matches_reference(rng, shape, groups, dtype, layout):
    x = make_input(shape, layout, dtype, rng, scale=3.0, offset=-2.0)
    mean, var = nbgn.group_moments(x, groups, layout=layout)
    ref_mean, ref_var = reference_moments(x, groups, layout)
    assert mean.dtype == var.dtype == np.float64
    assert mean.shape == var.shape == (shape[0], groups)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(var, ref_var, rtol=1e-12)


def test_population_variance_ddof_0():
    x = np.array([[[1.0, 2.0, 3.0, 4.0]]])
    mean, var = nbgn.group_moments(x, 1)
    assert mean[0, 0] == 2.5
    assert var[0, 0] == 1.25


def test_empty_spatial_gives_nan_and_empty_batch_gives_empty():
    mean, var = nbgn.group_moments(np.empty((2, 4, 0)), 2)
    assert mean.shape == (2, 2)
    assert np.isnan(mean).all()
    assert np.isnan(var).all()
    mean, var = nbgn.group_moments(np.empty((0, 4, 3), np.float32), 2)
    assert mean.shape == (0, 2)


def test_leaves_input_untouched(rng):
    x = make_input((2, 8, 6, 6), "NCHW", np.float32, rng)
    copy = x.copy()
    nbgn.group_moments(x, 4)
    np.testing.assert_array_equal(x, copy)
