"""Every hot loop vectorizes, in each dtype and layout, in place and out of place: the kernels'
machine code has packed (256- or 512-bit) arithmetic.

The kernels are compiled in a child process with a fresh ``NUMBA_CACHE_DIR`` (code loaded from the
cache cannot be inspected) by ``vectorization_probe.py``. A kernel with no packed instruction left
has lost its vector loops: a dropped fastmath flag on a reduction (``shifted_sums`` compiled
without ``reassoc`` has none), an alias LLVM cannot rule out, a loop shape it gives up on. A
kernel with several loops could lose one of them and keep a nonzero count: the per-kernel floors
below, about half of what LLVM 22 emits, catch the larger losses.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbgn._info import info
from nbgn.kernels import simd

# One worker runs the whole module, so that its probe (a minute of compiling) runs once.
pytestmark = [pytest.mark.xdist_group("vectorization_probe"), pytest.mark.slow]

#: Packed instructions each kernel has at least, whatever the dtype and variant (LLVM 22 emits
#: roughly twice these).
FLOORS = {
    "nchw.normalize_slabs": 90,
    "nchw.normalize_short_slabs": 45,
    "nchw.normalize_slabs_patterned": 35,
    "nchw.normalize_pair_against": 6,
    "nchw.normalize_rows": 8,
    "nchw.normalize_windows": 10,
    "moments.shifted_sums": 10,
    "nhwc.lane_sums": 8,
    "nhwc.register_lane_sums": 40,
    "nhwc.register_folded_sums": 120,
    "nhwc.apply_positions": 10,
    "nhwc.normalize_small_samples": 25,
}


@pytest.fixture(scope="module")
def packed_counts(tmp_path_factory):
    if not {"avx2", "fma"} <= set(info()["vector_features"]):
        pytest.skip("the floors are for x86-64 with AVX2 and FMA")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path_factory.mktemp("numba_cache"))}
    probe = Path(__file__).with_name("vectorization_probe.py")
    done = subprocess.run(
        [sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_kernel_was_probed(packed_counts):
    kernels = {name.split(" [")[0] for name in packed_counts}
    assert kernels == set(FLOORS)
    # Both dtypes (the channel windows only where the host permutes float64: AVX-512); the
    # normalizations in place and out of place.
    for kernel in FLOORS:
        dtypes = {name.split("[")[1].split()[0].rstrip(",]") for name in packed_counts
                  if name.startswith(kernel + " [")}  # fmt: skip
        both = kernel != "nchw.normalize_windows" or simd.host_window_widths(8)[0]
        assert dtypes == ({"float32", "float64"} if both else {"float32"}), kernel
    assert any("out]" in name for name in packed_counts)


@pytest.mark.parametrize("kernel", sorted(FLOORS))
def test_hot_loops_vectorize(packed_counts, kernel):
    counts = {name: n for name, n in packed_counts.items() if name.startswith(kernel + " [")}
    assert counts
    low = {name: n for name, n in counts.items() if n < FLOORS[kernel]}
    assert not low, f"too few packed instructions (floor {FLOORS[kernel]}): {low}"
