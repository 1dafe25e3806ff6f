"""Which Numba threading layer nbgn's parallel kernels run on, chosen once at ``import nbgn``.

The layers, as they behave on Linux:

========== =========== ========= ==========================================================
layer      thread-safe fork-safe note
========== =========== ========= ==========================================================
tbb        yes         yes       needs ``libtbb.so.12`` (``pip install tbb``), see below
omp        yes         no        GNU OpenMP: a child forked after a parallel kernel is killed
workqueue  no          yes       concurrent launches from two threads abort the process
========== =========== ========= ==========================================================

Numba's default order picks GNU OpenMP where tbb is missing, so a data loader that forks workers after
one parallel call loses them. nbgn therefore:

1. leaves the choice alone when the user made one (``NUMBA_THREADING_LAYER`` or
   ``numba.config.THREADING_LAYER``) or when Numba's threads already run;
2. otherwise prefers tbb. The ``tbb`` wheel puts ``libtbb.so.12`` in the environment's ``lib/``, where
   the dynamic loader does not look; loading it by path first (RTLD_GLOBAL) lets Numba find it;
3. otherwise picks workqueue, which survives forks, and serializes nbgn's own parallel launches with a
   lock, since workqueue is not thread-safe. Other parallel Numba code of the user's is out of reach.

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
_choice: dict[str, Any] = {"layer": None, "reason": "not configured yet", "tbb_library": None}


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


def configure() -> None:
    """Choose the threading layer (once; cheap when called again). Runs at ``import nbgn``."""
    if _choice["layer"] is not None:
        return
    if _threads_running():
        layer = numba.threading_layer()
        reason = "already running when nbgn was imported; left as it is"
    elif (user_layer := _user_choice()) is not None:
        layer = user_layer
        reason = "chosen by the user (NUMBA_THREADING_LAYER or numba.config.THREADING_LAYER)"
    elif (library := _load_tbb()) is not None:
        layer = numba.config.THREADING_LAYER = "tbb"
        reason = "tbb is thread-safe and fork-safe"
        _choice["tbb_library"] = library
    else:
        layer = numba.config.THREADING_LAYER = "workqueue"
        reason = (
            "tbb could not be loaded (pip install tbb): workqueue survives fork, and nbgn "
            "serializes its parallel kernels because workqueue is not thread-safe"
        )
    _choice["layer"] = layer
    _choice["reason"] = reason


def _active_layer() -> str | None:
    return numba.threading_layer() if _threads_running() else None


def kernel_guard() -> contextlib.AbstractContextManager:
    """The context every parallel kernel launch runs in: a lock when the layer is not thread-safe.

    Before Numba has started its threads the layer is the configured one; named choices other
    than tbb and omp ("workqueue", or priorities such as "forksafe") may resolve to workqueue and
    are serialized until the active layer is known.
    """
    layer = _active_layer() or _choice["layer"]
    return _NO_LOCK if layer in ("tbb", "omp", "threadsafe", "safe") else _LOCK


def describe() -> dict[str, Any]:
    """What nbgn chose and why, the layer Numba actually runs (None before the first parallel
    kernel), whether nbgn serializes its launches, and the thread count."""
    active = _active_layer()
    return {
        "configured": _choice["layer"],
        "active": active,
        "reason": _choice["reason"],
        "serialized": kernel_guard() is _LOCK,
        "tbb_library": _choice["tbb_library"],
        "threads": numba.get_num_threads(),
        "max_threads": numba.config.NUMBA_NUM_THREADS,
    }
