"""How kernels are compiled: each per-thread function once, on its own; parallel loops that call
it through its address; serial twins of the few parallel bodies that do more than that.

Numba links the code of a function called by name into each caller and optimizes it there again,
in every parallel kernel (one per dtype, in place or not, and sum type). So the parallel kernels
call their per-thread functions through ``call_compiled``, with the address that
``compiled_address`` finds for the types the kernel passes: a parallel kernel is then a loop and a
call, compiled in about half a second, and its callee's compiled code (and cache entry) is the one
the serial path runs. A first parallel call in a fresh cache (float32, out of place) went from 26.7
to 17.5 s in NHWC, 10.2 to 6.5 s in NCHW; one NHWC sample split among the threads from 31.7 to
17.7 s, and in place (cooperative) from 33.2 to 19.9 s.

Where a parallel kernel's loop only calls one function per run of units (``nchw.normalize_slabs``,
``nhwc.normalize_samples``, ...), the serial path calls that function itself (``api._kernels``).
``parallel_and_serial`` twins remain for the moments-only and roofline kernels.

Every cached kernel is made by ``cached_njit``, whose loads from a warm cache skip the refresh of
Numba's compiler context: see ``WarmLoadCache``.
"""

import re
import types

import numba
import numpy as np
from numba import types as numba_types
from numba.core import caching, cgutils
from numba.core.dispatcher import Dispatcher
from numba.core.runtime import nrt
from numba.extending import intrinsic


class WarmLoadCache(caching.FunctionCache):
    """Numba's on-disk cache of a function, loading without refreshing the compiler's context.

    Numba's ``load_overload`` first refreshes the target context: it imports and registers every
    implementation the compiler might need (``numba.np.linalg``, the typed containers, the random
    generators, ...), 105-146 ms on this machine and ~37K more objects for every later garbage
    collection, the interpreter's at exit included. A cached function needs none of it: its
    machine code is linked against the runtime (NRT, initialized here, as the refresh would) and
    the helper symbols the context registered when it was made. A compile, for a signature not in
    the cache, refreshes the context itself, as it always does.
    """

    def load_overload(self, sig, target_context):
        nrt.rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)


#: The Numba versions whose caching ``WarmLoadCache`` was checked against (0.59.1 and 0.68.1: the
#: code it overrides and calls is the same in both, and of the symbols that only the refresh
#: registers, a loaded kernel needs NRT's; the other ones, the string hash's secret, nbgn's kernels
#: do not use). Other versions keep Numba's own cache: a symbol that only the refresh registered
#: would abort the process when the code is linked, not fall back.
WARM_LOAD_VERSIONS = ((0, 59), (0, 68))

#: Whether kernels load through ``WarmLoadCache`` in this process.
_VERSION = re.match(r"(\d+)\.(\d+)", numba.__version__)
WARM_LOADS = _VERSION is not None and (
    WARM_LOAD_VERSIONS[0] <= tuple(map(int, _VERSION.groups())) <= WARM_LOAD_VERSIONS[1]
)


def cached_njit(**options):
    """``numba.njit(cache=True, **options)``, with a ``WarmLoadCache`` where ``WARM_LOADS``."""

    def compile_lazily(function):
        if not WARM_LOADS:
            return numba.njit(cache=True, **options)(function)
        dispatcher = numba.njit(**options)(function)
        if isinstance(dispatcher, Dispatcher):  # not a plain function (NUMBA_DISABLE_JIT)
            # What cache=True (enable_caching) sets, with this class: letting Numba make its
            # own first would cost ~55 us a function, 4 ms an import.
            dispatcher._cache = WarmLoadCache(dispatcher.py_func)
        return dispatcher

    return compile_lazily


def parallel_and_serial(body):
    """Return ``(parallel, serial)`` dispatchers of ``body``, both lazily compiled and cached.

    The serial twin exists because launching a parallel region costs microseconds, more than a
    small group norm takes. ``prange`` runs as ``range`` in it. Numba's cache key ignores the
    ``parallel`` flag, so the twin gets its own qualified name and thus its own cache files.
    """
    twin = types.FunctionType(
        body.__code__,
        body.__globals__,
        body.__name__ + "_serial",
        body.__defaults__,
        body.__closure__,
    )
    twin.__qualname__ = body.__qualname__ + "_serial"
    twin.__doc__ = body.__doc__
    return cached_njit(parallel=True)(body), cached_njit()(twin)


