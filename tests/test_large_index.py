"""Indexing past 2**31 elements (opt in: NBGN_BIGMEM=1; needs ~9 GiB and a minute or two).

The array holds 2**31 + 128 float32 values. The last 128 in memory order, the only ones past
2**31, are set to 1000 while the rest stay below 20: a kernel whose index wraps or stops at 2**31
misses them and is off by about 1e-4 in the mean, a million times the tolerance. The reference
moments are computed in float64 over slices of the array itself.
"""

import numpy as np
import pytest

import nbgn

SPATIAL = 2**30 + 64  # two channels: 2**31 + 128 values in all
TAIL = 128  # the elements at flat index 2**31 and beyond
CHUNK = 1 << 24


def _values(start, stop):
    """The pattern at flat indices ``[start, stop)``, in float32 as stored."""
    index = np.arange(start, stop)
    values = ((index % 1009) * 0.01 + index // 2**28).astype(np.float32)
    values[index >= 2 * SPATIAL - TAIL] = 1000.0
    return values


def _filled(layout):
    shape = (1, 2, SPATIAL) if layout == "NCHW" else (1, SPATIAL, 2)
    x = np.empty(shape, np.float32)
    flat = x.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        stop = min(start + CHUNK, flat.size)
        flat[start:stop] = _values(start, stop)
    return x


def _channel(x, layout, channel):
    return x[0, channel] if layout == "NCHW" else x[0, :, channel]


def _channel_moments(x, layout):
    """Two-pass float64 mean and variance of each channel, over slices of CHUNK values."""
    mean, var = np.empty(2), np.empty(2)
    for channel in range(2):
        column = _channel(x, layout, channel)
        slices = [column[start : start + CHUNK] for start in range(0, SPATIAL, CHUNK)]
        mean[channel] = sum(piece.sum(dtype=np.float64) for piece in slices) / SPATIAL
        var[channel] = sum(np.square(piece - mean[channel]).sum() for piece in slices) / SPATIAL
    return mean, var


@pytest.mark.bigmem
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_more_than_2_31_elements(layout):
    x = _filled(layout)
    mean, var = _channel_moments(x, layout)
    # One group of both channels (split across threads), and one group per channel.
    whole_mean = mean.mean()
    whole_var = var.mean() + np.square(mean - whole_mean).mean()
    for num_groups, (expected_mean, expected_var) in {
        1: ([whole_mean], [whole_var]),
        2: (mean, var),
    }.items():
        got_mean, got_var = nbgn.group_moments(x, num_groups, layout=layout)
        np.testing.assert_allclose(got_mean[0], expected_mean, rtol=1e-10)
        np.testing.assert_allclose(got_var[0], expected_var, rtol=1e-8)

    nbgn.group_norm(x, 2, layout=layout, out=x)
    flat = x.reshape(-1)
    channel_of = (lambda index: index // SPATIAL) if layout == "NCHW" else (lambda index: index % 2)
    for start in (0, SPATIAL - 2048, flat.size - 4096):  # start, channel boundary, past 2**31
        index = np.arange(start, start + 4096)
        group = channel_of(index)
        expected = (_values(start, start + 4096) - mean[group]) / np.sqrt(var[group] + 1e-5)
        np.testing.assert_allclose(flat[start : start + 4096], expected, atol=2e-5, rtol=1e-6)
