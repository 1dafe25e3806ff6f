"""Processes: forked and spawned children run nbgn after the parent ran parallel kernels.

Each scenario runs in a fresh interpreter, so that a child killed by the threading layer (GNU OpenMP
kills children forked after a parallel region) fails the test instead of the test runner.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from snippets import HIDE_TBB

SCENARIO = textwrap.dedent(
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np

    {prelude}
    import nbgn


    def normalize(seed):
        x = np.random.default_rng(seed).standard_normal((4, 16, 48, 48)).astype(np.float32)
        y = nbgn.group_norm(x, 4)  # parallel: large enough
        grouped = x.astype(np.float64).reshape(4, 4, -1)
        mean = grouped.mean(-1, keepdims=True)
        expected = ((grouped - mean) / np.sqrt(grouped.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
        moments = nbgn.group_moments(x, 4)
        assert np.allclose(moments[0], grouped.mean(-1)) and np.allclose(moments[1], grouped.var(-1))
        return float(np.abs(y - expected).max())


    def forked_serial_only(_):
        return nbgn.info()["threading"]["serial_only"]


    if __name__ == "__main__":
        assert normalize(0) < 2e-5  # the parent starts the threading layer first
        with mp.get_context("fork").Pool(2) as pool:  # DataLoader-style workers
            assert max(pool.map(normalize, range(8))) < 2e-5
            serial_children = set(pool.map(forked_serial_only, range(2)))
        for method in ("fork", "spawn"):
            context = mp.get_context(method)
            with ProcessPoolExecutor(max_workers=2, mp_context=context) as executor:
                assert max(executor.map(normalize, range(4))) < 2e-5
        assert normalize(1) < 2e-5
        print("OK", nbgn.info()["threading"]["active"], *serial_children)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prelude", "expected"),
    [
        ("", ["omp", "True"]),
        (HIDE_TBB, ["omp", "True"]),
        ("import os; os.environ['NUMBA_THREADING_LAYER'] = 'tbb'", ["tbb", "False"]),
        ("import os; os.environ['NUMBA_THREADING_LAYER'] = 'workqueue'", ["workqueue", "False"]),
    ],
    ids=["default", "without-tbb", "user-tbb", "user-workqueue"],
)
def test_children_run_after_parent_used_parallel_kernels(tmp_path, prelude, expected):
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO.format(prelude=prelude))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fork() called from a process already using GNU OpenMP" not in result.stderr
    assert result.stdout.split() == ["OK", *expected]  # layer; forked children serial-only


def test_info_command():
    result = subprocess.run(
        [sys.executable, "-m", "nbgn", "info", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    import json

    details = json.loads(result.stdout)
    for key in ("nbgn", "numpy", "numba", "threading", "cache_dir", "cpu", "vector_features"):
        assert key in details
    assert details["threading"]["configured"] in ("tbb", "default")
    assert details["threading"]["reason"]
    # The command launches one parallel kernel, so it reports the layer that really loaded.
    assert details["threading"]["active"] in ("tbb", "omp", "workqueue")
    assert details["threading"]["serialized"] == (details["threading"]["active"] == "workqueue")
