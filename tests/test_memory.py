"""Memory: in place allocates nothing proportional to the input, and nothing leaks."""

import tracemalloc

import numpy as np
import pytest

import nbgn


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(("shape", "groups"), [((16, 32, 64, 64), 8), ((1, 8, 512, 256), 1)])
def test_in_place_allocates_nothing_proportional_and_allocating_only_the_output(
    shape, groups, layout
):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    nbgn.group_norm(x, groups, layout=layout, out=x)  # compile outside the measurement
    nbgn.group_norm(x, groups, layout=layout)
    tracemalloc.start()
    try:
        nbgn.group_norm(x, groups, layout=layout, out=x)
        _, in_place_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        nbgn.group_norm(x, groups, layout=layout)
        _, allocating_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert in_place_peak <= 0.02 * x.nbytes
    assert x.nbytes <= allocating_peak <= 1.02 * x.nbytes


@pytest.mark.slow
def test_resident_memory_is_flat_over_thousands_of_calls():
    psutil = pytest.importorskip("psutil")
    rng = np.random.default_rng(0)
    arrays = [
        rng.standard_normal((4, 16, 32, 32)).astype(np.float32),
        np.ascontiguousarray(rng.standard_normal((2, 24, 24, 8))),
        rng.standard_normal((2, 8, 4, 4)).astype(np.float32),
    ]
    layouts = ["NCHW", "NHWC", "NCHW"]

    def calls(count):
        for i in range(count):
            x, layout = arrays[i % 3], layouts[i % 3]
            y = nbgn.group_norm(x, 4, layout=layout)
            nbgn.group_norm(y, 4, layout=layout, out=y)
            nbgn.group_moments(x, 4, layout=layout)
            with pytest.raises(ValueError, match="does not divide"):
                nbgn.group_norm(x, 3, layout=layout)

    process = psutil.Process()
    calls(1500)  # compile and let allocators settle
    before = process.memory_info().rss
    calls(4500)
    growth = process.memory_info().rss - before
    assert growth < 4 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"
