"""Argument validation for the public API: one place, run before anything is written.

Every error names the parameter, what was given, what is allowed and the fix. The checks are
ordered cheapest first and allocate nothing proportional to the input.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import numpy as np

LAYOUTS = ("NCHW", "NHWC")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Geometry(NamedTuple):
    """The shape of a group-norm problem, independent of layout."""

    num_samples: int
    channels: int
    spatial: int
    num_groups: int
    channels_last: bool


def check_input(x: Any) -> np.ndarray:
    """``x`` as a plain ndarray of float32 or float64: array-likes are converted, never copied
    needlessly, and ndarray subclasses (``np.matrix``, ``np.memmap``) are seen as plain arrays."""
    if type(x) is not np.ndarray:
        reject_masked(x, "x")
        x = np.asarray(x)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"x has {_describe_dtype(x.dtype)}; nbgn normalizes native float32 or float64 arrays: "
            f"{'take the real part first (x.real) and then ' if x.dtype.kind == 'c' else ''}"
            "convert with x.astype(np.float32) (or np.float64)."
        )
    if x.ndim < 2:
        raise ValueError(
            f"x has {x.ndim} dimension(s) (shape {x.shape}); group norm needs at least 2, "
            "(N, C, *spatial) or (N, *spatial, C): add a batch axis with x[None]."
        )
    return x


def _describe_dtype(dtype: np.dtype) -> str:
    if dtype.kind == "f":
        if not dtype.isnative:
            return f"dtype {dtype}, a float in non-native byte order"
        return f"dtype {dtype}, a float width nbgn has no kernels for"
    kind = {"i": "integer", "u": "unsigned integer", "b": "boolean", "c": "complex"}
    return kind.get(dtype.kind, "non-float") + f" dtype {dtype}"


def reject_masked(array: Any, name: str) -> None:
    """Refuse a masked array: its mask would be silently ignored."""
    if isinstance(array, np.ma.MaskedArray):
        fix = (
            "pass a plain array, e.g. np.asarray(out) to write into its data"
            if name == "out"
            else "pass x.filled(value) to normalize filled data, or np.asarray(x) for the raw data"
        )
        raise TypeError(f"{name} is a masked array, whose mask nbgn would ignore: {fix}.")


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending (``O(sqrt(n))``)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def check_geometry(shape: tuple[int, ...], num_groups: Any, layout: Any) -> Geometry:
    """Validate ``layout`` and ``num_groups`` against ``shape``.

    Valid geometries are remembered per (shape, num_groups, layout), for a plain ``int``
    num_groups and a str layout: a loop over same-shaped inputs then pays a dictionary lookup, a
    fraction of what a small group norm costs.
    """
    if type(num_groups) is int and type(layout) is str:
        key = (shape, num_groups, layout)
        geometry = _GEOMETRIES.get(key)
        if geometry is None:
            if len(_GEOMETRIES) >= 1024:
                _GEOMETRIES.clear()
            geometry = _GEOMETRIES[key] = _check_geometry(shape, num_groups, layout)
        return geometry
    return _check_geometry(shape, num_groups, layout)


_GEOMETRIES: dict[tuple[tuple[int, ...], int, str], Geometry] = {}


def check_count(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` (``num_groups``, ``num_channels``) as a Python int of at least ``minimum``."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if type(value) is int:
        count = value
    elif isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be {what}, got {value!r}.")
    else:
        try:
            count = operator.index(value)
        except TypeError:
            raise TypeError(
                f"{name} must be {what}, got {type(value).__name__} {value!r}."
            ) from None
    if count < minimum:
        raise ValueError(f"{name} must be {what}, got {count}.")
    return count


def _check_geometry(shape: tuple[int, ...], num_groups: Any, layout: Any) -> Geometry:
    if layout == "NCHW":
        channels_last = False
        channels = shape[1]
        spatial = math.prod(shape[2:])
    elif layout == "NHWC":
        channels_last = True
        channels = shape[-1]
        spatial = math.prod(shape[1:-1])
    else:
        raise ValueError(
            f"layout must be 'NCHW' (channels first) or 'NHWC' (channels last), got {layout!r}."
        )
    groups = check_count(num_groups, "num_groups")
    if channels % groups:
        raise ValueError(
            f"num_groups={groups} does not divide the {channels} channels of x (layout "
            f"{layout}, shape {shape}); choose one of {divisors(channels)}."
        )
    # tuple.__new__ skips NamedTuple's Python-level constructor: a third of this check's time.
    return tuple.__new__(Geometry, (shape[0], channels, spatial, groups, channels_last))


def check_affine(
    values: Any, name: str, channels: int, default: float, dtype: np.dtype
) -> np.ndarray:
    """``weight`` or ``bias`` as a contiguous array of length C in ``dtype``, x's (filled with
    ``default`` when None).

    In x's dtype, the kernels compile once per input dtype, and the common case (float32 weights
    for float32 data) needs no conversion: the array itself is used. Float64 weights for float32
    data are rounded to float32, a relative change of at most 6e-8. The default arrays are cached
    per (C, default, dtype) and only ever read by the kernels.
    """
    if (
        type(values) is np.ndarray
        and values.dtype is dtype
        and values.shape == (channels,)
        and values.flags.c_contiguous
    ):
        return values  # the common case, first: a small call's checks are much of its time
    if values is None:
        key = (channels, default, dtype)
        filled = _DEFAULTS.get(key)
        if filled is None:
            filled = _DEFAULTS.setdefault(key, np.full(channels, default, dtype))
        return filled
    array = values if isinstance(values, np.ndarray) else np.asarray(values)
    if array.dtype.kind != "f":
        raise TypeError(
            f"{name} has dtype {array.dtype}; it must be a float array: "
            f"pass np.asarray({name}, dtype=np.float32)."
        )
    if array.shape != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},), one value per channel of x, "
            f"got shape {array.shape}."
        )
    if array.dtype == dtype and array.flags.c_contiguous:
        return array
    return np.ascontiguousarray(array, dtype=dtype)


_DEFAULTS: dict[tuple[int, float, np.dtype], np.ndarray] = {}


def check_eps(eps: Any) -> float:
    """``eps`` as a finite, non-negative Python float."""
    if type(eps) is float:
        value = eps
    else:
        try:
            value = float(eps)
        except (TypeError, ValueError):
            raise TypeError(
                f"eps must be a real number, got {type(eps).__name__} {eps!r}."
            ) from None
    if not 0.0 <= value < math.inf:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}; the usual value is 1e-5.")
    return value


def check_out(out: Any, x: np.ndarray) -> bool:
    """Validate ``out`` for ``x``; return True when ``out`` is ``x`` itself (in place)."""
    if out is x:
        if not x.flags.writeable:
            raise ValueError(
                "out is read-only: out=x asks for in place on a read-only x; pass out=None for a new array."
            )
        return True
    reject_masked(out, "out")
    if not isinstance(out, np.ndarray):
        raise TypeError(
            f"out must be a numpy.ndarray, got {type(out).__name__}; "
            "pass out=None to get a new array."
        )
    if out.shape != x.shape:
        raise ValueError(f"out has shape {out.shape}, but x has shape {x.shape}: they must match.")
    if out.dtype != x.dtype:
        raise ValueError(
            f"out has dtype {out.dtype}, but x has dtype {x.dtype}: the output dtype is the "
            f"input's, so pass out=np.empty_like(x)."
        )
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array, or out=None for a new one.")
    if not np.may_share_memory(out, x):
        return False
    if _same_memory(out, x):
        return True
    if np.shares_memory(out, x):
        raise ValueError(
            "out overlaps x without being the same array; normalizing would read values it has "
            "already overwritten. Pass out=x for in place, or a separate array."
        )
    return False


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
    )
