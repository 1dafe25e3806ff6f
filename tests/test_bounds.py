"""No kernel indexes outside its arrays: ``bounds_probe.py`` runs every path with Numba's bounds
checks on (``NUMBA_BOUNDSCHECK=1``), in a child process with a fresh ``NUMBA_CACHE_DIR`` so that
nothing compiled without the checks is loaded, or left behind for other tests.

The child compiles without LLVM's optimizations (``NUMBA_OPT=0``): Numba writes the checks into
every indexing before LLVM sees the code, so they are the same at any level, and compiling every
kernel took 135-150 s instead of 315 s (an off-by-one in a channel loop still raised
``IndexError``).
"""

import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest


@pytest.mark.slow
def test_kernels_stay_in_bounds(tmp_path):
    env = {
        **os.environ,
        "NUMBA_BOUNDSCHECK": "1",
        "NUMBA_OPT": "0",
        "NUMBA_CACHE_DIR": str(tmp_path),
    }
    probe = Path(__file__).with_name("bounds_probe.py")
    done = subprocess.run(
        [sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.split()
    assert lines[-1] == "ok"
    plans = done.stdout.splitlines()[:-1]
    # Serial, and with the thresholds lowered: fused, split and cooperative parallel plans.
    assert any("parallel=False" in plan for plan in plans)
    if numba.get_num_threads() < 2:
        pytest.skip("one thread: the parallel plans were not reached")
    assert any("cooperative=True" in plan and "in_place=True" in plan for plan in plans)
    assert any("cooperative=True" in plan and "in_place=False" in plan for plan in plans)
    assert any("parts=1" in plan and "parallel=True" in plan for plan in plans)
    assert any("parts=2" in plan and "cooperative=False" in plan for plan in plans)
