"""The fast path of calls in the usual form (``api._known_call``): the same call as the general
path made, small or parallel, and every call it is not sure of left to the general path, with its
errors and conversions."""

import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from reference import make_input, reference_group_norm, tolerance

import nbgn
from nbgn import _schedule, api

SHAPE = (2, 8, 4, 5)  # (N, C, *spatial) channels first
GROUPS = 4


@pytest.fixture
def general_path_calls(monkeypatch):
    """A list that grows by one for every call that took the general path."""
    calls = []
    check_input = api.check_input
    monkeypatch.setattr(api, "check_input", lambda x: calls.append(1) or check_input(x))
    return calls


def _inputs(rng, layout, dtype, affine, shape=SHAPE):
    x = make_input(shape, layout, dtype, rng, offset=50.0)
    if not affine:
        return x, None, None
    weight = rng.standard_normal(shape[1]).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)
    return x, weight, bias


# (N, C, *spatial) channels first, num_groups: the kernels small calls reach. NCHW: fused (short
# slabs), patterned (float32 with weights: 12 channels of 36 values, which no channel window fits);
# NHWC: small samples, fused (samples of more than nhwc.SMALL_SAMPLE values), and one value per
# channel.
KERNEL_CASES = [(SHAPE, GROUPS), ((2, 24, 6, 6), 2), ((2, 8, 16, 16), 4), ((6, 8), 4)]


def test_kernel_cases_reach_their_serial_kernels():
    from nbgn._checks import check_geometry
    from nbgn.kernels import nchw, nhwc

    def serial(shape, groups, layout, affine):
        geometry = check_geometry(shape, groups, layout)
        channels_last = geometry.channels_last and geometry.spatial > 1
        return api._kernels(geometry, channels_last, 4, affine).serial

    (shape, groups), (patterned, pattern_groups), (lanes, lane_groups) = KERNEL_CASES[:3]
    assert serial(patterned, pattern_groups, "NCHW", True) is nchw.normalize_slabs_patterned
    assert serial(patterned, pattern_groups, "NCHW", False) is nchw.normalize_slabs
    nhwc_lanes = (lanes[0], *lanes[2:], lanes[1])
    assert serial(nhwc_lanes, lane_groups, "NHWC", True) is nhwc.normalize_samples
    nhwc_small = (shape[0], *shape[2:], shape[1])
    assert serial(nhwc_small, groups, "NHWC", True) is nhwc.normalize_small_samples


