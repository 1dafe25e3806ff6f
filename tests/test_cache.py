"""Numba's on-disk cache: a warm cache loads without compiling, and concurrent processes sharing a
cold cache directory all succeed (Numba issue 4807 was a crash in exactly that situation)."""

import json
import os
import subprocess
import sys

import pytest

from nbgn.kernels import _compile

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
    assert json.loads(result.stdout) == expected


#: Every kind of kernel in both layouts, from a warm cache: the serial paths, one unit per thread
#: (fused, NCHW's channel patterns), a unit split among the threads out of place, and in place
#: together (cooperative), in float32 (float64: the serial and fused ones), with and without
#: weights; and the moments alone. Then a function compiled afterwards. Prints what ran, the
#: cache's hits and misses, and how often Numba refreshed its compiler context.
WARM_LOADS = (
    "import json, sys, numba, numpy as np\n"
    "from numba.core.registry import cpu_target\n"
    "refreshes = []\n"
    "context = type(cpu_target.target_context)\n"
    "original = context.refresh\n"
    "def counted(self): refreshes.append(1); original(self)\n"
    "context.refresh = counted\n"
    "import nbgn\n"
    "from nbgn import api\n"
    "from nbgn.kernels import _compile, moments, nchw, nhwc\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from reference import make_input, reference_group_norm, reference_moments, tolerance\n"
    "rng = np.random.default_rng(0)\n"
    "cases = [(np.float32, (2, 8, 4, 4), 4), (np.float32, (4, 8, 64, 64), 4),\n"
    "         (np.float32, (16, 256, 7, 7), 32), (np.float32, (1, 4, 256, 512), 1),\n"
    "         (np.float64, (2, 8, 4, 4), 4), (np.float64, (4, 8, 64, 64), 4)]\n"
    "for dtype, shape, groups in cases:\n"
    "    for layout in ('NCHW', 'NHWC'):\n"
    "        x = make_input(shape, layout, dtype, rng, offset=3.0)\n"
    "        weight = rng.standard_normal(shape[1]).astype(dtype)\n"
    "        bias = rng.standard_normal(shape[1]).astype(dtype)\n"
    "        for affine in ((weight, bias), (None, None)):\n"
    "            expected = reference_group_norm(x, groups, *affine, layout=layout)\n"
    "            y = nbgn.group_norm(x, groups, *affine, layout=layout)\n"
    "            z = x.copy()\n"
    "            nbgn.group_norm(z, groups, *affine, layout=layout, out=z)\n"
    "            for result in (y, z):\n"
    "                error = np.abs(result - expected).max() / max(1.0, np.abs(expected).max())\n"
    "                assert error < tolerance(dtype), (shape, layout, dtype, error)\n"
    "        for got, want in zip(nbgn.group_moments(x, groups, layout=layout),\n"
    "                             reference_moments(x, groups, layout)):\n"
    "            assert np.allclose(got, want, rtol=1e-5, atol=1e-5), (shape, layout, dtype)\n"
    "ran = sorted({call.kernel.py_func.__name__ for call in api._KNOWN_CALLS.values()})\n"
    "kernels = [d for m in (moments, nchw, nhwc) for d in vars(m).values()\n"
    "           if isinstance(d, numba.core.dispatcher.Dispatcher)]\n"
    "kernel_refreshes = len(refreshes)\n"
    "compiled_after = numba.njit(lambda a: np.median(a))(np.arange(5.0))\n"
    "print(json.dumps({'ran': ran, 'refreshes': kernel_refreshes,\n"
    "                  'warm_loads': _compile.WARM_LOADS, 'median': compiled_after,\n"
    "                  'version': numba.__version__,\n"
    "                  'hits': sum(sum(d.stats.cache_hits.values()) for d in kernels),\n"
    "                  'misses': sum(sum(d.stats.cache_misses.values()) for d in kernels)}))\n"
)


@pytest.mark.slow
def test_warm_cache_loads_every_kernel_without_refreshing_numba(tmp_path):
    """Loads skip the refresh of Numba's compiler context (``_compile.WarmLoadCache``); the loaded
    code still computes every kernel's results, and a later compile still finds what the refresh
    provides (``np.median``, from ``numba.np.arraymath``). A private cache: the in-tree one takes
    other workers' saves meanwhile, and Numba rewrites an index without a lock."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = []
    for _ in range(2):  # the first compiles and saves
        result = subprocess.run(
            [sys.executable, "-c", WARM_LOADS, tests],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr
        runs.append(json.loads(result.stdout))
    cold, warm = runs
    assert cold["misses"] > 0
    assert warm["misses"] == 0
    assert warm["hits"] > 0
    major, minor = (int(part) for part in warm["version"].split(".")[:2])
    low, high = _compile.WARM_LOAD_VERSIONS
    assert warm["warm_loads"] == (low <= (major, minor) <= high)
    if warm["warm_loads"]:
        assert warm["refreshes"] == 0
    assert warm["median"] == 2.0
    assert set(warm["ran"]) >= {
        "normalize_small_samples",  # NHWC serial
        "normalize_slabs",  # NCHW serial
        "_group_norm_fused",  # both layouts
        "_group_norm_patterned",
        "_group_norm_split",  # out of place
        "_group_norm_cooperative",  # in place
    }


def test_imports_without_the_jit():
    """Under ``NUMBA_DISABLE_JIT`` the kernels are plain functions, with no cache to replace."""
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    result = subprocess.run(
        [sys.executable, "-c", "import nbgn.kernels.nhwc as m; print(type(m.group_norm_fused))"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "<class 'function'>"
