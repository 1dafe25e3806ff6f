"""``nbgn/kernels/refcounts.py``: borrowed views are their arrays' memory, without an owner."""

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from nbgn.kernels.moments import cast_like, merge_stats
from nbgn.kernels.refcounts import borrowed, keep_alive


@intrinsic
def _has_owner(typingctx, array):
    """Whether ``array``'s meminfo is not null (it counts references)."""

    def codegen(context, builder, sig, args):
        view = context.make_array(sig.args[0])(context, builder, value=args[0])
        return cgutils.is_not_null(builder, view.meminfo)

    return types.boolean(array), codegen


@numba.njit
def _owners(a):
    return _has_owner(a), _has_owner(borrowed(a)), _has_owner(borrowed(a)[1:])


def test_a_borrowed_view_and_its_slices_have_no_owner():
    assert _owners(np.zeros(4)) == (True, False, False)


@numba.njit
def _store_through_a_borrowed_view(stats, row, value):
    """A store nothing reads afterwards, into a borrowed view, beside an overload inlined into
    this function (``cast_like``): Numba's dead-code elimination runs after such an inlining."""
    view = borrowed(stats)
    merge_stats(view, row, 3, cast_like(value, stats), 0.5)


@numba.njit
def _allocate_and_fill(length):
    memory = np.zeros(length)
    view = borrowed(memory)
    for i in range(length):
        view[i] = i
    total = view.sum()
    keep_alive((memory,))
    return total


def test_stores_through_a_borrowed_view_reach_the_array():
    stats = np.zeros((2, 3))
    _store_through_a_borrowed_view(stats, 1, 7.0)
    np.testing.assert_array_equal(stats, [[0.0, 0.0, 0.0], [3.0, 7.0, 0.5]])
    assert _allocate_and_fill(1000) == 999 * 1000 / 2


def test_none_stays_none():
    assert numba.njit(lambda: borrowed(None))() is None
