"""``nbgn/kernels/simd.py`` on other hosts: the vector width and the longest register row follow
the CPU (64-byte vectors and 512-byte rows with AVX-512, 32 and 128 with AVX2, 16 bytes
elsewhere). Each configuration is compiled in a child process with a fresh cache and checked
against the float64 reference, rows in registers and rows too long for them, and NCHW channels
around a vector's length, in place and not. The L1 size that chooses between the NHWC sweeps and
one row at a time is read from Linux's description of the caches, or assumed."""

import os
import subprocess
import sys

import pytest

from nbgn.kernels import simd

CHECK = """
import numpy as np
import nbgn.kernels.simd as simd
simd._host_row_limits = lambda: LIMITS
import nbgn
from reference import reference_group_norm
worst = 0.0
for channels in (3, 8, 16, 48, 64, 128, 136):
    groups = 1 if channels == 3 else channels // 4
    for dtype, tolerance in ((np.float32, 1e-5), (np.float64, 1e-12)):
        rng = np.random.default_rng(channels)
        x = (rng.standard_normal((2, 9, 37, channels)) * 3 + 7).astype(dtype)
        weight = rng.standard_normal(channels).astype(dtype)
        bias = rng.standard_normal(channels).astype(dtype)
        expected = reference_group_norm(x, groups, weight, bias, 1e-5, "NHWC")
        y = nbgn.group_norm(x, groups, weight, bias, layout="NHWC")
        nbgn.group_norm(x, groups, weight, bias, layout="NHWC", out=x)
        worst = max(worst, abs(y - expected).max() / tolerance, abs(x - expected).max() / tolerance)
# NCHW channels around a vector's length (simd.apply_channels), in slabs too long for the short path.
for spatial in (7, 8, 9, 17, 49):
    for dtype, tolerance in ((np.float32, 1e-5), (np.float64, 1e-12)):
        rng = np.random.default_rng(spatial)
        x = (rng.standard_normal((1, 128, spatial)) * 3 + 7).astype(dtype)
        weight = rng.standard_normal(128).astype(dtype)
        bias = rng.standard_normal(128).astype(dtype)
        expected = reference_group_norm(x, 4, weight, bias, 1e-5, "NCHW")
        y = nbgn.group_norm(x, 4, weight, bias)
        nbgn.group_norm(x, 4, weight, bias, out=x)
        worst = max(worst, abs(y - expected).max() / tolerance, abs(x - expected).max() / tolerance)
print(worst)
"""


@pytest.mark.parametrize("limits", [(32, 128)])  # AVX2: each configuration compiles for ~50 s
def test_other_vector_widths_match_reference(tmp_path, limits):
    env = {
        **os.environ,
        "NUMBA_CACHE_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }
    done = subprocess.run(
        [sys.executable, "-c", CHECK.replace("LIMITS", repr(limits))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) <= 1.0


def _describe_caches(root, *caches):
    """Write sysfs-like cache folders ``index0, ...`` of ``(level, type, size)`` under ``root``."""
    for i, (level, kind, size) in enumerate(caches):
        index = root / f"index{i}"
        index.mkdir(parents=True)
        for name, value in (("level", level), ("type", kind), ("size", size)):
            (index / name).write_text(f"{value}\n")


@pytest.mark.parametrize(
    ("caches", "expected"),
    [
        (((1, "Instruction", "32K"), (1, "Data", "48K"), (2, "Unified", "1024K")), 48 * 1024),
        (((2, "Unified", "512K"), (1, "Data", "32K")), 32 * 1024),
        (((1, "Unified", "64K"),), 64 * 1024),
        (((1, "Instruction", "64K"), (2, "Unified", "1024K")), 32 * 1024),  # no L1 data: assumed
        (((1, "Data", "big"),), 32 * 1024),  # unreadable size: assumed
    ],
)
def test_l1_data_bytes_read_from_sysfs(tmp_path, monkeypatch, caches, expected):
    _describe_caches(tmp_path, *caches)
    monkeypatch.setattr(simd, "_CACHE_INFO", tmp_path)
    assert simd._host_l1_data_bytes.__wrapped__() == expected


def test_l1_data_bytes_without_sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(simd, "_CACHE_INFO", tmp_path / "missing")
    assert simd._host_l1_data_bytes.__wrapped__() == 32 * 1024
