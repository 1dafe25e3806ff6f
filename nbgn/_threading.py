"""Which Numba threading layer nbgn's parallel kernels run on, chosen once at ``import nbgn``.

The layers, as they behave on Linux:

========== =========== ========= ==========================================================
layer      thread-safe fork-safe note
========== =========== ========= ==========================================================
tbb        yes         yes       needs ``libtbb.so.12`` (``pip install tbb``), see below
omp        yes         no        GNU OpenMP: a child forked after a parallel kernel dies when
                                 it starts one; Numba's default where tbb is missing
workqueue  no          yes       concurrent launches from two threads abort the process; and
                                 each launch costs ~10x more than on the others
========== =========== ========= ==========================================================

So at import nbgn:

1. makes tbb loadable if it is installed: the ``tbb`` wheel puts ``libtbb.so.12`` in the
   environment's ``lib/``, where the dynamic loader does not look, so nbgn loads it by path first
   (RTLD_GLOBAL). This also serves a user who asked for tbb;
2. leaves the choice alone when the user made one (``NUMBA_THREADING_LAYER`` or
   ``numba.config.THREADING_LAYER``) or when Numba's threads already run;
3. otherwise picks tbb when it loads, else keeps Numba's default (GNU OpenMP, thread-safe and fast).
   A child forked after GNU OpenMP threads ran would die starting a parallel kernel, so in such a
   child nbgn runs its serial kernels instead (``serial_only()``), as data-loader workers want anyway;
4. serializes nbgn's own parallel launches with a lock when the layer is workqueue.

``describe()`` says what was chosen and why; ``python -m nbgn info`` prints it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from typing import Any

import numba

#: Environment prefixes where a pip/conda ``tbb`` package puts its shared library.
_TBB_FILES = {
    "linux": "lib/libtbb.so.12",
    "darwin": "lib/libtbb.12.dylib",
    "win32": "Library/bin/tbb12.dll",
}

_LOCK = threading.Lock()
_NO_LOCK = contextlib.nullcontext()
_choice: dict[str, Any] = {
    "layer": None,
    "reason": "not configured yet",
    "tbb_library": None,
    "serial_only": False,
}


def _threads_running() -> bool:
    from numba.np.ufunc import parallel

    return bool(parallel._is_initialized)


def _user_choice() -> str | None:
    layer = numba.config.THREADING_LAYER
    if os.environ.get("NUMBA_THREADING_LAYER") or layer != "default":
        return layer
    return None


def _load_tbb() -> str | None:
    """Make Numba's tbb layer importable; return where libtbb came from, or None if it cannot be."""
    from numba.np.ufunc import parallel

    def importable() -> bool:
        try:
            from numba.np.ufunc import tbbpool  # noqa: F401

            parallel._check_tbb_version_compatible()
        except ImportError:
            return False
        return True

    if importable():
        return "found by the dynamic loader"
    relative = _TBB_FILES.get(sys.platform)
    if relative is None:
        return None
    for prefix in dict.fromkeys((sys.prefix, sys.exec_prefix, sys.base_prefix)):
        path = os.path.join(prefix, relative)
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if importable():
            return path
    return None


#: Layer names under which Numba may pick tbb (a user's choice that tbb must be loadable for).
_MAY_USE_TBB = ("tbb", "default", "safe", "threadsafe", "forksafe")


def configure() -> None:
    """Choose the threading layer (once; cheap when called again). Runs at ``import nbgn``."""
    if _choice["layer"] is not None:
        return
    os.register_at_fork(after_in_child=_after_fork_in_child)
    if _threads_running():
        _choice["layer"] = numba.threading_layer()
        _choice["reason"] = "already running when nbgn was imported; left as it is"
        return
    user_layer = _user_choice()
    if user_layer is None or user_layer in _MAY_USE_TBB:
        _choice["tbb_library"] = _load_tbb()
    if user_layer is not None:
        _choice["layer"] = user_layer
        _choice["reason"] = (
            "chosen by the user (NUMBA_THREADING_LAYER or numba.config.THREADING_LAYER)"
        )
    elif _choice["tbb_library"] is not None:
        _choice["layer"] = numba.config.THREADING_LAYER = "tbb"
        _choice["reason"] = "tbb is thread-safe and fork-safe"
    else:
        _choice["layer"] = "default"
        _choice["reason"] = (
            "tbb is not installed (pip install tbb): Numba's default order (GNU OpenMP first); "
            "in a process forked after OpenMP threads ran, nbgn runs its serial kernels"
        )


def _after_fork_in_child() -> None:
    if _threads_running() and numba.threading_layer() == "omp":
        from numba.np.ufunc import omppool

        _choice["serial_only"] = omppool.openmp_vendor == "GNU"


def serial_only() -> bool:
    """True in a child forked after GNU OpenMP threads ran: parallel kernels would kill it."""
    return _choice["serial_only"]


def _active_layer() -> str | None:
    return numba.threading_layer() if _threads_running() else None


def kernel_guard() -> contextlib.AbstractContextManager:
    """The context every parallel kernel launch runs in: a lock when the layer is not thread-safe.

    Before Numba has started its threads the layer is the configured one; "workqueue" and
    "forksafe" (which may resolve to workqueue) are serialized until the active layer is known.
    Numba's default order only reaches workqueue when neither tbb nor OpenMP loads; the lock
    follows once that is known.
    """
    layer = _active_layer() or _choice["layer"]
    return _NO_LOCK if layer in ("tbb", "omp", "threadsafe", "safe", "default") else _LOCK


def describe() -> dict[str, Any]:
    """What nbgn chose and why, the layer Numba actually runs (None before the first parallel
    kernel), whether nbgn serializes its launches, and the thread count."""
    active = _active_layer()
    return {
        "configured": _choice["layer"],
        "active": active,
        "reason": _choice["reason"],
        "serialized": kernel_guard() is _LOCK,
        "serial_only": serial_only(),
        "tbb_library": _choice["tbb_library"],
        "threads": numba.get_num_threads(),
        "max_threads": numba.config.NUMBA_NUM_THREADS,
    }
