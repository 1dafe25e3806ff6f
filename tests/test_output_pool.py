"""Large outputs come from a pool of freed ones: right values, never shared while any view lives."""

import gc
import os
import threading

import numpy as np
import pytest
from reference import reference_group_norm

import nbgn
from nbgn import _output_pool as pool

pytestmark = pytest.mark.skipif(not pool.SUPPORTED, reason="no anonymous private mappings here")


@pytest.fixture
def small_pool(monkeypatch):
    """The pool from 64 KiB, keeping at most two freed mappings of at most 1 MiB in all: the
    mechanism on small arrays. Empty before and after."""
    monkeypatch.setattr(pool, "MIN_BYTES", 64 << 10)
    monkeypatch.setattr(pool, "MAX_FREE_BYTES", 1 << 20)
    pool.clear()
    yield pool
    gc.collect()
    pool.clear()


def _address(array):
    return array.__array_interface__["data"][0]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_large_output_is_right_and_from_the_pool(layout, dtype):
    # 32 MiB in float32, 64 MiB in float64: the real threshold, not a patched one.
    shape = (1, 32, 512, 512) if layout == "NCHW" else (1, 512, 512, 32)
    x = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    weight = np.linspace(0.5, 1.5, 32).astype(dtype)
    bias = np.linspace(-1.0, 1.0, 32).astype(dtype)
    y = nbgn.group_norm(x, 8, weight, bias, layout=layout)
    assert type(y.base) is pool._Lease
    assert (y.shape, y.dtype) == (x.shape, x.dtype)
    assert (y.flags.c_contiguous, y.flags.writeable, y.flags.owndata) == (True, True, False)
    expected = reference_group_norm(x, 8, weight, bias, layout=layout)
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-6 if dtype == np.float32 else 1e-12)
    del y
    gc.collect()
    pool.clear()


def test_the_memory_order_of_x_is_kept(small_pool):
    # An NCHW-shaped view of channels-last memory: the result is channels-last in memory too.
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 32)).astype(np.float32)
    view = np.moveaxis(x, -1, 1)
    y = nbgn.group_norm(view, 4)
    assert np.moveaxis(y, 1, -1).flags.c_contiguous
    np.testing.assert_allclose(y, reference_group_norm(view, 4), atol=2e-6)
    del y
    gc.collect()
    assert small_pool.free_bytes() == x.nbytes  # it came from the pool


def test_a_mapping_returns_only_when_every_view_is_gone(small_pool):
    x = np.random.default_rng(1).standard_normal((2, 16, 64, 64)).astype(np.float32)
    y = nbgn.group_norm(x, 4)
    address = _address(y)
    kept = y[1, 3:5].reshape(-1)[::3]  # a view of a view of a view
    snapshot = kept.copy()
    del y
    gc.collect()
    assert small_pool.free_bytes() == 0  # the views still hold the lease
    z = nbgn.group_norm(x * 2.0, 4)  # a new mapping, not the one the views see
    assert not np.shares_memory(z, kept)
    np.testing.assert_array_equal(kept, snapshot)
    del kept
    gc.collect()
    assert small_pool.free_bytes() == x.nbytes
    w = nbgn.group_norm(x, 4)  # the mapping the views had, now free, is reused
    assert _address(w) == address
    assert small_pool.free_bytes() == 0
    del z, w


def test_a_rebinding_loop_reuses_two_mappings(small_pool):
    x = np.random.default_rng(2).standard_normal((2, 16, 64, 64)).astype(np.float32)
    addresses = set()
    y = None
    for _ in range(6):
        y = nbgn.group_norm(x, 4)
        addresses.add(_address(y))
    assert len(addresses) == 2  # y_k is made while y_(k-1) lives, then y_(k-1) is freed
    np.testing.assert_allclose(y, reference_group_norm(x, 4), atol=2e-6)


def test_freed_mappings_are_kept_within_bounds(small_pool):
    x = np.ones((2, 16, 64, 64), np.float32)  # 512 KiB
    results = [nbgn.group_norm(x, 4) for _ in range(4)]
    del results
    gc.collect()
    assert small_pool.free_bytes() == 2 * x.nbytes  # MAX_FREE
    big = nbgn.group_norm(np.ones((2, 16, 128, 128), np.float32), 4)  # 2 MiB: over MAX_FREE_BYTES
    del big
    gc.collect()
    assert small_pool.free_bytes() == 2 * x.nbytes  # unmapped at once, the others kept


def test_a_lease_collected_while_the_pool_is_locked_is_settled_later(small_pool):
    x = np.ones((2, 16, 64, 64), np.float32)
    y = nbgn.group_norm(x, 4)
    with pool._lock:  # as if a garbage collection ran inside the pool's own locked code
        del y
        gc.collect()
        assert len(pool._returned) == 1
    assert small_pool.free_bytes() == x.nbytes


def test_threads_never_share_a_live_output(small_pool):
    rng = np.random.default_rng(4)
    inputs = [rng.standard_normal((2, 16, 64, 64)).astype(np.float32) for _ in range(4)]
    expected = [reference_group_norm(x, 4) for x in inputs]
    failures = []

    def work(worker):
        for call in range(40):
            k = (worker + call) % len(inputs)
            y = nbgn.group_norm(inputs[k], 4)
            y2 = nbgn.group_norm(inputs[(k + 1) % len(inputs)], 4)
            if np.abs(y - expected[k]).max() > 2e-6 or np.shares_memory(y, y2):
                failures.append((worker, call))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    gc.collect()
    assert small_pool.free_bytes() <= 2 * inputs[0].nbytes


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_writes_its_own_copy(small_pool):
    x = np.ones((2, 16, 64, 64), np.float32)
    y = pool.empty(x.shape, x.dtype)
    y[...] = 1.0
    pid = os.fork()
    if pid == 0:  # the child: no kernels (GNU OpenMP may have run in the parent)
        y[...] = 7.0
        os._exit(0 if np.all(y == 7.0) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert np.all(y == 1.0)  # private: the child's writes stayed in the child


def test_a_lease_cannot_be_copied_or_pickled(small_pool):
    import copy
    import pickle

    y = pool.empty((1 << 15,), np.float32)
    y[...] = 3.0
    with pytest.raises(TypeError, match="copy the array instead"):
        copy.copy(y.base)
    with pytest.raises(TypeError, match="copy the array instead"):
        pickle.dumps(y.base)
    # The array itself copies and pickles as any array does: by value.
    assert np.array_equal(pickle.loads(pickle.dumps(y)), y)
    assert np.array_equal(copy.deepcopy(y), y)


def test_a_lease_freed_while_another_thread_holds_the_lock_is_settled_at_release(small_pool):
    x = np.ones((2, 16, 64, 64), np.float32)
    y = nbgn.group_norm(x, 4)
    held = threading.Event()
    release = threading.Event()

    def hold():
        pool._lock.acquire()
        held.set()
        release.wait()
        pool._unlock()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    del y
    gc.collect()
    assert len(pool._returned) == 1  # the lock was busy: queued
    release.set()
    holder.join()
    assert len(pool._returned) == 0  # settled by the holder as it let go
    assert [m.nbytes for m in pool._free] == [x.nbytes]
