"""Arrays without reference counts, for the kernels' loops.

Numba counts the references to an array's memory (its *meminfo*) with atomic increments and
decrements: when an array is copied into a variable, sliced, or passed to a function compiled on
its own, where its optimizer cannot pair them up and drop them. On x86 an atomic add is a full
barrier: it waits until every store before it has left the core. Normalizing in place, those
stores hit lines already in L1 and the wait is short. Out of place, each store waits for its line
to be read for ownership, or for its non-temporal write to reach memory, and a barrier per slab or
per channel stalls the loop: one thread, (128, 64, 28, 28)/32 float32 out of place, 3.1 ms with
the counts against 1.2 ms without (1.0 ms in place).

So each per-thread kernel first takes ``borrowed`` views of its arrays: the same arrays with no
meminfo, whose copies, slices and calls count nothing. A borrowed view does not keep its memory
alive. For the kernel's arguments the caller does; an array the kernel allocates itself stays
alive through ``keep_alive`` after its last borrowed use (never borrow a temporary).

One ``name = borrowed(array)`` a statement: Numba's alias analysis, told below that the result is
its argument's memory, does not follow values through the tuple of a longer assignment such as
``x, out, weight, bias = borrowed(x), ...``, and its dead-code elimination would then drop a store
into the view that nothing reads afterwards (``tests/test_refcounts.py`` checks the sources).
"""

from numba import types
from numba.core import cgutils, ir_utils
from numba.extending import intrinsic


@intrinsic
def borrowed(typingctx, array):
    """``array`` with a null meminfo (and parent): views and calls of it count no references.
    ``None`` stays ``None`` (an in-place kernel's ``out``)."""
    if isinstance(array, types.NoneType):
        return array(array), lambda context, builder, sig, args: args[0]
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, sig, args):
        view = context.make_array(sig.args[0])(context, builder, value=args[0])
        view.meminfo = cgutils.get_null_value(view.meminfo.type)
        view.parent = cgutils.get_null_value(view.parent.type)
        return view._getvalue()

    return array(array), codegen


@intrinsic
def keep_alive(typingctx, arrays):
    """Nothing, but a use of each array of the tuple ``arrays``: Numba releases a variable's
    reference after its last use, so an allocation whose loop works on a ``borrowed`` view of it
    is kept until here."""
    if not isinstance(arrays, types.BaseTuple):
        return None
    return types.none(arrays), lambda context, builder, sig, args: context.get_dummy_value()


def _aliases_its_argument(lhs, args, alias_map, arg_aliases):
    ir_utils._add_alias(lhs, args[0].name, alias_map, arg_aliases)


# A borrowed view is its argument's memory. Without this, Numba's alias analysis takes the
# intrinsic's result for a new array, and its dead-code elimination (which runs after inlining an
# overload) drops stores into a view that nothing reads afterwards.
ir_utils.alias_func_extensions[("borrowed", __name__)] = _aliases_its_argument
