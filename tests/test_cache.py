"""Numba's on-disk cache: a warm cache loads without compiling, and concurrent processes sharing a
cold cache directory all succeed (Numba issue 4807 was a crash in exactly that situation)."""

import os
import subprocess
import sys

import pytest

#: NCHW calls and an NHWC call, then each kernel's cache hits and misses. The NHWC input is
#: ``y`` (samples of 32K values: the lanes, ``group_norm_fused``) or, in the concurrent test,
#: its first 4 x 4 positions (128 values, 512 in all: run serially by ``normalize_small_samples``,
#: whose compile takes 1.6 s, not 16).
CALLS = (
    "import json, numpy as np, nbgn\n"
    "from nbgn.kernels import nchw, nhwc\n"
    "x = np.random.default_rng(0).standard_normal((4, 8, 64, 64)).astype(np.float32)\n"
    "y = nbgn.group_norm(x, 4); nbgn.group_norm(x, 4, out=x)\n"
    "z = nbgn.group_norm(np.moveaxis(y{positions}, 1, -1).copy(), 4, layout='NHWC')\n"
    "g = y.astype(np.float64).reshape(4, 4, -1)\n"
    "assert abs(g.mean(-1)).max() < 1e-6 and abs(g.var(-1) - 1).max() < 1e-3\n"
    "stats = [nchw.group_norm_fused.stats, nhwc.{nhwc_kernel}.stats]\n"
    "print(json.dumps([[sum(s.cache_hits.values()), sum(s.cache_misses.values())] for s in stats]))\n"
)
LANES = CALLS.format(positions="", nhwc_kernel="group_norm_fused")
SMALL_SAMPLES = CALLS.format(positions="[:, :, :4, :4]", nhwc_kernel="normalize_small_samples")


def _start(cache_dir, calls=LANES):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)}
    return subprocess.Popen(
        [sys.executable, "-c", calls],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    import json

    return json.loads(stdout)


@pytest.mark.slow
def test_second_process_loads_from_cache(tmp_path):
    first = _finish(_start(tmp_path))
    assert all(misses > 0 for _, misses in first)  # compiled and saved
    second = _finish(_start(tmp_path))
    assert all(hits > 0 and misses == 0 for hits, misses in second)


@pytest.mark.slow
def test_concurrent_processes_share_a_cold_cache(tmp_path):
    # All compile and write the same files at once.
    cold = [_start(tmp_path, SMALL_SAMPLES) for _ in range(4)]
    for process in cold:
        _finish(process)
    # The cache they left is whole: every kernel loads, nothing compiles.
    warm = [_start(tmp_path, SMALL_SAMPLES) for _ in range(4)]
    for process in warm:
        assert all(hits > 0 and misses == 0 for hits, misses in _finish(process))


COMPILED = (
    "import json, sys, numpy as np, nbgn\n"
    "from nbgn.kernels import nchw, nhwc\n"
    "shape = tuple(int(v) for v in sys.argv[1].split(','))\n"
    "x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)\n"
    "nbgn.group_norm(x, 4, layout='NHWC')\n"
    "names = {'small': nhwc.normalize_small_samples, 'lanes': nhwc.normalize_samples,\n"
    "         'slabs': nchw.normalize_slabs, 'split': nhwc.group_norm_split}\n"
    "print(json.dumps({k: len(v.signatures) for k, v in names.items()}))\n"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # Samples of 128 values: the small-sample path only; no lanes, nothing of NCHW's.
        ((2, 4, 4, 8), {"small": 1, "lanes": 0, "slabs": 0, "split": 0}),
        # Samples of 32K values: the lanes only.
        ((4, 64, 64, 8), {"small": 0, "lanes": 1, "slabs": 0, "split": 0}),
    ],
)
def test_cold_cache_compiles_only_what_the_call_needs(tmp_path, shape, expected):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", COMPILED, ",".join(map(str, shape))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    import json

    assert json.loads(result.stdout) == expected
