"""nbgn.baseline: the vectorized NumPy implementation agrees with the reference and with nbgn."""

import numpy as np
import pytest
from reference import make_input, reference_group_norm, reference_moments

import nbgn


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 8), (2, 8, 7), (2, 8, 6, 5)])
def test_baseline_matches_reference(rng, shape, dtype, layout):
    x = make_input(shape, layout, dtype, rng)
    weight, bias = rng.standard_normal(8), rng.standard_normal(8)
    expected = reference_group_norm(x, 2, weight, bias, 1e-5, layout)
    atol = 1e-4 if dtype == np.float32 else 1e-12
    result = nbgn.baseline.group_norm(x, 2, weight, bias, layout=layout)
    assert result.dtype == dtype
    np.testing.assert_allclose(result, expected, atol=atol)
    out = np.empty_like(x)
    assert nbgn.baseline.group_norm(x, 2, weight, bias, layout=layout, out=out) is out
    np.testing.assert_allclose(out, expected, atol=atol)
    mean, var = nbgn.baseline.group_moments(x, 2, layout=layout)
    ref_mean, ref_var = reference_moments(x, 2, layout)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-5)


def test_baseline_and_nbgn_agree_on_the_seed_shape():
    x = np.random.default_rng(0).random((4, 16, 112, 112), dtype=np.float32)
    np.testing.assert_allclose(nbgn.baseline.group_norm(x, 4), nbgn.group_norm(x, 4), atol=1e-4)
