"""Parallel kernels call their per-thread functions through addresses (``kernels._compile``): the
call passes the arguments and exceptions through, and the callee's code stays out of the caller."""

import numba
import numpy as np
import pytest

from nbgn import api
from nbgn.kernels import _compile, nchw, nhwc
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
    address = api._callee_addresses(kernels, x.dtype, False, np.float32(0), "fused")[0]
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


#: A geometry (N, C, spatial, G, channels last) for each parallel kernel and call kind: NCHW
#: slabs, slabs through weight patterns (float32; float64 takes the slabs), split units and
#: cooperative ones; NHWC samples, small samples, split and cooperative ones.
GEOMETRIES = [
    ((4, 32, 1024, 8, False), "fused"),
    ((2, 24, 36, 2, False), "fused"),
    ((1, 32, 4096, 8, False), "split"),
    ((1, 8, 65536, 1, False), "cooperative"),
    ((4, 64, 1024, 8, True), "fused"),
    ((64, 16, 64, 4, True), "fused"),
    ((1, 16, 4096, 4, True), "split"),
    ((1, 8, 65536, 1, True), "cooperative"),
]


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "out of place"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_pass_the_types_their_addresses_were_found_for(monkeypatch, dtype, in_place):
    """Each parallel kernel, compiled afresh, passes its callees exactly the types for which the
    API finds their addresses: a mismatch would call code compiled for other arrays. (The callees
    themselves are not compiled: the addresses found here are never called.)"""
    found = set()

    def record(function, examples):
        found.add(tuple(callee_type(numba.typeof(value)) for value in examples))
        return 1

    for module in (api, nchw, nhwc, _compile):
        monkeypatch.setattr(module, "compiled_address", record)
    monkeypatch.setattr(_compile, "LOWERED_CALLS", set())
    api._forget_kernels()
    kinds = set()
    try:
        for (n, c, s, g, last), kind in GEOMETRIES:
            geometry = api.Geometry(n, c, s, g, last)
            kernels = api._kernels(geometry, last, np.dtype(dtype).itemsize, True)
            body = getattr(kernels, kind).py_func
            kinds.add((body.__module__, body.__qualname__))
            x = np.zeros(n * c * s, dtype)
            affine = np.ones(c, dtype)
            for sum_type in (dtype(0), 0.0):
                addresses = api._callee_addresses(kernels, x.dtype, in_place, sum_type, kind)
                arguments = (*addresses, x, None if in_place else x, *kernels.dims, affine,
                             affine, 1e-5, sum_type, 2)  # fmt: skip
                fresh = numba.njit(parallel=True)(body)
                fresh.compile(tuple(numba.typeof(value) for value in arguments))
        for module in (nchw, nhwc):  # group_moments' kernel, in float64 sums
            address = module.part_moments_address(x, 0.0)
            fresh = numba.njit(parallel=True)(module._partial_moments)
            fresh.compile(tuple(numba.typeof(v) for v in (address, x, 1, 8, 4096, 1, 2, 0.0)))
    finally:
        api._forget_kernels()
    expected_kinds = 8 if dtype is np.float32 else 7  # float64 has no weight patterns
    assert len(kinds) == expected_kinds
    assert _compile.LOWERED_CALLS  # the intrinsic recorded the calls it compiled
    assert found == _compile.LOWERED_CALLS