@pytest.mark.parametrize("in_place", [False, True], ids=["allocate", "in_place"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(("shape", "groups"), KERNEL_CASES)
def test_second_call_takes_the_fast_path_with_identical_results(
    rng, general_path_calls, shape, groups, layout, dtype, affine, in_place
):
    x, weight, bias = _inputs(rng, layout, dtype, affine, shape)
    results = _normalize_copies(x, groups, weight, bias, layout, in_place)
    assert len(general_path_calls) == 1  # the first call only
    np.testing.assert_array_equal(results[1], results[0])
    expected = reference_group_norm(x, groups, weight, bias, 1e-5, layout)
    np.testing.assert_allclose(results[1], expected, atol=tolerance(dtype))


def _normalize_copies(x, groups, weight, bias, layout, in_place):
    """The results of two group norms of copies of ``x``, in place or allocating: the first one
    takes the general path, the second may replay it."""
    results = []
    for _ in range(2):
        source = x.copy()
        result = nbgn.group_norm(source, groups, weight, bias, layout=layout,
                                 out=source if in_place else None)  # fmt: skip
        assert (result is source) == in_place
        results.append(result)
    return results


@pytest.mark.parametrize(
    "case",
    [
        "weight float64",
        "weight strided",
        "weight only",
        "bias only",
        "weight list",
        "eps numpy float",
        "eps zero",
        "num_groups numpy int",
        "out separate",
        "x strided",
        "x channels last memory",
        "x byte-swapped",
        "x subclass",
        "out a view of x",
        "layout a numpy string",
    ],
)
def test_calls_it_is_not_sure_of_take_the_general_path(rng, general_path_calls, case):
    """After a registered call, each variant is normalized as the general path would (converted
    weights, float64 sums for eps=0, ...), not by the remembered kernel with its arguments."""
    x, weight, bias = _inputs(rng, "NCHW", np.float32, True)
    nbgn.group_norm(x, GROUPS, weight, bias)
    nbgn.group_norm(x, GROUPS)
    kwargs = {}
    groups = GROUPS
    if case == "weight float64":
        weight = weight.astype(np.float64)
    elif case == "weight strided":
        weight = np.repeat(weight, 2)[::2]
    elif case == "weight only":
        bias = None
    elif case == "bias only":
        weight = None
    elif case == "weight list":
        weight = weight.tolist()
    elif case == "eps numpy float":
        kwargs["eps"] = np.float64(1e-3)
    elif case == "eps zero":
        kwargs["eps"] = 0.0
    elif case == "num_groups numpy int":
        groups = np.int64(GROUPS)
    elif case == "out separate":
        kwargs["out"] = np.empty_like(x)
    elif case == "x strided":
        x = np.repeat(x, 2, axis=-1)[..., ::2]
    elif case == "x channels last memory":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    elif case == "x byte-swapped":
        x = x.astype(x.dtype.newbyteorder())
    elif case == "x subclass":
        x = x.view(np.memmap)
    elif case == "out a view of x":
        x = x.copy()
        kwargs["out"] = x[...]
    elif case == "layout a numpy string":
        kwargs["layout"] = np.str_("NCHW")
    before = len(general_path_calls)
    if case == "x byte-swapped":
        with pytest.raises(TypeError, match="non-native byte order"):
            nbgn.group_norm(x, groups, weight, bias, **kwargs)
        return
    expected = reference_group_norm(x, GROUPS, weight, bias, kwargs.get("eps", 1e-5), "NCHW")
    result = nbgn.group_norm(x, groups, weight, bias, **kwargs)
    assert len(general_path_calls) == before + 1
    if "out" in kwargs:
        assert result is kwargs["out"]
    if case == "x channels last memory":
        assert result.transpose(0, 2, 3, 1).flags.c_contiguous  # the memory order of x
    np.testing.assert_allclose(result, expected, atol=tolerance(np.float32))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"weight": np.ones(7, np.float32)}, ValueError, "weight must have shape"),
        ({"bias": np.ones((8, 1), np.float32)}, ValueError, "bias must have shape"),
        ({"weight": np.ones(8, np.int32)}, TypeError, "weight has dtype int32"),
        ({"eps": float("nan")}, ValueError, "eps must be finite"),
        ({"eps": -1.0}, ValueError, "eps must be finite"),
        ({"eps": float("inf")}, ValueError, "eps must be finite"),
        ({"num_groups": 4.0}, TypeError, "num_groups must be a positive integer"),
        ({"num_groups": True}, TypeError, "num_groups must be a positive integer"),
        ({"num_groups": 3}, ValueError, "does not divide"),
        ({"layout": "nchw"}, ValueError, "layout must be"),
        ({"layout": ["NCHW"]}, ValueError, "layout must be"),
    ],
)
def test_errors_after_a_registered_call(rng, change, error, match):
    """Refused in place after an in-place call of the same kind: before anything is written."""
    x, weight, bias = _inputs(rng, "NCHW", np.float32, True)
    _register_in_place(x, weight, bias)
    arguments = {"num_groups": GROUPS, "weight": weight, "bias": bias, "eps": 1e-5, **change}
    before = x.copy()
    with pytest.raises(error, match=match):
        nbgn.group_norm(x, arguments.pop("num_groups"), out=x, **arguments)
    np.testing.assert_array_equal(x, before)


def _register_in_place(x, weight, bias):
    """Normalize a copy of ``x`` in place: later in-place calls of its kind find a known call."""
    copy = x.copy()
    nbgn.group_norm(copy, GROUPS, weight, bias, out=copy)
    assert api._call_key(x, GROUPS, "NCHW", weight is None, True) in api._KNOWN_CALLS


def test_read_only_in_place_is_refused_after_a_registered_call(rng):
    x, weight, bias = _inputs(rng, "NCHW", np.float32, True)
    _register_in_place(x, weight, bias)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        nbgn.group_norm(x, GROUPS, weight, bias, out=x)
    np.testing.assert_allclose(nbgn.group_norm(x, GROUPS, weight, bias),  # out of place is fine
                               reference_group_norm(x, GROUPS, weight, bias), atol=1e-5)  # fmt: skip


