"""The public functions: validate, choose a memory order and a schedule, call a kernel."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from . import _output_pool, _schedule, _threading
from ._checks import Geometry, check_affine, check_eps, check_geometry, check_input, check_out
from .kernels import moments, nchw, nhwc
from .kernels._compile import compiled_address

__all__ = ["group_moments", "group_norm"]


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
    """Group normalization: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    The mean and the population variance are taken per sample and per group of
    ``C // num_groups`` consecutive channels, over those channels and every spatial position, in a
    single pass over ``x`` that stays exact for data far from zero.

    Parameters
    ----------
    x : array_like of float32 or float64, shape (N, C, *spatial) or (N, *spatial, C)
        The input; any number of spatial dimensions, zero included, and any strides.
    num_groups : int
        Number of groups; must divide C.
    weight, bias : array_like of float, shape (C,), optional
        Per-channel scale and shift applied after normalization (default 1 and 0).
    eps : float, default 1e-5
        Added to the variance; must be >= 0.
    layout : {"NCHW", "NHWC"}, default "NCHW"
        Where the channel axis is: second (channels first) or last (channels last). The memory
        order may be either: a channels-first view of channels-last memory runs at full speed.
    out : ndarray, optional
        Where to write the result: same shape and dtype as ``x``. ``out=x`` normalizes in place.

    Returns
    -------
    ndarray
        ``out`` if given, else a new array with the shape, dtype and memory order of ``x``; of
        32 MiB or more (and ``x`` contiguous in either order), its memory comes from a small pool
        of freed results (see ``_output_pool``) and it does not own it.

    Raises
    ------
    TypeError
        ``x`` is not float32/float64, ``weight``/``bias`` are not float, ``out`` is not an ndarray.
    ValueError
        Bad ``num_groups``, ``layout``, ``eps``, shapes, a read-only ``out``, or an ``out`` that
        overlaps ``x`` without being ``x``. Raised before anything is written.
    """
    if (
        type(x) is np.ndarray
        and type(num_groups) is int
        and type(eps) is float
        and type(layout) is str
    ):
        result = _known_call(x, num_groups, weight, bias, eps, layout, out)
        if result is not None:
            return result
    x = check_input(x)
    geometry = check_geometry(x.shape, num_groups, layout)
    affine = weight is not None or bias is not None
    weight = check_affine(weight, "weight", geometry.channels, 1.0, x.dtype)
    bias = check_affine(bias, "bias", geometry.channels, 0.0, x.dtype)
    eps = check_eps(eps)
    in_place = out is not None and check_out(out, x)
    if out is not None and type(out) is not np.ndarray:
        # An ndarray subclass (np.matrix, np.memmap): written through a plain view of its memory
        # (its own methods, such as a matrix's ravel, would not give the kernels a flat buffer).
        group_norm(x, num_groups, weight, bias, eps=eps, layout=layout, out=out.view(np.ndarray))
        return out
    if x.size == 0:
        return np.empty_like(x) if out is None else out

    channels_last = _kernel_order(x, geometry)
    if channels_last is None:
        # No memory order fits the kernels: work on a contiguous copy, then write the result out.
        source = np.ascontiguousarray(x)
        result = _run(source, None, geometry, geometry.channels_last, weight, bias, eps, affine)
        if out is None:
            return result
        out[...] = result
        return out

    if in_place:
        return _run(out, None, geometry, channels_last, weight, bias, eps, affine)
    if out is None:
        if channels_last == geometry.channels_last and x.nbytes < _output_pool.MIN_BYTES:
            result = np.empty(x.shape, x.dtype)  # the usual case, inline: a tiny call's overhead
        else:
            result = _empty_in_order(x, geometry, channels_last)
        return _run(x, result, geometry, channels_last, weight, bias, eps, affine)
    if _kernel_order(out, geometry) is channels_last:
        return _run(x, out, geometry, channels_last, weight, bias, eps, affine)
    out[...] = _run(x, _empty_in_order(x, geometry, channels_last), geometry, channels_last,
                    weight, bias, eps, affine)  # fmt: skip
    return out


class _KnownCall(NamedTuple):
    """How the general path ran a call (see ``_known_call``): ``kernel(*head, x, out, *dims,
    weight, bias, eps, *tail)``, under ``_threading.kernel_guard()`` if ``parallel``, with ``x``
    and ``out`` flat; ``weight`` and ``bias`` are the defaults, for keys of calls without them."""

    kernel: Any
    head: tuple[int, ...]
    dims: tuple[int, ...]
    tail: tuple[Any, ...]
    channels: tuple[int]
    weight: np.ndarray
    bias: np.ndarray

    @property
    def parallel(self) -> bool:
        """A parallel kernel is given its callees' addresses (``head``); a serial one none."""
        return bool(self.head)


