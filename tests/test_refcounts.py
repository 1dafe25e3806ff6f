"""``nbgn/kernels/refcounts.py``: borrowed views are their arrays' memory, without an owner."""

import ast
from pathlib import Path

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from nbgn.kernels import refcounts
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


def _allocation_after_a_borrowed_use(keep):
    """A function of ``length``: whether an allocation made after ``memory``'s last borrowed use
    lands where ``memory`` is, as it does once Numba has released ``memory``; with ``keep``,
    ``keep_alive`` holds it."""

    def reuses_freed_memory(length):
        memory = np.empty(length)
        view = borrowed(memory)
        view[0] = 1.0
        other = np.empty(length)
        same = other.ctypes.data == view.ctypes.data
        if keep:
            keep_alive((memory,))
        return same

    return numba.njit(reuses_freed_memory)


def test_keep_alive_holds_an_allocation():
    kept, released = (_allocation_after_a_borrowed_use(keep) for keep in (True, False))
    lengths = (8, 1000, 100_000)
    assert not any(kept(length) for length in lengths)
    # The control: without keep_alive, Numba releases the memory at its last use, the borrowing.
    assert all(released(length) for length in lengths)


def test_kernels_borrow_one_array_a_statement():
    """No tuple assignment of ``borrowed`` calls in the kernels: Numba's alias analysis does not
    follow a value through the tuple, and would let its dead-code elimination drop stores into
    the view (see ``refcounts``)."""
    offenders = []
    for path in sorted(Path(refcounts.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(
                isinstance(call, ast.Call) and getattr(call.func, "id", None) == "borrowed"
                for call in ast.walk(node.value)
            ):
                simple = len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                if not simple or not isinstance(node.value, ast.Call):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders
