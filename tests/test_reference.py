"""The reference itself: closer to the exact result than the tolerances the tests hold nbgn to."""

from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest
from reference import reference_group_norm, reference_moments


def _exact_group_norm(values, eps):
    """``(x - mean) / sqrt(var + eps)`` of one group, in exact rationals and a 50-digit square root."""
    exact = [Fraction(float(v)) for v in values]
    mean = sum(exact) / len(exact)
    var = sum((v - mean) ** 2 for v in exact) / len(exact)
    with localcontext() as context:
        context.prec = 50
        shifted = var + Fraction(eps)
        rstd = 1 / (Decimal(shifted.numerator) / Decimal(shifted.denominator)).sqrt()
        y = [
            float(Decimal(d.numerator) / Decimal(d.denominator) * rstd)
            for d in (v - mean for v in exact)
        ]
    return mean, var, np.array(y)


@pytest.mark.parametrize(("offset", "scale"), [(0.0, 1.0), (1e3, 1e-2), (-50.0, 1e-3), (1e8, 1.0)])
def test_reference_is_exact_to_a_few_ulps_far_from_zero(offset, scale):
    # Hypothesis found the float64 (1, 2, 2) group near 1e3 with spread 3e-3 on which a plain
    # two-pass reference is off by 1.8e-11, more than the 1e-11 the property tests allow nbgn.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((200, 1, 2)) * scale + offset
    x = np.concatenate([x, rng.standard_normal((200, 1, 2)) * scale + offset], axis=-1)
    expected = reference_group_norm(x, 1)
    ref_mean, ref_var = reference_moments(x, 1)
    for sample in range(x.shape[0]):
        mean, var, y = _exact_group_norm(x[sample].ravel(), 1e-5)
        np.testing.assert_allclose(expected[sample].ravel(), y, rtol=0, atol=1e-15)
        mean_error = abs(Fraction(float(ref_mean[sample, 0])) - mean)
        assert mean_error <= 1e-15 * (abs(mean) + float(var) ** 0.5)
        np.testing.assert_allclose(ref_var[sample, 0], float(var), rtol=1e-13)
