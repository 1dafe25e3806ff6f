"""The vectorized NumPy baseline: the walkthrough's algorithm, with the square root it forgot.

Reshape to ``(N, num_groups, -1)``, take ``mean`` and ``var`` over the last axis, normalize with
``(x - mean) / sqrt(var + eps)``, then apply per-channel weight and bias. Arithmetic is in the
input's dtype, as NumPy does it; the moments are returned in float64. It makes several passes over
memory and temporaries the size of the input: it is the yardstick nbgn is measured against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import check_affine, check_eps, check_geometry, check_input, check_out

__all__ = ["group_moments", "group_norm"]


def _channels_first(x: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.moveaxis(x, -1, 1) if channels_last else x


def group_moments(
    x: Any, num_groups: int, *, layout: str = "NCHW"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample, per-group mean and population variance, float64 arrays of shape (N, num_groups).

    Same contract as :func:`nbgn.group_moments`.
    """
    x = check_input(x)
    geometry = check_geometry(x.shape, num_groups, layout)
    grouped = _channels_first(x, geometry.channels_last).reshape(
        geometry.num_samples, geometry.num_groups, -1
    )
    if grouped.shape[-1] == 0:
        empty = np.full(grouped.shape[:2], np.nan)
        return empty, empty.copy()
    return grouped.mean(axis=-1, dtype=np.float64), grouped.var(axis=-1, dtype=np.float64)


def group_norm(
    x: Any,
    num_groups: int,
    weight: Any = None,
    bias: Any = None,
    *,
    eps: float = 1e-5,
    layout: str = "NCHW",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Group normalization with NumPy vector operations. Same contract as :func:`nbgn.group_norm`."""
    x = check_input(x)
    geometry = check_geometry(x.shape, num_groups, layout)
    check_affine(weight, "weight", geometry.channels, 1.0, x.dtype)
    check_affine(bias, "bias", geometry.channels, 0.0, x.dtype)
    eps = check_eps(eps)
    if out is not None:
        check_out(out, x)
    if x.size == 0:
        return np.empty_like(x) if out is None else out

    channels_first = _channels_first(x, geometry.channels_last)
    grouped = channels_first.reshape(geometry.num_samples, geometry.num_groups, -1)
    mean = grouped.mean(axis=-1, keepdims=True)
    var = grouped.var(axis=-1, keepdims=True)
    normalized = ((grouped - mean) / np.sqrt(var + x.dtype.type(eps))).reshape(channels_first.shape)
    per_channel = (geometry.channels,) + (1,) * (x.ndim - 2)
    if weight is not None:
        normalized *= np.asarray(weight, dtype=x.dtype).reshape(per_channel)
    if bias is not None:
        normalized += np.asarray(bias, dtype=x.dtype).reshape(per_channel)
    result = np.moveaxis(normalized, 1, -1) if geometry.channels_last else normalized
    if out is None:
        return np.ascontiguousarray(result)
    out[...] = result
    return out