def test_mutated_arrays_are_checked_again(rng):
    """The memo is of shapes and dtypes, not of arrays: an array reshaped or retyped in place
    after a fast call is checked again."""
    x, weight, bias = _inputs(rng, "NCHW", np.float32, True)
    nbgn.group_norm(x, GROUPS, weight, bias)
    nbgn.group_norm(x, GROUPS, weight, bias)
    weight.shape = (2, 4)
    with pytest.raises(ValueError, match="weight must have shape"):
        nbgn.group_norm(x, GROUPS, weight, bias)
    weight.shape = (8,)
    bias.dtype = np.int32
    with pytest.raises(TypeError, match="bias has dtype int32"):
        nbgn.group_norm(x, GROUPS, weight, bias)


def test_a_lowered_serial_threshold_reaches_the_parallel_kernels(rng, monkeypatch):
    """Tests force the parallel paths on small inputs by lowering SERIAL_ELEMENTS: a remembered
    small call must not keep them on the serial kernel."""
    x, weight, bias = _inputs(rng, "NCHW", np.float32, True)
    nbgn.group_norm(x, GROUPS, weight, bias)
    plans = []
    plan = _schedule.plan
    monkeypatch.setattr(_schedule, "SERIAL_ELEMENTS", 0)
    monkeypatch.setattr(_schedule, "plan", lambda *args: plans.append(args) or plan(*args))
    result = nbgn.group_norm(x, GROUPS, weight, bias)
    assert plans  # the general path asked for a plan
    np.testing.assert_allclose(result, reference_group_norm(x, GROUPS, weight, bias), atol=1e-5)


def test_the_memo_is_bounded(rng):
    for spatial in range(1, 1100):
        nbgn.group_norm(np.ones((1, 4, spatial), np.float32), 2)
    assert 0 < len(api._KNOWN_CALLS) <= 1024


def test_layouts_that_are_not_str_take_the_general_path(rng):
    """A 0-d array equal to 'NCHW' was accepted before the fast path existed (the check compares);
    it must still be, not fail on hashing a key."""
    x, weight, bias = _inputs(rng, "NCHW", np.float32, True)
    nbgn.group_norm(x, GROUPS, weight, bias)
    np.testing.assert_allclose(nbgn.group_norm(x, GROUPS, weight, bias, layout=np.array("NCHW")),
                               reference_group_norm(x, GROUPS, weight, bias), atol=1e-5)  # fmt: skip


def test_replaced_kernels_are_used_after_forget_kernels(rng, monkeypatch):
    """A test that replaces a kernel calls api._forget_kernels(): the remembered calls go too, so
    the replacement runs; forgotten again, the original does."""
    from nbgn.kernels import nchw

    x, weight, bias = _inputs(rng, "NCHW", np.float32, True)
    nbgn.group_norm(x, GROUPS, weight, bias)
    nbgn.group_norm(x, GROUPS, weight, bias)
    calls = []
    original = nchw.normalize_slabs  # the serial kernel
    monkeypatch.setattr(nchw, "normalize_slabs",
                        lambda *args: calls.append(1) or original(*args))  # fmt: skip
    api._forget_kernels()
    expected = reference_group_norm(x, GROUPS, weight, bias)
    for _ in range(2):
        np.testing.assert_allclose(nbgn.group_norm(x, GROUPS, weight, bias), expected, atol=1e-5)
    assert len(calls) == 2
    monkeypatch.undo()
    api._forget_kernels()
    nbgn.group_norm(x, GROUPS, weight, bias)
    nbgn.group_norm(x, GROUPS, weight, bias)
    assert len(calls) == 2


def test_a_lowered_pool_threshold_reaches_the_pool(rng, monkeypatch, general_path_calls):
    """Allocating results of _output_pool.MIN_BYTES or more come from the pool on either path."""
    from nbgn import _output_pool

    x, weight, bias = _inputs(rng, "NCHW", np.float32, True)
    nbgn.group_norm(x, GROUPS, weight, bias)
    monkeypatch.setattr(_output_pool, "MIN_BYTES", x.nbytes)
    before = len(general_path_calls)
    result = nbgn.group_norm(x, GROUPS, weight, bias)
    assert len(general_path_calls) == before  # the known call
    assert isinstance(result.base, _output_pool._Lease)
    np.testing.assert_allclose(result, reference_group_norm(x, GROUPS, weight, bias), atol=1e-5)


