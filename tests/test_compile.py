"""Parallel kernels call their per-thread functions through addresses (``kernels._compile``): the
call passes the arguments and exceptions through, and the callee's code stays out of the caller."""

import numba
import numpy as np
import pytest

from nbgn import api
from nbgn.kernels import nhwc
from nbgn.kernels._compile import call_compiled, callee_type, compiled_address


@numba.njit
def _scale_into(x, out, count, factor):
    """``out[:count] = x[:count] * factor``; ValueError for a negative count."""
    if count < 0:
        raise ValueError("negative count")
    for i in range(count):
        out[i] = x[i] * factor


@numba.njit
def _call_scale_into(address, x, out, count, factor):
    call_compiled(address, (x, out, count, factor))


def test_call_compiled_passes_arguments_and_raises_the_callees_exceptions():
    x = np.arange(6, dtype=np.float32)
    x.flags.writeable = False  # a read-only array calls the writable one's code: the same struct
    out = np.zeros(6, np.float32)
    address = compiled_address(_scale_into, (x, out, 0, 0.0))
    assert callee_type(numba.typeof(x)) == numba.typeof(out)
    _call_scale_into(address, x, out, np.int32(4), 2.0)  # an int32 count is passed as int64
    np.testing.assert_array_equal(out, [0, 2, 4, 6, 0, 0])
    with pytest.raises(ValueError, match="negative count"):
        _call_scale_into(address, x, out, -1, 2.0)
    assert compiled_address(_scale_into, (out, out, 5, 1.0)) == address  # the same types


def test_parallel_kernels_leave_their_callees_code_out():
    """A parallel kernel compiled afresh holds a loop and a call, not its per-thread function: a
    linked copy of it would be optimized again in every kernel (seconds each). Its result is the
    serial function's."""
    x = np.random.default_rng(0).standard_normal(64 * 8 * 8 * 16).astype(np.float32)
    weight = np.linspace(0.5, 2.0, 16, dtype=np.float32)
    bias = np.linspace(-1.0, 1.0, 16, dtype=np.float32)
    dims = (64, 64, 16, 4)  # samples, positions, channels, groups
    expected = np.empty_like(x)
    nhwc.normalize_small_samples(x, expected, 0, *dims, weight, bias, 1e-5)
    fresh = numba.njit(parallel=True)(nhwc._group_norm_small)  # not from the cache: inspectable
    kernels = api._kernels(api.Geometry(64, 16, 64, 4, True), True, 4, True)
    assert kernels.serial is nhwc.normalize_small_samples
    address = api._callee_addresses(kernels, x.dtype, False, np.float32, "fused")[0]
    out = np.empty_like(x)
    fresh(address, x, out, *dims, weight, bias, 1e-5, np.float32(0), 2)
    np.testing.assert_array_equal(out, expected)
    assert "normalize_small_samples" not in fresh.inspect_llvm(fresh.signatures[0])
    # The check can fail: the same loop calling the function by name holds its code.
    linked = numba.njit(parallel=True)(_small_samples_by_name)
    linked(x, out, *dims, weight, bias, 1e-5, 2)
    np.testing.assert_array_equal(out, expected)
    assert "normalize_small_samples" in linked.inspect_llvm(linked.signatures[0])


def _small_samples_by_name(x, out, num_samples, spatial, channels, num_groups, weight, bias, eps,
                           num_chunks):  # fmt: skip
    for chunk in numba.prange(num_chunks):
        first, stop = nhwc.chunk_bounds(num_samples, num_chunks, chunk)
        nhwc.normalize_small_samples(x, out, first, stop, spatial, channels, num_groups, weight,
                                     bias, eps)  # fmt: skip
