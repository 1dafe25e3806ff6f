"""Atomic counters on int64 arrays, for threads of one parallel kernel that wait for each other.

Numba has no atomics; these intrinsics emit LLVM's. ``atomic_add`` is sequentially consistent and
``atomic_load`` an acquire: what a thread wrote before it counted is visible to a thread that sees
the count.
"""

import numba
import numpy as np
from llvmlite import binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _counter_pointer(context, builder, array_type, array, index):
    """Pointer to ``array[index]`` (no wraparound, no bounds check)."""
    values = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, values, [index], wraparound=False)


@intrinsic
def atomic_add(typingctx, counters, index, value):
    """``counters[index] += value`` atomically; returns the value before the addition."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64):
        return None
    signature = types.int64(counters, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        pointer = _counter_pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", pointer, args[2], "seq_cst")

    return signature, codegen


@intrinsic
def atomic_load(typingctx, counters, index):
    """``counters[index]``, read atomically (acquire)."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64):
        return None
    signature = types.int64(counters, types.intp)

    def codegen(context, builder, sig, args):
        pointer = _counter_pointer(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(pointer, "acquire", 8)

    return signature, codegen


@intrinsic
def spin_pause(typingctx):
    """A hint inside a spin-wait loop (x86 ``pause``, which spares the other hyperthread and the
    memory order machinery; nothing elsewhere)."""
    signature = types.void()

    def codegen(context, builder, sig, args):
        if binding.get_process_triple().startswith(("x86_64", "i386", "i686")):
            pause = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"
            )
            builder.call(pause, [])
        return context.get_dummy_value()

    return signature, codegen


@numba.njit(inline="always")
def cooperative_counters(num_units, num_threads):
    """``(progress, started)`` for threads that take units one after the other, a part each (see
    ``claim``): per unit a count of finished first-phase parts, then a claim per part and phase;
    a flag per thread, set when it starts."""
    return np.zeros(num_units * (1 + 2 * num_threads), np.int64), np.zeros(num_threads, np.int64)


@numba.njit(inline="always")
def claim(progress, started, slot, part, thread, num_threads):
    """Whether ``thread`` takes ``part``: its own part, or the part of a thread that has not
    started (so that a layer running the threads' loop bodies one after another still finishes),
    and nobody took it before (``progress[slot]``, counted atomically)."""
    owner = part % num_threads
    if owner != thread and atomic_load(started, owner) != 0:
        return False
    return atomic_add(progress, slot, 1) == 0


@numba.njit(inline="always")
def wait_for(progress, slot, count):
    """Spin until ``progress[slot]`` reaches ``count``."""
    while atomic_load(progress, slot) < count:
        spin_pause()
