"""Concurrency: many Python threads calling nbgn at once, on every threading layer nbgn may run on."""

import os
import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import pytest
from reference import reference_group_norm
from snippets import HIDE_TBB

import nbgn


def _cases(count, seed=0):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        layout = ("NCHW", "NHWC")[i % 2]
        dtype = (np.float32, np.float64)[(i // 2) % 2]
        # parallel, serial, and the last split across threads in NHWC (NCHW: one slab per thread)
        shape = ((4, 16, 48, 48), (2, 8, 6, 6), (1, 16, 128, 128))[i % 3]
        x = rng.standard_normal(shape)
        if layout == "NHWC":
            x = np.moveaxis(x, 1, -1)
        x = np.ascontiguousarray(x).astype(dtype)
        cases.append((x, layout, reference_group_norm(x, 4, layout=layout)))
    return cases


def _hammer(cases, threads, calls_per_thread):
    """Every (worker, call, problem) that raised or came out wrong, from ``threads`` threads."""
    failures = []

    def work(worker):
        for call in range(calls_per_thread):
            x, layout, expected = cases[(worker * 7 + call) % len(cases)]
            try:
                if call % 2:
                    y = x.copy()
                    nbgn.group_norm(y, 4, layout=layout, out=y)
                else:
                    y = nbgn.group_norm(x, 4, layout=layout)
            except Exception as error:  # uncaught, it would end the thread and go unreported
                failures.append((worker, call, repr(error)))
                continue
            tol = 2e-5 if x.dtype == np.float32 else 1e-12
            if not np.allclose(y, expected, atol=tol, rtol=0):
                failures.append((worker, call, "wrong result"))

    pool = [threading.Thread(target=work, args=(w,)) for w in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in pool), "deadlock: a thread did not finish"
    return failures


@pytest.mark.slow
def test_eight_threads_hundreds_of_calls():
    assert _hammer(_cases(12), threads=8, calls_per_thread=60) == []


def test_an_exception_in_a_thread_is_a_failure(monkeypatch):
    def refuse_in_place(x, num_groups, *args, out=None, **kwargs):
        if out is not None:
            raise RuntimeError("refused")
        return group_norm(x, num_groups, *args, **kwargs)

    group_norm = nbgn.group_norm
    monkeypatch.setattr(nbgn, "group_norm", refuse_in_place)
    failures = _hammer(_cases(2), threads=2, calls_per_thread=4)
    assert sorted(failures) == [(w, c, "RuntimeError('refused')") for w in (0, 1) for c in (1, 3)]


SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    {prelude}
    import nbgn, numba
    from test_threading import _cases, _hammer
    assert _hammer(_cases(6), threads=8, calls_per_thread=25) == []
    print("LAYER", numba.threading_layer(), nbgn.info()["threading"]["serialized"])
    """
)


def _run(prelude, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env.update(env_extra or {})
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(tests=tests, prelude=prelude)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split("LAYER")[1].split()


@pytest.mark.slow
@pytest.mark.parametrize("prelude", ["", HIDE_TBB], ids=["default", "without-tbb"])
def test_threads_on_the_default_layer(prelude):
    layer, serialized = _run(prelude)
    assert (layer, serialized) == ("omp", "False")


@pytest.mark.slow
def test_user_chosen_tbb_is_made_loadable():
    layer, serialized = _run("", {"NUMBA_THREADING_LAYER": "tbb"})
    assert (layer, serialized) == ("tbb", "False")


@pytest.mark.slow
def test_threads_with_a_user_chosen_workqueue_are_serialized():
    layer, serialized = _run("", {"NUMBA_THREADING_LAYER": "workqueue"})
    assert (layer, serialized) == ("workqueue", "True")


@pytest.mark.slow
def test_user_chosen_omp_is_respected():
    layer, serialized = _run("", {"NUMBA_THREADING_LAYER": "omp"})
    assert (layer, serialized) == ("omp", "False")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("prelude", "env"),
    [
        ("", {"NUMBA_THREADING_LAYER_PRIORITY": "tbb omp workqueue"}),
        ("import numba; numba.config.THREADING_LAYER_PRIORITY = ['tbb', 'workqueue', 'omp']", {}),
    ],
    ids=["environment", "numba.config"],
)
def test_user_priority_is_respected(prelude, env):
    layer, serialized = _run(prelude, env)
    assert (layer, serialized) == ("tbb", "False")


#: As on a machine where Numba finds no OpenMP runtime (macOS pip wheels) and tbb is not installed.
HIDE_OPENMP_AND_TBB = HIDE_TBB + 'import sys\nsys.modules["numba.np.ufunc.omppool"] = None\n'


@pytest.mark.slow
def test_threads_where_the_default_falls_through_to_workqueue_are_serialized():
    layer, serialized = _run(HIDE_OPENMP_AND_TBB)
    assert (layer, serialized) == ("workqueue", "True")


def test_first_launches_are_serialized_until_numba_has_resolved_the_default():
    # Threads racing to the first launch would reach an unresolved workqueue concurrently.
    code = HIDE_OPENMP_AND_TBB + (
        "import nbgn, numpy as np\n"
        "from nbgn import _threading\n"
        "before = _threading.kernel_guard() is _threading._LOCK\n"
        "nbgn.group_norm(np.ones((2, 64, 32, 32)), 2)\n"
        "print(before, nbgn.info()['threading']['active'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "workqueue"]


def test_set_num_threads_is_respected():
    x = np.random.default_rng(1).standard_normal((1, 8, 128, 128)).astype(np.float32)
    expected = reference_group_norm(x, 1)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        np.testing.assert_allclose(nbgn.group_norm(x, 1), expected, atol=2e-5)
        assert nbgn.info()["threading"]["threads"] == 1
    finally:
        numba.set_num_threads(before)
    np.testing.assert_allclose(nbgn.group_norm(x, 1), expected, atol=2e-5)


def test_numba_num_threads_environment_is_respected():
    code = (
        "import nbgn, numpy as np, numba;"
        "x = np.ones((4, 8, 64, 64), np.float32); x[:, :, 0] = 2;"
        "nbgn.group_norm(x, 2, out=x);"
        "print(numba.get_num_threads(), nbgn.info()['threading']['threads'])"
    )
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1"]


def test_a_child_forked_while_another_thread_holds_the_launch_lock_can_launch():
    # On workqueue a thread of the parent may be inside a serialized launch at the fork; the
    # child inherits the lock held by a thread it does not have.
    code = textwrap.dedent(
        """
        import os, signal, threading
        import numpy as np
        import nbgn
        from nbgn import _threading

        x = np.random.default_rng(0).standard_normal((4, 16, 48, 48))  # parallel
        nbgn.group_norm(x, 4)
        held, release = threading.Event(), threading.Event()

        def launch_in_progress():
            with _threading.kernel_guard():
                held.set()
                release.wait()

        thread = threading.Thread(target=launch_in_progress)
        thread.start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a deadlocked child ends instead of hanging the test
            y = nbgn.group_norm(x, 4)
            os._exit(0 if abs(y.mean()) < 1e-6 and abs(y.std() - 1) < 1e-3 else 1)
        release.set()
        thread.join()
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), nbgn.info()["threading"]["active"])
        """
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "workqueue"]  # -14: the child deadlocked (SIGALRM)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 or more Numba threads")
def test_thread_count_decides_the_kernel(monkeypatch):
    """One thread runs the serial kernel; more split the slabs into one run per thread."""
    from nbgn import api
    from nbgn.kernels import nchw

    x = np.random.default_rng(2).standard_normal((3, 8, 64, 64)).astype(np.float32)
    expected = reference_group_norm(x, 2)
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    nbgn.group_norm(x, 2)  # compiled before the test
    numba.set_num_threads(before)
    api._forget_kernels()  # it holds the kernels chosen for earlier calls, unwrapped
    calls = []

    class Recorded:
        """A kernel whose calls are recorded (``stop``: the argument that says how the units
        were divided), otherwise the kernel itself (``api`` asks normalize_slabs' address)."""

        def __init__(self, name, kernel, stop):
            self.name, self.kernel, self.stop = name, kernel, stop

        def __call__(self, *args):
            calls.append((self.name, args[self.stop]))
            return self.kernel(*args)

        def __getattr__(self, attribute):
            return getattr(self.kernel, attribute)

    for name, stop in (("group_norm_fused", -1), ("normalize_slabs", 3)):
        monkeypatch.setattr(nchw, name, Recorded(name, getattr(nchw, name), stop))
    try:
        numba.set_num_threads(1)
        np.testing.assert_allclose(nbgn.group_norm(x, 2), expected, atol=2e-5)
        numba.set_num_threads(2)
        np.testing.assert_allclose(nbgn.group_norm(x, 2), expected, atol=2e-5)
    finally:
        numba.set_num_threads(before)
        api._forget_kernels()  # the wrapped kernels must not outlive the test
    # The serial kernel takes all 6 slabs; the parallel one, 2 runs of them.
    assert calls == [("normalize_slabs", 6), ("group_norm_fused", 2)]
