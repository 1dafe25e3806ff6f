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
from test_threading import HIDE_OPENMP_AND_TBB

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
        # A Pool waits forever for a result from a worker that died; a Process reports its death.
        child = mp.get_context("fork").Process(target=normalize, args=(2,))
        child.start()
        child.join()
        assert child.exitcode == 0, f"a forked child died: exit code {{child.exitcode}}"
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
        (HIDE_OPENMP_AND_TBB, ["workqueue", "False"]),
    ],
    ids=["default", "without-tbb", "user-tbb", "user-workqueue", "without-openmp-and-tbb"],
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


DATA_LOADER = textwrap.dedent(
    """
    import numpy as np
    from torch.utils.data import DataLoader, Dataset

    import nbgn


    class Normalized(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, index):
            x = np.random.default_rng(index).standard_normal((4, 16, 48, 48)).astype(np.float32)
            grouped = x.astype(np.float64).reshape(4, 4, -1)
            mean = grouped.mean(-1, keepdims=True)
            expected = (grouped - mean) / np.sqrt(grouped.var(-1, keepdims=True) + 1e-5)
            error = np.abs(nbgn.group_norm(x, 4) - expected.reshape(x.shape)).max()
            return float(error), nbgn.info()["threading"]["serial_only"]


    if __name__ == "__main__":
        assert Normalized()[0][0] < 2e-5  # the parent starts the threading layer first
        for method in ("fork", "spawn"):
            loader = DataLoader(Normalized(), batch_size=4, num_workers=2, multiprocessing_context=method)
            batches = list(loader)
            assert len(batches) == 4 and all(float(errors.max()) < 2e-5 for errors, _ in batches)
            print(method, *sorted({bool(flag) for _, flags in batches for flag in flags}))
    """
)


@pytest.mark.slow
def test_pytorch_data_loader_workers_after_parent_used_parallel_kernels(tmp_path):
    pytest.importorskip("torch")
    script = tmp_path / "loader.py"
    script.write_text(DATA_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fork() called from a process already using GNU OpenMP" not in result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["fork", "spawn"]
    assert lines[1].split()[1:] == ["False"]  # spawned workers start afresh, in parallel


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
