"""``nbgn.info()`` and ``python -m nbgn info``: what a bug report needs to know about this machine."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numba
import numpy as np

from . import _threading


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_features() -> dict[str, Any]:
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    wanted = ("sse4.2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "neon", "sve")
    return {
        "llvm_cpu_name": binding.get_host_cpu_name(),
        "vector_features": [name for name in wanted if features.get(name, False)],
    }


def _cache_directory() -> str:
    """Where Numba caches nbgn's compiled kernels (``NUMBA_CACHE_DIR``, else next to the sources
    when that is writable, else Numba's per-user cache directory)."""
    from .kernels import nchw

    try:
        return nchw.group_norm_fused._cache._cache_path  # Numba's own locator decided this
    except AttributeError:  # a Numba without this private attribute: the documented rule
        if numba.config.CACHE_DIR:
            return numba.config.CACHE_DIR
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "__pycache__")


def _openmp_vendor() -> str | None:
    """Whose OpenMP Numba's omp layer runs on, where it loaded: GNU's is not fork-safe, Intel's is."""
    from numba.np.ufunc import parallel

    if not parallel._is_initialized or numba.threading_layer() != "omp":
        return None
    from numba.np.ufunc import omppool

    return omppool.openmp_vendor


def info() -> dict[str, Any]:
    """Versions, threading layer and threads, cache directory and CPU, as a JSON-able dict."""
    from . import __version__

    return {
        "nbgn": __version__,
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "numba": numba.__version__,
        "llvmlite": _version("llvmlite"),
        "tbb": _version("tbb"),
        "torch": _version("torch"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        **_cpu_features(),
        "threading": {**_threading.describe(), "openmp": _openmp_vendor()},
        "cache_dir": _cache_directory(),
        "environment": {
            name: os.environ[name]
            for name in ("NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "NUMBA_CACHE_DIR")
            if name in os.environ
        },
    }


def format_info(details: dict[str, Any] | None = None) -> str:
    """``info()`` as aligned ``key: value`` lines."""
    details = info() if details is None else details
    lines = []
    for key, value in details.items():
        if isinstance(value, dict) and not value:
            lines.append(f"{key:<14} (none)")
        elif isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {inner:<12} {inner_value}" for inner, inner_value in value.items())
        elif isinstance(value, list):
            lines.append(f"{key:<14} {' '.join(value)}")
        else:
            lines.append(f"{key:<14} {value}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nbgn info",
        description="Versions, threading, cache and CPU, for bug reports.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    # Numba loads its threading layer at the first parallel launch: one tiny launch here makes
    # "active" report the layer that really loads on this machine, not just the configured name.
    from .kernels import roofline

    if not _threading.serial_only():  # where a parallel launch would kill this process
        with _threading.kernel_guard():
            roofline.scale_flat_parallel(np.ones(64), 1.0)
    details = info()
    print(json.dumps(details, indent=2) if args.json else format_info(details))
    return 0
