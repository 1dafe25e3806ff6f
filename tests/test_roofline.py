"""The benchmark's reference passes: the roofline (x *= a) and the two-pass floor."""

import numba
import numpy as np
import pytest

from nbgn import _schedule
from nbgn.kernels import roofline


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "units", "threads"),
    [
        ((2, 8, 6, 6), 8, None),  # below SERIAL_ELEMENTS: the serial kernel
        ((4, 16, 64, 64), 16, None),  # units shared out whole
        ((6, 16, 64, 64), 6, 1),  # one thread: serial whatever the size
        ((1, 4, 256, 256), 1, 2),  # one unit: split among the threads
        ((3, 4, 256, 256), 3, 2),  # three units on two threads: each split
    ],
)
def test_two_pass_floor_scales_every_value_and_sums_them(shape, units, threads, dtype):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(dtype)
    expected = x * dtype(3.0)
    before = numba.get_num_threads()
    try:
        if threads is not None:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        total = roofline.two_pass_floor(x, units, 3.0)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(x, expected)  # one multiplication by 3, every value once
    exact = float(np.sum(expected.astype(np.float64) / 3.0))
    # Summed in the input's type before scaling: within the error of a float32 sum of ~1e5 terms.
    assert total == pytest.approx(exact, abs=1e-3 * np.sqrt(x.size))


def test_two_pass_floor_splits_units_only_when_they_do_not_share_out():
    threads = numba.get_num_threads()
    if threads < 2:
        pytest.skip("one thread: every unit runs whole")
    # Documented rule, checked through the kernels it calls.
    calls = []
    originals = roofline.unit_parts_sum, roofline.units_each_whole_parallel
    try:
        roofline.unit_parts_sum = lambda *a: (calls.append("split"), originals[0](*a))
        roofline.units_each_whole_parallel = lambda *a: (calls.append("whole"), originals[1](*a))
        x = np.ones(2 * threads * _schedule.MIN_PART_ELEMENTS)  # parallel, as for x *= a
        roofline.two_pass_floor(x, threads)
        roofline.two_pass_floor(x, 1)
    finally:
        roofline.unit_parts_sum, roofline.units_each_whole_parallel = originals
    assert calls == ["whole", "split"]


def test_two_pass_floor_refuses_units_that_do_not_divide_and_strided_arrays():
    with pytest.raises(ValueError, match=r"num_units must divide x\.size"):
        roofline.two_pass_floor(np.ones(10), 3)
    with pytest.raises(ValueError, match="C-contiguous"):
        roofline.two_pass_floor(np.ones((4, 4))[:, ::2], 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        roofline.scale_inplace(np.ones((4, 4))[:, ::2])
