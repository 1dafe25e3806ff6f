"""Indexing past 2**31 elements (opt in: NBGN_BIGMEM=1; needs ~9 GiB and a few minutes)."""

import numpy as np
import pytest

import nbgn

SPATIAL = 2**30 + 64  # two channels: 2**31 + 128 float32 values in all


def _fill(flat, start, stop, channel):
    """A deterministic pattern, cheap to write: values depend on the index and the channel."""
    step = 1 << 24
    for begin in range(start, stop, step):
        end = min(begin + step, stop)
        flat[begin:end] = (np.arange(begin, end) % 1009) * 0.01 + 3.0 * channel


def _pattern_moments(count):
    """Exact float64 moments of the pattern over ``count`` consecutive indices from 0."""
    values = (np.arange(1009) * 0.01).astype(np.float32).astype(np.float64)
    full, rest = divmod(count, 1009)
    weights = np.full(1009, full, dtype=np.float64)
    weights[:rest] += 1
    mean = (weights * values).sum() / count
    return mean, (weights * (values - mean) ** 2).sum() / count


@pytest.mark.bigmem
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_more_than_2_31_elements(layout):
    if layout == "NCHW":
        x = np.empty((1, 2, SPATIAL), np.float32)
        for channel in range(2):
            _fill(x[0, channel], 0, SPATIAL, channel)
    else:
        x = np.empty((1, SPATIAL, 2), np.float32)
        for channel in range(2):
            column = np.empty(SPATIAL, np.float32)
            _fill(column, 0, SPATIAL, channel)
            x[0, :, channel] = column
            del column
    mean, var = nbgn.group_moments(x, 2, layout=layout)
    pattern_mean, pattern_var = _pattern_moments(SPATIAL)
    np.testing.assert_allclose(mean[0], [pattern_mean, pattern_mean + 3.0], rtol=1e-12)
    np.testing.assert_allclose(var[0], [pattern_var, pattern_var], rtol=1e-9)
    nbgn.group_norm(x, 2, layout=layout, out=x)
    last = x[0, 1, -5:] if layout == "NCHW" else x[0, -5:, 1]
    indices = np.arange(SPATIAL - 5, SPATIAL)
    raw = ((indices % 1009) * 0.01).astype(np.float32).astype(np.float64)
    expected = (raw - pattern_mean) / np.sqrt(pattern_var + 1e-5)
    np.testing.assert_allclose(last, expected, atol=1e-5)
