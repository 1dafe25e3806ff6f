"""The independent float64 (corrected) two-pass reference every test compares with (plain NumPy, no nbgn)."""

from __future__ import annotations

import numpy as np


def to_channels_first(x: np.ndarray, layout: str) -> np.ndarray:
    return np.moveaxis(x, -1, 1) if layout == "NHWC" else x


def from_channels_first(x: np.ndarray, layout: str) -> np.ndarray:
    return np.moveaxis(x, 1, -1) if layout == "NHWC" else x


def _centered(grouped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, grouped - mean)`` along the last axis by the corrected two-pass algorithm.

    The rounded first mean is off by up to an ulp of ``|mean|``, which is many ulps of the result
    once ``|mean|`` is far above the spread (1.8e-11 for float64 values near 1e3 with std 3e-3).
    The deviations from it are exact there (Sterbenz), so their own mean recovers that error.
    """
    rough = grouped.mean(axis=-1, keepdims=True)
    deviations = grouped - rough
    correction = deviations.mean(axis=-1, keepdims=True)
    return rough + correction, deviations - correction


def reference_moments(x, num_groups: int, layout: str = "NCHW") -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and population variance per (sample, group): mean first, then squared deviations."""
    grouped = to_channels_first(np.asarray(x, dtype=np.float64), layout)
    mean, deviations = _centered(grouped.reshape(grouped.shape[0], num_groups, -1))
    return mean[..., 0], (deviations**2).mean(axis=-1)


def reference_group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5,
                         layout: str = "NCHW") -> np.ndarray:  # fmt: skip
    """float64 ``(x - mean) / sqrt(var + eps) * weight + bias``, in the layout of ``x``."""
    channels_first = to_channels_first(np.asarray(x, dtype=np.float64), layout)
    n, c = channels_first.shape[:2]
    grouped = channels_first.reshape(n, num_groups, -1)
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN/Inf groups are expected NaN
        _, deviations = _centered(grouped)
        var = (deviations**2).mean(axis=-1, keepdims=True)
        y = (deviations / np.sqrt(var + eps)).reshape(channels_first.shape)
    per_channel = (c,) + (1,) * (channels_first.ndim - 2)
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64).reshape(per_channel)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64).reshape(per_channel)
    return from_channels_first(y, layout)


def tolerance(dtype) -> float:
    """Max |error| allowed against the reference, in units of the normalized output."""
    return 2e-5 if np.dtype(dtype) == np.float32 else 1e-12


def make_input(shape_channels_first, layout: str, dtype, rng, scale=1.0, offset=0.0) -> np.ndarray:
    """A C-contiguous random array in ``layout``, built from an (N, C, *spatial) shape."""
    x = rng.standard_normal(shape_channels_first) * scale + offset
    return np.ascontiguousarray(from_channels_first(x, layout)).astype(dtype)


def past_line(buffer: np.ndarray, skip: int) -> int:
    """The index in ``buffer`` ``skip`` values past its first 64-byte boundary."""
    return (-buffer.ctypes.data % 64) // buffer.itemsize + skip