#: Calls the general path ran, by (shape, dtype, num_groups, layout, weight is None, in place,
#: threads): see ``_call_key``.
_KNOWN_CALLS: dict[tuple[Any, ...], _KnownCall] = {}


def _known_call(x, num_groups, weight, bias, eps, layout, out):
    """A call in the usual form, made as the general path made it before; None if it is not one.

    Validation, the memory order, the schedule and the callees' addresses cost a few
    microseconds a call, as much as a small kernel, so the usual form replays what the general
    path chose (``_remember_call``) for the same key (``_call_key``): a shape, dtype, num_groups,
    layout, weight or none, in place or not, and thread count that a valid call had before;
    ``x`` C-contiguous (and writeable, in place); ``weight`` and ``bias`` both None or both
    C-contiguous arrays of x's dtype and shape (C,); ``eps`` a float in the range summed in x's
    precision; ``out`` None or ``x``. Anything else, errors included, takes the general path.
    Measured with weight and bias, general path -> known call: (2, 8, 4, 4)/4 allocating, 3.94
    -> 2.54 us a call; one group of (1, 8, 256, 256) in place, 55.8 -> 52.9 us on one thread,
    45.5 -> 37.7 us on two (more than the general path's Python takes on hot caches: a parallel
    kernel has just evicted them).
    """
    call = _KNOWN_CALLS.get(_call_key(x, num_groups, layout, weight is None, out is x))
    if call is None or not moments.NATIVE_MIN_EPS <= eps < math.inf or not x.flags.c_contiguous:
        return None
    kernel, head, dims, tail, channels, default_weight, default_bias = call
    if weight is None:
        if bias is not None:
            return None
        weight, bias = default_weight, default_bias
    elif not (
        type(weight) is np.ndarray
        and type(bias) is np.ndarray
        and weight.dtype is x.dtype
        and bias.dtype is x.dtype
        and weight.shape == channels
        and bias.shape == channels
        and weight.flags.c_contiguous
        and bias.flags.c_contiguous
    ):
        return None
    if out is None:
        out = (np.empty(x.shape, x.dtype) if x.nbytes < _output_pool.MIN_BYTES
               else _output_pool.empty(x.shape, x.dtype))  # fmt: skip
        target = out.ravel()
    elif out is x and x.flags.writeable:
        target = None
    else:
        return None
    if head:  # a parallel kernel
        with _threading.kernel_guard():
            kernel(*head, x.ravel(), target, *dims, weight, bias, eps, *tail)
    else:
        kernel(x.ravel(), target, *dims, weight, bias, eps, *tail)
    return out


def _call_key(x, num_groups, layout, unweighted, in_place):
    """The key of ``_KNOWN_CALLS``: what decides the kernel and its arguments, given the usual form.

    A call below ``_schedule.SERIAL_ELEMENTS`` runs serially whatever the threads (0); a larger
    one's plan depends on their number, which is 1 in a child that must run serially and None
    before Numba's threads run: no such call has been planned then (planning starts them), and
    a key built for a call that will be refused must not start them."""
    if x.size < _schedule.SERIAL_ELEMENTS:
        threads = 0
    elif _threading.serial_only():
        threads = 1
    else:
        threads = _threading.running_num_threads()
    return (x.shape, x.dtype, num_groups, layout, unweighted, in_place, threads)


