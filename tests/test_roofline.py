"""The benchmark's reference passes: the roofline (x *= a) and the two-pass floor."""

import numba
import numpy as np
import pytest

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


@pytest.mark.parametrize(
    ("units", "unit_length", "kernel"),
    [
        (4, 1024, "floor_whole_serial"),  # below SERIAL_ELEMENTS
        (8, 1 << 16, "floor_whole_parallel"),  # a run of whole units per thread
        (3, 1 << 18, "floor_split"),  # three 1 MiB units on two threads: each in two parts
        (1, 1 << 19, "floor_together"),  # a unit over COOPERATIVE_BYTES: both threads on it
    ],
)
def test_two_pass_floor_is_scheduled_as_nbgn_in_place(units, unit_length, kernel, monkeypatch):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread: everything runs serially")
    names = ("floor_whole_serial", "floor_whole_parallel", "floor_split", "floor_together")
    calls = []
    for name in names:
        original = getattr(roofline, name)
        monkeypatch.setattr(roofline, name, lambda *a, n=name, f=original: (calls.append(n), f(*a)))
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        x = np.arange(units * unit_length, dtype=np.float32) % 7
        total = roofline.two_pass_floor(x, units, 2.0)
    finally:
        numba.set_num_threads(before)
    assert calls == [kernel]
    np.testing.assert_array_equal(x, (np.arange(x.size) % 7).astype(np.float32) * 2)
    assert total == float(np.sum(np.arange(x.size) % 7))  # small integers: exact in float32


def test_two_pass_floor_refuses_units_that_do_not_divide_and_strided_arrays():
    with pytest.raises(ValueError, match=r"num_units must divide x\.size"):
        roofline.two_pass_floor(np.ones(10), 3)
    with pytest.raises(ValueError, match="C-contiguous"):
        roofline.two_pass_floor(np.ones((4, 4))[:, ::2], 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        roofline.scale_inplace(np.ones((4, 4))[:, ::2])
