"""Compiling one kernel body twice: parallel for large inputs, serial for small ones.

Only for bodies that do more than hand each thread one function call. Where a parallel kernel's
loop only calls one function per run of units (``nchw.normalize_slabs``,
``nhwc.normalize_samples``, ...), the serial path calls that function itself (``api._kernels``).
Numba links a callee's code into each caller and optimizes it there again, so a twin of such a
loop cost a second optimization of that function: a first serial call in a fresh cache took 18.0
s with the twin and 15.8 s without (NHWC lanes), 7.1 and 6.1-6.7 s (NCHW).
"""

import types

import numba


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
    return numba.njit(cache=True, parallel=True)(body), numba.njit(cache=True)(twin)
