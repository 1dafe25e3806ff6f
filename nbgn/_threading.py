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

Measured on a 2-core machine, tbb costs more per launch than OpenMP (45 against 28 us for a
(4, 128, 32, 32) group norm) and, its workers spinning after each call, starves a PyTorch running in
the same process (a 128 KB ``F.group_norm`` took 4.5 ms instead of 7.5 us). So at import nbgn:

1. leaves the choice alone when the user made one (``NUMBA_THREADING_LAYER``,
   ``NUMBA_THREADING_LAYER_PRIORITY`` or ``numba.config``) or when Numba's threads already run;
2. otherwise asks Numba for OpenMP first, then tbb, then workqueue;
3. makes tbb loadable when it is installed and may be used: the ``tbb`` wheel puts ``libtbb.so.12``
   in the environment's ``lib/``, where the dynamic loader does not look, so nbgn loads it by path
   (RTLD_GLOBAL). This also serves a user who asked for tbb;
4. in a child forked after GNU OpenMP threads ran, where a parallel launch would kill the child, runs
   its serial kernels instead (``serial_only()``), as data-loader workers want anyway;
5. serializes its own parallel launches with a lock on workqueue (a new lock in a forked child).

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
from numba.np.ufunc import parallel as _numba_parallel

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
    "guard": None,
}


def _threads_running() -> bool:
    return bool(_numba_parallel._is_initialized)


def _user_choice() -> str | None:
    layer = numba.config.THREADING_LAYER
    if os.environ.get("NUMBA_THREADING_LAYER") or layer != "default":
        return layer
    # Numba's own default order, unless set by the environment or in numba.config before import.
    if os.environ.get("NUMBA_THREADING_LAYER_PRIORITY") or list(
        numba.config.THREADING_LAYER_PRIORITY
    ) != ["tbb", "omp", "workqueue"]:
        return "default"
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
            "chosen by the user (NUMBA_THREADING_LAYER, NUMBA_THREADING_LAYER_PRIORITY or numba.config)"
        )
        return
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    _choice["layer"] = "default"
    _choice["reason"] = (
        "OpenMP first (cheapest launch; shares the cores with PyTorch's OpenMP), then tbb, then "
        "workqueue (serialized); serial kernels in a process forked after GNU OpenMP threads ran"
    )


def _after_fork_in_child() -> None:
    global _LOCK
    # A thread of the parent may have been inside a serialized launch at the fork: the child has
    # its lock, held, but not the thread that would release it.
    _LOCK = threading.Lock()
    _choice["guard"] = None
    if _threads_running() and numba.threading_layer() == "omp":
        from numba.np.ufunc import omppool

        _choice["serial_only"] = omppool.openmp_vendor == "GNU"


def num_threads() -> int:
    """``numba.get_num_threads()``, without the locks it takes on every call once threads run
    (through Numba's private ``_get_num_threads``, where it has one)."""
    get = getattr(_numba_parallel, "_get_num_threads", None)
    if _numba_parallel._is_initialized and get is not None:
        return get()
    return numba.get_num_threads()


def running_num_threads() -> int | None:
    """``num_threads()`` once Numba's threads run, else None: without starting them, as
    ``numba.get_num_threads()`` does (after which, on GNU OpenMP, forked children run serially)."""
    return num_threads() if _numba_parallel._is_initialized else None


def serial_only() -> bool:
    """True in a child forked after GNU OpenMP threads ran: parallel kernels would kill it."""
    return _choice["serial_only"]


#: Configured names that can only resolve to a thread-safe layer ("safe" is tbb; "threadsafe" is
#: tbb or omp). "default" and "forksafe" may fall through to workqueue when nothing else loads.
_THREAD_SAFE = ("tbb", "omp", "threadsafe", "safe")


def _active_layer() -> str | None:
    """The layer Numba loaded, or None before its first parallel launch (it chooses lazily)."""
    return numba.threading_layer() if _threads_running() else None


def kernel_guard() -> contextlib.AbstractContextManager:
    """The context every parallel kernel launch runs in: a lock when the layer is not thread-safe.

    Once Numba's threads run, the lock is taken only on workqueue. Before that the layer is
    unknown unless the configured name is thread-safe whatever it resolves to, so the first
    launches are serialized: under "default" on a machine with neither tbb nor OpenMP, threads
    racing to the first launch would otherwise reach workqueue concurrently and abort.
    """
    if _choice["guard"] is not None:
        return _choice["guard"]
    active = _active_layer()
    if active is not None:
        # The active layer never changes once loaded: decide once.
        _choice["guard"] = _NO_LOCK if active in _THREAD_SAFE else _LOCK
        return _choice["guard"]
    return _NO_LOCK if _choice["layer"] in _THREAD_SAFE else _LOCK


def describe() -> dict[str, Any]:
    """What nbgn chose and why, and what runs.

    Returns
    -------
    dict
        ``configured`` (the layer name nbgn set or found), ``active`` (what Numba loaded; None
        before the first parallel kernel), ``reason``, ``serialized`` (nbgn's parallel launches
        take a lock: the active layer is workqueue; None while not yet known), ``serial_only``
        (this process was forked after GNU OpenMP threads ran, so nbgn runs serial kernels),
        ``tbb_library``, ``threads`` (``numba.get_num_threads()``) and ``max_threads``.
    """
    active = _active_layer()
    if active is not None:
        serialized: bool | None = active not in _THREAD_SAFE
    elif _choice["layer"] in _THREAD_SAFE or _choice["layer"] == "workqueue":
        serialized = _choice["layer"] == "workqueue"
    else:
        serialized = None
    return {
        "configured": _choice["layer"],
        "active": active,
        "reason": _choice["reason"],
        "serialized": serialized,
        "serial_only": serial_only(),
        "tbb_library": _choice["tbb_library"],
        "threads": numba.get_num_threads(),
        "max_threads": numba.config.NUMBA_NUM_THREADS,
    }