def _remember_call(x, geometry, affine, in_place, call):
    """Remember how the general path just normalized ``x`` (valid, C-contiguous in its layout,
    moments summed in its precision) for ``_known_call``: ``call`` is (kernel, head, dims, tail)."""
    layout = "NHWC" if geometry.channels_last else "NCHW"
    key = _call_key(x, geometry.num_groups, layout, not affine, in_place)
    if key not in _KNOWN_CALLS:
        if len(_KNOWN_CALLS) >= 1024:
            _KNOWN_CALLS.clear()
        channels = geometry.channels
        _KNOWN_CALLS[key] = _KnownCall(
            *call, (channels,),
            check_affine(None, "weight", channels, 1.0, x.dtype),
            check_affine(None, "bias", channels, 0.0, x.dtype),
        )  # fmt: skip


def group_moments(
    x: Any, num_groups: int, *, layout: str = "NCHW"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample, per-group mean and population variance (ddof=0), in one pass over ``x``.

    Parameters
    ----------
    x : array_like of float32 or float64, shape (N, C, *spatial) or (N, *spatial, C)
    num_groups : int
        Number of groups; must divide C.
    layout : {"NCHW", "NHWC"}, default "NCHW"

    Returns
    -------
    mean, var : float64 ndarrays, shape (N, num_groups)
        NaN for groups with no elements (an empty spatial dimension).
    """
    x = check_input(x)
    geometry = check_geometry(x.shape, num_groups, layout)
    shape = (geometry.num_samples, geometry.num_groups)
    if x.size == 0:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    channels_last = _kernel_order(x, geometry)
    if channels_last is None:
        x = np.ascontiguousarray(x)
        channels_last = geometry.channels_last
    flat = _flat(x, geometry, channels_last)
    # One value per channel: (N, C) memory, the same in both layouts; the NCHW kernels' slabs are
    # then the groups' contiguous channels.
    channels_last = channels_last and geometry.spatial > 1
    parallel, parts = _plan(geometry, channels_last)[:2]
    # The moments a caller asks for are summed in float64 throughout: exact to float64 rounding.
    if parallel:
        with _threading.kernel_guard():
            partial, refs = _partial_moments(flat, geometry, channels_last, parts, 0.0)
    else:
        partial, refs = _partial_moments(flat, geometry, channels_last, parts, 0.0, serial=True)
    mean, var = moments.finish_moments(partial, refs, parts)
    return mean.reshape(shape), var.reshape(shape)


#: A zero of each input dtype: the kernels' ``sum_type`` for sums in the input's precision.
_NATIVE_SUM_TYPES = {np.dtype(np.float32): np.float32(0), np.dtype(np.float64): np.float64(0)}


def _kernel_order(array: np.ndarray, geometry: Geometry) -> bool | None:
    """True/False if ``array``'s memory is C-contiguous channels last/first; None if neither.

    The layout's own order is tried first; the other one catches e.g. an NCHW-shaped view of
    channels-last memory (PyTorch's ``channels_last``), which the NHWC kernel handles in place.
    """
    if array.flags.c_contiguous:
        return geometry.channels_last
    other = np.moveaxis(array, 1, -1) if not geometry.channels_last else np.moveaxis(array, -1, 1)
    if other.flags.c_contiguous:
        return not geometry.channels_last
    return None


def _flat(array: np.ndarray, geometry: Geometry, channels_last: bool) -> np.ndarray:
    """The 1-D view of ``array``'s buffer in kernel order (``array`` is contiguous in that order)."""
    if channels_last != geometry.channels_last:
        axes = (1, -1) if channels_last else (-1, 1)
        array = np.moveaxis(array, *axes)
    return array.ravel()  # a view: ``array`` is contiguous in this order


def _empty_in_order(x: np.ndarray, geometry: Geometry, channels_last: bool) -> np.ndarray:
    """A new array shaped like ``x`` whose memory is contiguous in the kernels' order."""
    if channels_last == geometry.channels_last:
        return _output_pool.empty(x.shape, x.dtype)
    axes = (1, -1) if channels_last else (-1, 1)
    return np.moveaxis(_output_pool.empty(np.moveaxis(x, *axes).shape, x.dtype), *axes[::-1])


def _plan(
    geometry: Geometry, channels_last: bool, itemsize: int = 0, in_place: bool = False
) -> _schedule.Plan:
    """``itemsize``: of a group norm's values (whose units may then be normalized cooperatively),
    0 for the moments alone; ``in_place``: a group norm in place."""
    n, c, s, g = geometry.num_samples, geometry.channels, geometry.spatial, geometry.num_groups
    units, unit_elements = (n, s * c) if channels_last else (n * g, (c // g) * s)
    return _schedule.plan(units, unit_elements, unit_elements * itemsize, in_place)


def _partial_moments(flat, geometry, channels_last, parts, sum_type, serial=False):
    n, c, s, g = geometry.num_samples, geometry.channels, geometry.spatial, geometry.num_groups
    layout = nhwc if channels_last else nchw
    kernel = layout.partial_moments_serial if serial else layout.partial_moments
    dims = (n, s, c, g) if channels_last else (n, c, s, g)
    return kernel(_part_moments_address(layout, flat.dtype, type(sum_type)), flat, *dims, parts,
                  sum_type)  # fmt: skip


@functools.lru_cache(maxsize=16)
def _part_moments_address(layout: Any, dtype: np.dtype, sum_kind: type) -> int:
    """``layout.part_moments_address`` (``layout``: a kernels module) for arrays of ``dtype`` and
    moments summed in ``sum_kind``; cached, as ``_addresses``."""
    return layout.part_moments_address(np.empty(0, dtype), sum_kind(0))


class _Kernels(NamedTuple):
    """A problem's kernels in one memory order, and their shape arguments: ``dims``, ``(N, C,
    spatial, G)`` channels first, ``(N, spatial, C, G)`` channels last, for the parallel kernels.

    ``serial`` is the function each of ``fused``'s threads runs on its run of units, called
    directly with ``serial_dims`` (all the units) and, if ``serial_sums``, ``sum_type``: a serial
    twin of ``fused`` would be one more kernel to compile, load and dispatch.
    ``layout`` is the kernels' module, whose ``split_addresses`` and ``cooperative_address`` find
    what ``split`` and ``cooperative`` call."""

    dims: tuple[int, int, int, int]
    serial: Any
    serial_dims: tuple[int, ...]
    serial_sums: bool
    fused: Any
    split: Any
    cooperative: Any
    layout: Any


def _forget_kernels() -> None:
    """Forget the kernels chosen for earlier calls (``_kernels``, ``_KNOWN_CALLS``) and their
    callees' addresses: for a test that replaces a kernel, before and after."""
    _kernels.cache_clear()
    _addresses.cache_clear()
    _part_moments_address.cache_clear()
    _KNOWN_CALLS.clear()


@functools.lru_cache(maxsize=256)
def _kernels(geometry: Geometry, channels_last: bool, itemsize: int, affine: bool) -> _Kernels:
    """Which kernels normalize ``geometry`` in this memory order (``channels_last`` with more than
    one position: see group_moments); cached, since a small call's time is mostly such choices.
    The cache holds the kernel objects: a test that replaces one calls ``_forget_kernels()``.

    ``affine``: the caller gave a weight or a bias (without, NCHW needs no channel patterns).
    """
    n, c, s, g, _ = geometry
    if channels_last:
        others = (nhwc.group_norm_split, nhwc.group_norm_cooperative, nhwc)
        if s * c <= nhwc.SMALL_SAMPLE:  # never split: a part would be below MIN_PART_ELEMENTS
            return _Kernels((n, s, c, g), nhwc.normalize_small_samples, (0, n, s, c, g), False,
                            nhwc.group_norm_small, *others)  # fmt: skip
        return _Kernels((n, s, c, g), nhwc.normalize_samples, (0, n, s, c, g), True,
                        nhwc.group_norm_fused, *others)  # fmt: skip
    others = (nchw.group_norm_split, nchw.group_norm_cooperative, nchw)
    if affine and _schedule.channel_patterns(n, c // g, s, itemsize):
        return _Kernels((n, c, s, g), nchw.normalize_slabs_patterned, (0, n * g, n, c, s, g),
                        True, nchw.group_norm_patterned, *others)  # fmt: skip
    return _Kernels((n, c, s, g), nchw.normalize_slabs, (0, n * g, c, s, g), True,
                    nchw.group_norm_fused, *others)  # fmt: skip


def _callee_addresses(kernels: _Kernels, dtype: np.dtype, in_place: bool, sum_type: Any,
                      kernel: str) -> tuple[int, ...]:  # fmt: skip
    """The addresses of the functions that ``kernels``' parallel ``kernel`` ("fused", "split" or
    "cooperative") calls (see ``_compile``), for arrays of ``dtype``, in place or not, and moments
    summed in the type of ``sum_type``."""
    return _addresses(kernels.serial, len(kernels.serial_dims), kernels.serial_sums,
                      kernels.layout, dtype, in_place, type(sum_type), kernel)  # fmt: skip


@functools.lru_cache(maxsize=64)
def _addresses(serial: Any, serial_ints: int, serial_sums: bool, layout: Any, dtype: np.dtype,
               in_place: bool, sum_kind: type, kernel: str) -> tuple[int, ...]:  # fmt: skip
    """``_callee_addresses``, from what decides the callees' types: not the shape, so that one
    entry serves every shape (``sum_kind`` is a type, since a float32 zero equals a float64
    one). Cached: finding them types a dozen example values."""
    x = np.empty(0, dtype)
    out = None if in_place else x
    sum_type = sum_kind(0)
    if kernel == "cooperative":
        return (layout.cooperative_address(x, out, sum_type),)
    if kernel == "split":
        return layout.split_addresses(x, out, sum_type)
    sums = (sum_type,) if serial_sums else ()
    return (compiled_address(serial, (x, out, *(0,) * serial_ints, x, x, 0.0, *sums)),)


def _run(x, out, geometry, channels_last, weight, bias, eps, affine):
    """Normalize ``x`` into ``out`` (``None``: in place); both contiguous in the kernels' order."""
    layout_order = channels_last == geometry.channels_last
    if layout_order:  # the usual case, without two calls of _flat
        source = x.ravel()
        target = None if out is None else out.ravel()
    else:
        source = _flat(x, geometry, channels_last)
        target = None if out is None else _flat(out, geometry, channels_last)
    # One value per channel takes the channels-first kernels: see group_moments.
    channels_last = channels_last and geometry.spatial > 1
    kernels = _kernels(geometry, channels_last, source.itemsize, affine)
    # Moments summed in the input's precision, unless eps is too small for that (see moments).
    native = eps >= moments.NATIVE_MIN_EPS
    sum_type = _NATIVE_SUM_TYPES[source.dtype] if native else 0.0
    kernel, head, dims, tail = call = _choose(kernels, geometry, channels_last, source,
                                              out is None, sum_type)  # fmt: skip
    if head:  # a parallel kernel
        with _threading.kernel_guard():
            kernel(*head, source, target, *dims, weight, bias, eps, *tail)
    else:
        kernel(source, target, *dims, weight, bias, eps, *tail)
    if native and layout_order and x.flags.c_contiguous:
        _remember_call(x, geometry, affine, out is None, call)
    return x if out is None else out


def _choose(kernels, geometry, channels_last, source, in_place, sum_type):
    """The call that normalizes ``source`` (flat, in the kernels' order): (kernel, head, dims,
    tail), as ``_KnownCall`` has them (``head``: the callees' addresses, empty for a serial one).

    Serial below ``_schedule.SERIAL_ELEMENTS``, whatever the threads, without asking for a plan;
    else one unit per thread (fused), units split into parts when they are fewer, or units one
    after the other by several threads (cooperative): see ``_schedule``. A parallel kernel is
    given the addresses of the functions its threads call."""
    small = source.size < _schedule.SERIAL_ELEMENTS
    plan = None if small else _plan(geometry, channels_last, source.itemsize, in_place)
    if small or not plan.parallel:
        sums = (sum_type,) if kernels.serial_sums else ()
        return kernels.serial, (), kernels.serial_dims, sums
    if plan.cooperative:
        kind, kernel, count = "cooperative", kernels.cooperative, plan.parts
    elif plan.parts == 1:
        kind, kernel, count = "fused", kernels.fused, plan.chunks
    else:
        kind, kernel, count = "split", kernels.split, plan.parts
    addresses = _callee_addresses(kernels, source.dtype, in_place, sum_type, kind)
    return kernel, addresses, kernels.dims, (sum_type, count)