def callee_type(numba_type):
    """The type a function called through ``call_compiled`` is compiled for, given the type of the
    value passed: arrays writable and aligned (flags that do not change an array's struct, so the
    cast is free), integers int64; other types as they are."""
    if isinstance(numba_type, numba_types.Array):
        return numba_types.Array(numba_type.dtype, numba_type.ndim, numba_type.layout)
    if isinstance(numba_type, numba_types.Integer):
        return numba_types.int64
    return numba_type


#: The argument types of every ``call_compiled`` compiled in this process (none are when a kernel
#: loads from the cache): a test compares them with the signatures ``compiled_address`` compiles.
LOWERED_CALLS: set = set()


@intrinsic
def call_compiled(typingctx, address, arguments):
    """Call the compiled function at ``address`` (from ``compiled_address``) with the tuple
    ``arguments``; it must return nothing. An exception it raises propagates.

    The address is a run-time value, so a cached kernel stays valid in the next process, and the
    callee's code is not linked into the caller. The caller must pass exactly the kinds of values
    the address was found for (``callee_type`` of each): nothing checks it when the code runs.
    """
    if not isinstance(address, numba_types.Integer) or not isinstance(
        arguments, numba_types.BaseTuple
    ):
        return None
    passed = tuple(arguments.types)
    expected = tuple(callee_type(t) for t in passed)
    signature = numba_types.none(address, arguments)

    def codegen(context, builder, sig, args):
        LOWERED_CALLS.add(expected)
        function_type = context.call_conv.get_function_type(numba_types.none, expected)
        callee = builder.inttoptr(args[0], function_type.as_pointer())
        values = [
            context.cast(builder, builder.extract_value(args[1], i), passed[i], expected[i])
            if isinstance(passed[i], numba_types.Integer)
            else builder.extract_value(args[1], i)  # the same struct, whatever its flags
            for i in range(len(passed))
        ]
        status, _ = context.call_conv.call_function(
            builder, callee, numba_types.none, expected, values
        )
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return signature, codegen


_ADDRESSES: dict = {}


def compiled_address(function, example_arguments) -> int:
    """The address of ``function`` (a ``numba.njit`` dispatcher) compiled for the types of
    ``example_arguments`` as ``call_compiled`` passes them (``callee_type``); compiled, or loaded
    from the cache, on the first request. Memoized by those types."""
    signature = tuple(callee_type(numba.typeof(value)) for value in example_arguments)
    key = (function, signature)
    address = _ADDRESSES.get(key)
    if address is None:
        function.compile(signature)
        compiled = function.overloads[signature]
        if compiled.signature.return_type != numba_types.none:
            raise TypeError(f"{function} returns a value: call_compiled takes none")
        address = compiled.library.get_pointer_to_function(compiled.fndesc.mangled_name)
        if not address:
            raise RuntimeError(f"no compiled code of {function} for {signature}")
        _ADDRESSES[key] = address
    return address


# The addresses of the functions the split and cooperative kernels of both layouts call, for a
# kernel's ``x`` (an array, or an empty one of its dtype), ``out`` (None or such an array) and
# ``sum_type``: found from examples of the values each call passes, in its order (any int stands
# for an int). The fused kernels' per-thread functions take the serial call's arguments
# (``api._addresses``).

#: Examples of the scratch the split and cooperative kernels pass: the moments of parts, the
#: groups' reference values (float64) and the counters of ``atomics.cooperative_counters``.
PARTIAL, REFS, COUNTERS = np.empty((0, 3)), np.empty(0), np.empty(0, np.int64)


def apply_part_address(apply_part, x, out):
    """A layout's ``apply_part``: ``(x, out, partial, refs, 5 ints, weight, bias, eps)``."""
    return compiled_address(apply_part, (x, out, PARTIAL, REFS, 0, 0, 0, 0, 0, x, x, 0.0))


def together_address(together, x, out, sum_type):
    """A layout's share of a cooperative kernel (``normalize_slabs_together``,
    ``normalize_samples_together``): ``(x, out, 4 ints, weight, bias, eps, sum_type, thread,
    num_threads, progress, partial, refs, started)``."""
    return compiled_address(
        together, (x, out, 0, 0, 0, 0, x, x, 0.0, sum_type, 0, 0, COUNTERS, PARTIAL, REFS, COUNTERS)
    )