# (N, C, *spatial) channels first, num_groups, float dtype, in place: calls of 2 threads that take
# the fused kernel (24 NCHW slabs, 6 NHWC samples), the split one (one group, allocating) and the
# cooperative one (one 2 MiB group in place).
PARALLEL_CASES = [
    ((6, 16, 48, 48), 4, np.float32, False, "fused"),
    ((1, 16, 128, 128), 1, np.float32, False, "split"),
    ((1, 16, 128, 128), 1, np.float64, True, "cooperative"),
]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 or more Numba threads")
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize(("shape", "groups", "dtype", "in_place", "kernel"), PARALLEL_CASES,
                         ids=[case[-1] for case in PARALLEL_CASES])  # fmt: skip
def test_a_parallel_call_is_replayed_with_identical_results(
    rng, general_path_calls, shape, groups, dtype, in_place, kernel, layout
):
    """The second call replays the first one's parallel kernel, addresses and counts."""
    from nbgn.kernels import nchw, nhwc

    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        x, weight, bias = _inputs(rng, layout, dtype, True, shape)
        results = _normalize_copies(x, groups, weight, bias, layout, in_place)
    finally:
        numba.set_num_threads(before)
    assert len(general_path_calls) == 1  # the first call only
    [call] = api._KNOWN_CALLS.values()
    module = nhwc if layout == "NHWC" else nchw
    assert call.parallel
    assert call.kernel is getattr(module, f"group_norm_{kernel}")
    np.testing.assert_array_equal(results[1], results[0])
    expected = reference_group_norm(x, groups, weight, bias, 1e-5, layout)
    np.testing.assert_allclose(results[1], expected, atol=tolerance(dtype))


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 or more Numba threads")
def test_the_thread_count_and_a_serial_child_decide_again(rng, general_path_calls, monkeypatch):
    """A call remembered on two threads is not replayed on one, nor where parallel kernels must
    not run (a child forked after GNU OpenMP ran: ``_threading.serial_only``): those calls are
    planned again, serially; back on two threads, the parallel call is replayed."""
    from nbgn import _threading

    shape, groups, dtype, _, _ = PARALLEL_CASES[0]
    x, weight, bias = _inputs(rng, "NCHW", dtype, True, shape)
    expected = reference_group_norm(x, groups, weight, bias)
    before = numba.get_num_threads()
    kinds = []
    try:
        for threads, serial_only in ((2, False), (1, False), (2, True), (2, False)):
            numba.set_num_threads(threads)
            monkeypatch.setitem(_threading._choice, "serial_only", serial_only)
            calls = len(general_path_calls)
            result = nbgn.group_norm(x, groups, weight, bias)
            np.testing.assert_allclose(result, expected, atol=tolerance(dtype))
            key = api._call_key(x, groups, "NCHW", False, False)
            kinds.append((len(general_path_calls) - calls, api._KNOWN_CALLS[key].parallel))
    finally:
        numba.set_num_threads(before)
    # The serial child's key is one thread's: planned once, on one thread, and then replayed.
    assert kinds == [(1, True), (1, False), (0, False), (0, True)]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 or more Numba threads")
def test_in_place_and_allocating_are_different_calls(rng, general_path_calls):
    """One float64 group of 2 MiB on two threads: split allocating, cooperative in place, each
    planned once and replayed with its own callees (the split kernel's out-of-place callees,
    replayed in place, would write through a missing output)."""
    from nbgn.kernels import nchw

    x, weight, bias = _inputs(rng, "NCHW", np.float64, True, (1, 16, 128, 128))
    expected = reference_group_norm(x, 1, weight, bias)
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        for _ in range(2):
            for in_place in (False, True):
                source = x.copy()
                result = nbgn.group_norm(source, 1, weight, bias, out=source if in_place else None)
                np.testing.assert_allclose(result, expected, atol=tolerance(np.float64))
    finally:
        numba.set_num_threads(before)
    assert len(general_path_calls) == 2
    kernels = {key[5]: call.kernel for key, call in api._KNOWN_CALLS.items()}
    assert kernels == {False: nchw.group_norm_split, True: nchw.group_norm_cooperative}


def test_a_refused_call_starts_no_threads():
    """Building the key of a large call does not start Numba's threads (on GNU OpenMP, a child
    forked after they start runs serially): a refused call leaves them as they were."""
    code = textwrap.dedent(
        """
        import numpy as np
        from numba.np.ufunc import parallel
        import nbgn
        for x in (np.zeros((1, 8, 64, 64), np.float32), np.zeros((1, 8, 64, 64), np.int64)):
            try:
                nbgn.group_norm(x, 3)
            except (TypeError, ValueError):
                pass
        print(parallel._is_initialized)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]
