"""Memory: in place allocates nothing proportional to the input, and nothing leaks.

tracemalloc sees NumPy's allocations (a hidden copy in the Python layer); the peak resident set
also sees what Numba's runtime allocates inside the kernels, which tracemalloc does not.
"""

import os
import re
import tracemalloc

import numpy as np
import pytest

import nbgn
from nbgn import api

#: How the measured calls run: through the checks and the schedule, or as the known call that the
#: calls before them made (``api._known_call``).
PATHS = pytest.mark.parametrize("path", ["general", "known"])


def _prepare(path):
    """Forget the known calls if the next call must take the general path."""
    if path == "general":
        api._KNOWN_CALLS.clear()


@PATHS
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(("shape", "groups"), [((16, 32, 64, 64), 8), ((1, 8, 512, 256), 1)])
def test_in_place_allocates_nothing_proportional_and_allocating_only_the_output(
    shape, groups, layout, path
):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    nbgn.group_norm(x, groups, layout=layout, out=x)  # compile outside the measurement
    nbgn.group_norm(x, groups, layout=layout)
    _prepare(path)
    tracemalloc.start()
    try:
        nbgn.group_norm(x, groups, layout=layout, out=x)
        _, in_place_peak = tracemalloc.get_traced_memory()
        _prepare(path)
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
            nbgn.group_norm(x, 4, layout=layout, out=y)  # a separate out: the general path
            nbgn.group_moments(x, 4, layout=layout)
            with pytest.raises(ValueError, match="does not divide"):
                nbgn.group_norm(x, 3, layout=layout)

    process = psutil.Process()
    calls(1500)  # compile and let allocators settle
    before = process.memory_info().rss
    calls(4500)
    growth = process.memory_info().rss - before
    assert growth < 4 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB"


def _status_bytes(key):
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1)) * 1024


def _peak_growth(call):
    """Bytes the resident set peaked above its level before ``call``; returns (growth, result)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM, the peak resident set, to the current one
    before = _status_bytes("VmRSS")
    result = call()
    return _status_bytes("VmHWM") - before, result


@pytest.mark.slow
@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK),
    reason="needs Linux's /proc/self/clear_refs to reset the peak resident set size",
)
@PATHS
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(
    ("shape", "groups"),
    [((8, 32, 256, 512), 8), ((1, 8, 2048, 2048), 1)],  # one slab per thread; slabs split in parts
    ids=["slabs", "split"],
)
def test_peak_resident_memory_in_place_and_allocating(shape, groups, layout, path):
    rng = np.random.default_rng(0)
    if layout == "NHWC":
        shape = (shape[0], *shape[2:], shape[1])
    x = rng.standard_normal(shape, dtype=np.float32)  # 128 MiB
    nbgn.group_norm(x, groups, layout=layout, out=x)  # compile; fault in the threads' stacks
    nbgn.group_norm(x, groups, layout=layout)
    _prepare(path)
    in_place, _ = _peak_growth(lambda: nbgn.group_norm(x, groups, layout=layout, out=x))
    _prepare(path)
    allocating, y = _peak_growth(lambda: nbgn.group_norm(x, groups, layout=layout))
    assert in_place <= 0.03 * x.nbytes, f"in place peaked {in_place / 2**20:.1f} MiB higher"
    assert allocating <= 1.03 * x.nbytes, f"allocating peaked {allocating / 2**20:.1f} MiB higher"
    assert y.shape == x.shape
