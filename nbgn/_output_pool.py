"""New outputs of 32 MiB or more, from a small pool of recently freed ones.

glibc's malloc maps an allocation this large afresh from the OS every time (it reuses freed memory
only below 32 MiB), so the kernel faults in and zeroes every page when the group norm first writes
it. On a VM whose host takes back the guest's freed pages, as here, that costs several times the
group norm: (1, 32, 512, 512)/8 float32 allocating took 2.3-9.7 ms, against 1.0-1.6 ms into a warm
``out=`` and 0.4-0.9 ms in place.

So such outputs are private anonymous mappings that nbgn keeps. Each array handed out is made
from a *lease*, an object whose ``__array_interface__`` points at its mapping, and NumPy keeps the
lease as the array's base: every view of the array, however derived, holds it. When the lease is
collected, the mapping goes back to the pool, which keeps the ``MAX_FREE`` most recently freed
ones, up to ``MAX_FREE_BYTES`` in all, and unmaps the others. An array from the pool does not own
its memory (``flags.owndata`` is False; ``resize`` refuses it).
"""

from __future__ import annotations

import collections
import contextlib
import math
import mmap
import os
import threading
import weakref

import numpy as np

#: Outputs from this size come from the pool: glibc's largest reuse threshold (its
#: DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems).
MIN_BYTES = 32 << 20

#: Freed mappings kept: two serve a loop that rebinds its result (``y = group_norm(x, g)``), where
#: the previous result is freed after the next one is made.
MAX_FREE = 2

#: At most this much freed memory is kept; a larger freed output is unmapped at once.
MAX_FREE_BYTES = 128 << 20

_MAP_FLAGS = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
SUPPORTED = None not in _MAP_FLAGS


class _Mapping:
    """A private anonymous mapping of ``nbytes``, and its address."""

    __slots__ = ("_export", "_memory", "address", "nbytes")

    def __init__(self, nbytes: int):
        self._memory = mmap.mmap(-1, nbytes, flags=_MAP_FLAGS[0] | _MAP_FLAGS[1])
        if hasattr(self._memory, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
            self._memory.madvise(mmap.MADV_HUGEPAGE)  # as NumPy advises for its large arrays
        # An export of the mapping gives its address; it is dropped before the unmap. Arrays hold
        # no export: what keeps the mapping theirs is their lease (see the module notes).
        self._export = np.frombuffer(self._memory, np.uint8)
        self.address = self._export.__array_interface__["data"][0]
        self.nbytes = nbytes

    def close(self) -> None:
        self._export = None
        self._memory.close()


class _Lease:
    """What an array from the pool has as its base: see the module notes."""

    __slots__ = ("__array_interface__", "__weakref__")

    def __reduce__(self):
        # A copy would point at the mapping without holding it; a pickle would carry a raw address.
        raise TypeError(
            "a pooled array's lease cannot be copied or pickled; copy the array instead"
        )


_free: list[_Mapping] = []  # oldest first; changed only under _lock
# Freed mappings on their way to _free. A lease can be collected anywhere, a garbage collection
# inside this module's own locked code included, so its finalizer only appends here and settles
# the queue if the lock is free; whoever holds the lock settles it again after letting go
# (_unlock), so that nothing waits there for the next call.
_returned: collections.deque[_Mapping] = collections.deque()
_lock = threading.Lock()


def empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized C-contiguous array, like ``np.empty(shape, dtype)``; from the pool when
    it has ``MIN_BYTES`` or more."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES or not SUPPORTED:
        return np.empty(shape, dtype)
    mapping = _take(nbytes)
    lease = _Lease()
    lease.__array_interface__ = {
        "shape": tuple(shape),
        "typestr": dtype.str,
        "data": (mapping.address, False),
        "version": 3,
    }
    weakref.finalize(lease, _give_back, mapping).atexit = False
    return np.asarray(lease)


def free_bytes() -> int:
    """Bytes of freed outputs the pool holds."""
    with _settled():
        return sum(mapping.nbytes for mapping in _free)


def clear() -> None:
    """Unmap every freed output the pool holds."""
    with _settled():
        mappings = _free[:]
        _free.clear()
    for mapping in mappings:
        mapping.close()


def _take(nbytes: int) -> _Mapping:
    with _settled():
        sizes = [mapping.nbytes for mapping in _free]
        if nbytes in sizes:  # the most recently freed of that size: the warmest
            return _free.pop(len(sizes) - 1 - sizes[::-1].index(nbytes))
    return _Mapping(nbytes)


def _give_back(mapping: _Mapping) -> None:
    _returned.append(mapping)
    _settle_if_unlocked()


@contextlib.contextmanager
def _settled():
    """The lock held, with the returned mappings already in ``_free``."""
    _lock.acquire()
    try:
        _settle()
        yield
    finally:
        _unlock()


def _unlock() -> None:
    """Release the lock, then settle what finalizers queued while it was held."""
    _lock.release()
    _settle_if_unlocked()


def _settle_if_unlocked() -> None:
    """Settle the returned mappings, unless someone holds the lock (they will as they let go)."""
    while _returned and _lock.acquire(blocking=False):
        try:
            _settle()
        finally:
            _lock.release()


def _settle() -> None:
    """Move returned mappings into ``_free`` within its bounds, unmapping the rest (lock held)."""
    while _returned:
        mapping = _returned.popleft()
        if mapping.nbytes > MAX_FREE_BYTES:
            mapping.close()
            continue
        _free.append(mapping)
        while len(_free) > MAX_FREE or sum(m.nbytes for m in _free) > MAX_FREE_BYTES:
            _free.pop(0).close()


def _after_fork_in_child() -> None:
    # A thread of the parent may have held the lock at the fork; the child has only this thread.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
