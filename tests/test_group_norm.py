"""group_norm against the float64 two-pass reference: every layout, dtype, rank, mode and path."""

import numba
import numpy as np
import pytest
from reference import (
    from_channels_first,
    make_input,
    past_line,
    reference_group_norm,
    to_channels_first,
    tolerance,
)

import nbgn
from nbgn import _schedule
from nbgn.kernels import nchw, nhwc, simd

SHAPES = [(3, 8), (2, 8, 5), (2, 8, 5, 6), (2, 8, 3, 4, 5)]  # (N, C, *spatial), 0 to 3 spatial dims
DTYPES = [np.float32, np.float64]
LAYOUTS = ["NCHW", "NHWC"]


def _affine(rng, channels, affine):
    if not affine:
        return None, None
    return rng.standard_normal(channels), rng.standard_normal(channels)


@pytest.mark.parametrize("mode", ["allocate", "out", "in_place"])
@pytest.mark.parametrize("eps", [1e-5, 0.1, 0.0])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(rng, shape, dtype, layout, affine, eps, mode):
    x = make_input(shape, layout, dtype, rng, scale=2.0, offset=3.0)
    weight, bias = _affine(rng, shape[1], affine)
    expected = reference_group_norm(x, 4, weight, bias, eps, layout)
    original = x.copy()
    if mode == "allocate":
        result = nbgn.group_norm(x, 4, weight, bias, eps=eps, layout=layout)
        np.testing.assert_array_equal(x, original)
    elif mode == "out":
        out = np.full_like(x, np.nan)
        result = nbgn.group_norm(x, 4, weight, bias, eps=eps, layout=layout, out=out)
        assert result is out
        np.testing.assert_array_equal(x, original)
    else:
        result = nbgn.group_norm(x, 4, weight, bias, eps=eps, layout=layout, out=x)
        assert result is x
    assert result.dtype == dtype
    assert result.shape == x.shape
    np.testing.assert_allclose(result, expected, rtol=0, atol=tolerance(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "groups"),
    [((6, 16, 48, 48), 4), ((1, 16, 128, 128), 1), ((3, 6, 64, 64), 3), ((1, 2048, 7, 7), 32)],
)
def test_parallel_paths_match_reference(rng, shape, groups, dtype, layout):
    """Large enough for the parallel kernels: fused, and split across threads (few units)."""
    _assert_matches_reference(make_input(shape, layout, dtype, rng, offset=-7.0), groups, layout)


def _assert_matches_reference(x, groups, layout):
    """Allocating, then in place, with per-channel weight and bias, against the reference."""
    rng = np.random.default_rng(5)
    weight, bias = _affine(rng, x.shape[1 if layout == "NCHW" else -1], True)
    expected = reference_group_norm(x, groups, weight, bias, 1e-5, layout)
    atol = tolerance(x.dtype)
    np.testing.assert_allclose(nbgn.group_norm(x, groups, weight, bias, layout=layout), expected,
                               atol=atol)  # fmt: skip
    nbgn.group_norm(x, groups, weight, bias, layout=layout, out=x)
    np.testing.assert_allclose(x, expected, atol=atol)


@pytest.mark.parametrize(
    ("units", "unit_elements", "expected", "itemsize", "in_place"),
    [
        (1, 16 * 128 * 128, _schedule.Plan(True, 2, 1), 0, False),  # one big group: split in two
        (1, 16 * 128 * 128, _schedule.Plan(True, 2, 1), 4, False),  # so it is allocating
        (1, 4 * 128 * 128, _schedule.SERIAL, 0, False),  # one group too small to split: no launch
        (3, 6 * 64 * 64, _schedule.Plan(True, 1, 2), 4, True),  # parts under MIN_PART_ELEMENTS
        (3, 1 << 18, _schedule.Plan(True, 2, 2), 4, False),  # 3 units on 2 threads: halves even out
        (32, 64 * 49, _schedule.Plan(True, 1, 2), 4, True),  # many units: a run of them per thread
        # In place, units of more than 1 MiB: all threads on one unit after the other.
        (64, 16 * 112 * 112, _schedule.Plan(True, 2, 2, True), 8, True),  # the seed in float64
        (64, 16 * 112 * 112, _schedule.Plan(True, 1, 2), 4, True),  # in float32: 0.8 MB samples
        (1, 8 * 256 * 256, _schedule.Plan(True, 2, 2, True), 4, True),  # one sample, not a split
        (8, 4 * 512 * 512, _schedule.Plan(True, 2, 2, True), 4, True),  # NCHW (1, 32, 512, 512)/8
        # Fewer units than threads, too small to split: together where a part is worth a thread.
        (1, 64 * 56 * 56, _schedule.Plan(True, 2, 2, True), 4, False),  # 784 KiB, allocating
        (1, 64 * 56 * 56, _schedule.Plan(True, 2, 2, True), 4, True),  # and in place
        (1, 8 * 112 * 112, _schedule.Plan(True, 2, 2, True), 4, False),  # 392 KiB
        (1, 8 * 72 * 72, _schedule.SERIAL, 8, False),  # 324 KiB: serially
        (1, 4 * 128 * 128, _schedule.SERIAL, 4, True),  # 256 KiB
    ],
)
def test_two_thread_plans(units, unit_elements, expected, itemsize, in_place):
    """The shapes above take the paths their comments say (the plan for 2 threads of a group norm
    of ``itemsize`` bytes a value, 0: the moments alone)."""
    plan = _schedule._parallel_plan(units, unit_elements, 2, unit_elements * itemsize, in_place)
    assert plan == expected


@pytest.mark.parametrize(
    ("units", "threads", "expected"),
    [
        (1, 8, _schedule.Plan(True, 2, 2, True)),  # 400 KB: two parts of at least 192 KiB
        (3, 4, _schedule.Plan(True, 1, 3)),  # two helpers for three units: a unit a thread
        (2, 4, _schedule.Plan(True, 1, 2)),  # two helpers for two: as many, without the waits
        (1, 4, _schedule.Plan(True, 2, 2, True)),
    ],
)
def test_plans_of_fewer_units_than_threads(units, threads, expected):
    """Units of 100,000 float32 values (400 KB), too small to split, fewer than ``threads``:
    together only where that makes more threads than the fused plan's one a unit."""
    plan = _schedule._parallel_plan(units, 100_000, threads, 400_000, False)
    assert plan == expected


@pytest.mark.parametrize("parts", [2, 3, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_kernels_merge_exactly(rng, monkeypatch, parts, layout, dtype):
    """Force the split path (moments per part, merged with Chan's formula) whatever the core count."""
    monkeypatch.setattr(_schedule, "SERIAL_ELEMENTS", 0)  # else this small input runs serially
    monkeypatch.setattr(
        _schedule,
        "plan",
        lambda units, elements, unit_bytes=0, in_place=False: _schedule.Plan(True, parts, 1),
    )
    x = make_input((2, 6, 37, 29), layout, dtype, rng, scale=1e-2, offset=300.0)
    weight, bias = _affine(rng, 6, True)
    expected = reference_group_norm(x, 3, weight, bias, 1e-5, layout)
    np.testing.assert_allclose(nbgn.group_norm(x, 3, weight, bias, layout=layout), expected,
                               atol=1e-4)  # fmt: skip
    mean, var = nbgn.group_moments(x, 3, layout=layout)
    grouped = to_channels_first(x.astype(np.float64), layout).reshape(2, 3, -1)
    np.testing.assert_allclose(mean, grouped.mean(-1), rtol=1e-14)
    np.testing.assert_allclose(var, grouped.var(-1), rtol=1e-9)


@pytest.mark.parametrize(
    ("shape", "groups"),
    [
        ((1, 64, 7, 7), 2),  # windows of channels (parts of whole windows, or of pieces)
        ((1, 64, 7, 7), 1),  # windows and pieces in one part
        ((2, 20, 8, 8), 4),  # simd.apply_channels
        ((1, 50, 17, 19), 2),  # rows of a 2-D view in place, a loop per channel out of place
        ((1, 6, 300), 2),  # long channels
        ((3, 40), 2),  # one value a channel
    ],
)
@pytest.mark.parametrize("cooperative", [False, True])
@pytest.mark.parametrize("parts", [2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_parts_of_slabs_cut_through_channels(rng, monkeypatch, shape, groups, cooperative, parts,
                                              dtype):  # fmt: skip
    """NCHW parts of a slab start and end inside channels (and windows of them): the channels
    wholly inside a part take the slab kernels' paths, the pieces at its ends a run each; split
    and cooperative, in place and not, with weights of their own per channel and without."""
    plan = (
        _schedule.Plan(True, parts, parts, True) if cooperative else _schedule.Plan(True, parts, 1)
    )
    _force_plan(monkeypatch, plan)
    x = make_input(shape, "NCHW", dtype, rng, scale=1e-2, offset=300.0)
    for affine in (True, False):
        weight, bias = _affine(rng, shape[1], affine)
        expected = reference_group_norm(x, groups, weight, bias, 1e-5, "NCHW")
        atol = tolerance(dtype)
        np.testing.assert_allclose(nbgn.group_norm(x, groups, weight, bias), expected, atol=atol)
        work = x.copy()
        nbgn.group_norm(work, groups, weight, bias, out=work)
        np.testing.assert_allclose(work, expected, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_samples", [1, 3])
def test_cooperative_path(rng, num_samples, dtype, layout):
    """In place, units (NHWC samples, NCHW slabs) of more than COOPERATIVE_BYTES: every thread on
    each unit in turn. Far from zero, with a constant group (exactly bias, eps=0), a NaN group and a
    first value far out among normal ones; allocating takes the other kernels, to the same result."""
    shape = (num_samples, 32, 192, 192)  # 4 groups: 1.2 MB slabs in float32
    n, c = shape[:2]
    unit = 8 * 192 * 192 if layout == "NCHW" else c * 192 * 192
    units = n * 4 if layout == "NCHW" else n
    assert unit * np.dtype(dtype).itemsize > _schedule.COOPERATIVE_BYTES
    plan = _schedule.plan(units, unit, unit * np.dtype(dtype).itemsize, in_place=True)
    assert plan.cooperative == (numba.get_num_threads() > 1)
    first = rng.standard_normal(shape) + 3e3
    first[-1, 8:16] = 7.25  # the last sample's group 1: constant
    first[0, 28, 50, 70] = np.nan  # the first sample's group 3
    first[0, 0, 0, 0] += 1e3  # the first value of the first sample's group 0
    x = np.ascontiguousarray(from_channels_first(first, layout)).astype(dtype)
    weight, bias = _affine(rng, c, True)
    expected = to_channels_first(reference_group_norm(x, 4, weight, bias, 0.0, layout), layout)
    constant = np.broadcast_to(bias[8:16, None, None], (8, 192, 192)).astype(dtype)
    expected[-1, 8:16] = constant  # 0 / sqrt(0) in the reference: nbgn gives the bias
    allocated = nbgn.group_norm(x, 4, weight, bias, eps=0.0, layout=layout)
    nbgn.group_norm(x, 4, weight, bias, eps=0.0, layout=layout, out=x)
    for result in (to_channels_first(x, layout), to_channels_first(allocated, layout)):
        np.testing.assert_array_equal(result[-1, 8:16], constant)
        assert np.isnan(result[0, 24:]).all()
        assert np.isnan(result).sum() == 8 * 192 * 192
        np.testing.assert_allclose(result, expected, atol=tolerance(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_unit_too_small_to_split(rng, dtype, layout):
    """One image whose single unit (an NHWC sample, an NCHW slab of one group) is too small for
    the split kernel's parts but worth a thread a part: all threads normalize it together,
    allocating, into ``out=`` and in place, far from zero."""
    shape, groups = ((1, 64, 56, 56), 32) if layout == "NHWC" else ((1, 8, 112, 112), 1)
    x = make_input(shape, layout, dtype, rng, scale=1e-2, offset=-7e2)
    unit = x.size
    plan = _schedule.plan(1, unit, unit * x.itemsize, in_place=False)
    assert unit < 2 * _schedule.MIN_PART_ELEMENTS
    assert plan.cooperative == (numba.get_num_threads() > 1)
    weight, bias = _affine(rng, shape[1], True)
    expected = reference_group_norm(x, groups, weight, bias, 1e-5, layout)
    atol = tolerance(dtype)
    out = np.empty_like(x)
    np.testing.assert_allclose(nbgn.group_norm(x, groups, weight, bias, layout=layout), expected,
                               atol=atol)  # fmt: skip
    nbgn.group_norm(x, groups, weight, bias, layout=layout, out=out)
    np.testing.assert_allclose(out, expected, atol=atol)
    nbgn.group_norm(x, groups, weight, bias, layout=layout, out=x)
    np.testing.assert_allclose(x, expected, atol=atol)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("threads", "parts"), [(1, 2), (1, 3), (2, 3)])
def test_cooperative_parts_of_threads_that_never_start(rng, threads, parts, layout):
    """A threading layer may run the cooperative kernels' loop bodies one after another on one
    thread: a part whose thread has not started is taken by one that has, so nothing waits forever.
    ``parts`` loop bodies on ``threads`` threads, against the reference."""
    x = make_input((3, 8, 40, 40), layout, np.float64, rng, offset=5.0)
    weight, bias = _affine(rng, 8, True)
    expected = reference_group_norm(x, 2, weight, bias, 1e-5, layout)
    out = np.empty_like(x)
    module, dims = {"NCHW": (nchw, (3, 8, 1600, 2)), "NHWC": (nhwc, (3, 1600, 8, 2))}[layout]
    kernel = module.group_norm_cooperative
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, previous))
    try:
        for target in (out.ravel(), None):
            together_at = module.cooperative_address(x.ravel(), target, 0.0)
            kernel(together_at, x.ravel(), target, *dims, weight, bias, 1e-5, 0.0, parts)
    finally:
        numba.set_num_threads(previous)
    np.testing.assert_allclose(out, expected, atol=tolerance(np.float64))
    np.testing.assert_allclose(x, expected, atol=tolerance(np.float64))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_strides_out_of_place(rng, layout):
    base = make_input((4, 8, 10, 12), layout, np.float32, rng)
    views = [
        base[::2],
        base[..., ::3] if layout == "NCHW" else base[:, ::3],
        np.asfortranarray(base),
    ]
    for view in views:
        expected = reference_group_norm(view, 2, layout=layout)
        np.testing.assert_allclose(nbgn.group_norm(view, 2, layout=layout), expected, atol=2e-5)
        out = np.empty_like(view)
        nbgn.group_norm(view, 2, layout=layout, out=out)
        np.testing.assert_allclose(out, expected, atol=2e-5)


def test_in_place_on_a_strided_view_writes_through(rng):
    big = make_input((4, 8, 10, 12), "NCHW", np.float64, rng)
    untouched = big[:, :, 1::2].copy()
    view = big[:, :, ::2]
    expected = reference_group_norm(view, 4)
    result = nbgn.group_norm(view, 4, out=view)
    assert result is view
    np.testing.assert_allclose(big[:, :, ::2], expected, atol=1e-12)
    np.testing.assert_array_equal(big[:, :, 1::2], untouched)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_memory_with_nchw_layout(rng, dtype):
    """An NCHW-shaped view of NHWC memory (PyTorch's channels_last) works in place and keeps its order."""
    memory = make_input((3, 8, 40, 40), "NHWC", dtype, rng)
    view = np.moveaxis(memory, -1, 1)  # shape (3, 8, 40, 40), channels-last strides
    expected = reference_group_norm(view, 4)
    result = nbgn.group_norm(view, 4)
    assert np.moveaxis(result, 1, -1).flags.c_contiguous
    np.testing.assert_allclose(result, expected, atol=tolerance(dtype))
    nbgn.group_norm(view, 4, out=view)
    np.testing.assert_allclose(np.moveaxis(memory, -1, 1), expected, atol=tolerance(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_in_another_memory_order(rng, layout):
    x = make_input((2, 8, 6, 7), layout, np.float32, rng)
    out = np.asfortranarray(np.empty_like(x))
    nbgn.group_norm(x, 4, layout=layout, out=out)
    np.testing.assert_allclose(out, reference_group_norm(x, 4, layout=layout), atol=2e-5)


@pytest.mark.parametrize("weight_dtype", [np.float16, np.float32, np.float64])
def test_weight_and_bias_of_any_float_dtype(rng, weight_dtype):
    x = make_input((2, 6, 5, 5), "NCHW", np.float32, rng)
    weight = rng.standard_normal(6).astype(weight_dtype)
    bias = rng.standard_normal(6).astype(weight_dtype)
    expected = reference_group_norm(x, 3, weight.astype(np.float64), bias.astype(np.float64))
    result = nbgn.group_norm(x, 3, weight, bias)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, atol=3e-5)


def test_array_likes_are_accepted():
    x = [[[1.0, 2.0], [3.0, 5.0]], [[0.0, 0.0], [1.0, 1.0]]]  # (N=2, C=2, W=2), float64
    result = nbgn.group_norm(x, 1, [1.0, 2.0], [0.0, 0.5])
    np.testing.assert_allclose(
        result, reference_group_norm(np.array(x), 1, [1.0, 2.0], [0.0, 0.5]), atol=1e-12
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
# NHWC samples of at most 1024 values take a channels-first copy, larger ones the lanes: serial
# small, serial lanes, parallel split.
@pytest.mark.parametrize("shape", [(5, 12, 9, 9), (3, 12, 20, 20), (1, 12, 160, 160)])
def test_nan_or_inf_poisons_only_its_group(rng, layout, dtype, shape):
    x = make_input(shape, layout, dtype, rng)
    cf = to_channels_first(x, layout)  # a view: writes go to x
    cf[0, 1, 0, 0] = np.nan  # sample 0, group 0 (channels 0-3)
    cf[0, 9, 2, 3] = np.inf  # sample 0, group 2 (channels 8-11): +inf and -inf
    cf[0, 10, 1, 1] = -np.inf
    several = shape[0] > 1
    if several:
        cf[-1, 5, 1, 2] = np.inf  # last sample, group 1 (channels 4-7)
    result = to_channels_first(nbgn.group_norm(x, 3, layout=layout), layout)
    assert np.isnan(result[0, 0:4]).all()
    assert np.isnan(result[0, 8:12]).all()
    assert np.isfinite(result[0, 4:8]).all()
    if several:
        assert np.isnan(result[-1, 4:8]).all()
        assert np.isfinite(result[-1, 0:4]).all()
        assert np.isfinite(result[-1, 8:12]).all()
        assert np.isfinite(result[1:-1]).all()
    expected = reference_group_norm(x, 3, layout=layout)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(
        nbgn.group_norm(x, 3, layout=layout)[finite], expected[finite], atol=tolerance(dtype)
    )
    mean, var = nbgn.group_moments(x, 3, layout=layout)
    assert np.isnan(mean[0, 0])
    assert np.isnan(var[0, 0])
    assert np.isnan(var[0, 2])
    assert np.isfinite(var[0, 1])
    assert np.isfinite(var[1:-1]).all()


@pytest.mark.parametrize("eps", [1e-5, 0.0])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [0.0, 3.25, -1e8])
@pytest.mark.parametrize("shape", [(3, 6, 7, 5), (3, 6, 40, 30), (2, 6, 100, 90)])
def test_constant_group_gives_exactly_bias(rng, value, dtype, layout, eps, shape):
    x = make_input(shape, layout, dtype, rng)
    cf = to_channels_first(x, layout)
    cf[1, 2:4] = value  # sample 1, group 1 of 3
    bias = rng.standard_normal(6).astype(dtype)
    weight = rng.standard_normal(6).astype(dtype)
    result = to_channels_first(nbgn.group_norm(x, 3, weight, bias, eps=eps, layout=layout), layout)
    expected = np.broadcast_to(bias[2:4, None, None], (2, *shape[2:]))
    np.testing.assert_array_equal(result[1, 2:4], expected)
    plain = to_channels_first(nbgn.group_norm(x, 3, eps=eps, layout=layout), layout)
    np.testing.assert_array_equal(plain[1, 2:4], 0.0)
    assert np.isfinite(result).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 4), (2, 8, 4, 0), (0, 8), (2, 0, 3)])
def test_empty_inputs_give_empty_results(shape, layout):
    x = np.empty(
        shape if layout == "NCHW" else np.moveaxis(np.empty(shape), 1, -1).shape, np.float32
    )
    groups = 4 if x.shape[1 if layout == "NCHW" else -1] else 1
    result = nbgn.group_norm(x, groups, layout=layout)
    assert result.shape == x.shape
    assert result.dtype == np.float32
    out = np.empty_like(x)
    assert nbgn.group_norm(x, groups, layout=layout, out=out) is out
    assert nbgn.group_norm(x, groups, layout=layout, out=x) is x


def test_seed_walkthrough_statistics():
    """The walkthrough's tensor and groups: output std is 1 (not its buggy 3.46), mean 0."""
    tensor = np.random.default_rng(0).random((8, 16, 112, 112))
    result = nbgn.group_norm(tensor, 4)
    assert abs(result.mean()) < 1e-12
    assert abs(result.std() - 1.0) < 1e-3  # var / (var + eps) with var = 1/12
    buggy = (tensor - tensor.mean()) / (tensor.var() + 1e-5)
    assert buggy.std() > 3.4


def _force_plan(monkeypatch, plan):
    """Run small arrays with ``plan`` (None: their own, serial); without the lowered threshold
    they would run serially."""
    if plan is not None:
        monkeypatch.setattr(_schedule, "SERIAL_ELEMENTS", 0)
        monkeypatch.setattr(
            _schedule, "plan", lambda units, elements, unit_bytes=0, in_place=False: plan
        )


def _assert_normalizes_at_offsets(rng, shape, groups, dtype, skips, offset=0.0):
    """NHWC ``x`` of ``shape`` (plus ``offset``, per channel) starting ``skip`` values past a
    64-byte boundary of a buffer, for each of ``skips``: out of place and in place match the
    reference, and the buffer around ``x`` is untouched."""
    channels = shape[-1]
    size = int(np.prod(shape))
    weight, bias = _affine(rng, channels, True)
    for skip_in_line in skips:
        buffer = rng.standard_normal(size + 32).astype(dtype)
        skip = past_line(buffer, skip_in_line)
        x = buffer[skip : skip + size].reshape(shape)
        x += np.asarray(offset).astype(dtype)
        around = np.concatenate([buffer[:skip], buffer[skip + size :]])
        expected = reference_group_norm(x, groups, weight, bias, 1e-5, "NHWC")
        out = np.empty_like(x)
        nbgn.group_norm(x, groups, weight, bias, layout="NHWC", out=out)
        message = f"{skip_in_line} values past a line"
        np.testing.assert_allclose(out, expected, atol=tolerance(dtype), err_msg=message)
        nbgn.group_norm(x, groups, weight, bias, layout="NHWC", out=x)
        np.testing.assert_allclose(x, expected, atol=tolerance(dtype), err_msg=message)
        np.testing.assert_array_equal(
            np.concatenate([buffer[:skip], buffer[skip + size :]]), around
        )


PLANS = pytest.mark.parametrize(
    "plan",
    [None, _schedule.Plan(True, 3, 1), _schedule.Plan(True, 3, 3, True)],
    ids=["own", "split", "cooperative"],
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [5, 16, 48])
@PLANS
def test_any_buffer_alignment(rng, monkeypatch, dtype, channels, plan):
    """Arrays starting anywhere in a 64-byte line: the NHWC normalization starts its rows where
    the buffer is aligned, and the first values (the skew) take rotated lane coefficients."""
    _force_plan(monkeypatch, plan)
    shape = (2, 37, 9, channels)  # NHWC: 333 positions, not a multiple of the lane rows
    groups = 1 if channels == 5 else 4
    _assert_normalizes_at_offsets(rng, shape, groups, dtype, range(64 // np.dtype(dtype).itemsize))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("channels", "groups"), [(512, 8), (1024, 64), (2048, 32)])
@PLANS
def test_group_rows_at_any_buffer_alignment(rng, monkeypatch, dtype, channels, groups, plan):
    """NHWC rows of one position whose groups are whole vectors (simd.apply_group_rows): at
    starts across a 64-byte line, the last vector of each group in a row holds the next group's
    first channels, which take that group's center. Groups of 1 to 8 vectors; far from zero, so
    that a wrong center shows."""
    _force_plan(monkeypatch, plan)
    centers = np.repeat(rng.uniform(-50.0, 50.0, groups), channels // groups)
    skips = range(0, 64 // np.dtype(dtype).itemsize, 3)
    _assert_normalizes_at_offsets(rng, (2, 3, 7, channels), groups, dtype, skips, centers)


def _normalized_off_a_line(x, groups, weight, bias, **kwargs):
    """``group_norm`` of ``x`` into an output one value past a 64-byte line of a NaN-filled
    buffer (``kwargs``: eps, layout); asserts that the call returns that output and writes nothing
    around it, and returns it."""
    buffer = np.full(x.size + 64, np.nan, x.dtype)
    first = past_line(buffer, 1)
    out = buffer[first : first + x.size].reshape(x.shape)
    assert nbgn.group_norm(x, groups, weight, bias, out=out, **kwargs) is out
    assert np.isnan(buffer[:first]).all()
    assert np.isnan(buffer[first + x.size :]).all()
    return out


def _out_of_place_then_in_place(x, groups, weight, bias):
    """NCHW ``x`` normalized into an output off a line (``_normalized_off_a_line``), checked
    against the reference, then in place: the very bits of the output."""
    out = _normalized_off_a_line(x, groups, weight, bias)
    expected = reference_group_norm(x, groups, weight, bias)
    np.testing.assert_allclose(out, expected, rtol=0, atol=tolerance(x.dtype))
    nbgn.group_norm(x, groups, weight, bias, out=x)
    np.testing.assert_array_equal(out, x)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("samples", "channels", "spatial", "groups", "weights"),
    [
        (8, 16, None, 4, "random"),  # slabs of their own, a loop per channel
        (8, 16, None, 4, None),  # one segment a slab (no weight: all channels share it)
        (None, 40, 64, 1, "uniform"),  # the weight-pattern kernel's segments (equal weights)
        (1, 2, None, 1, "random"),  # one slab, split between the threads where there are two
    ],
    ids=["channels", "segments", "patterned segments", "one slab"],
)
def test_outputs_past_the_l3_stream(rng, samples, channels, spatial, groups, weights):
    """Out of place, input and output together as large as ``simd._host_stream_bytes()``: the
    stores stream past the caches (``simd.apply_run``) in every NCHW kernel that takes long runs,
    into an output one value off a 64-byte line. The reference's values, nothing written around
    the output, and, where in place takes the same plan, the very bits of the in-place result."""
    limit = simd._host_stream_bytes()
    if limit is None:
        pytest.skip("this host describes no L3, or is not x86-64: nothing streams")
    values = -(-limit // 8)  # float32 values in x for x and out to reach the limit
    if samples is None:
        samples = -(-values // (channels * spatial))
    else:
        spatial = -(-values // (samples * channels))
    x = make_input((samples, channels, spatial), "NCHW", np.float32, rng, scale=2.0, offset=5.0)
    weight, bias = {
        "random": (rng.standard_normal(channels), rng.standard_normal(channels)),
        "uniform": (np.full(channels, 1.5), np.full(channels, -0.5)),
        None: (None, None),
    }[weights]
    out = _normalized_off_a_line(x, groups, weight, bias)
    assert 2 * x.nbytes >= limit
    expected = reference_group_norm(x, groups, weight, bias)
    np.testing.assert_allclose(out, expected, rtol=0, atol=tolerance(np.float32))
    if samples * groups > 1:  # fused in place too (one slab in place: the cooperative kernel)
        nbgn.group_norm(x, groups, weight, bias, out=x)
        np.testing.assert_array_equal(out, x)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("channels", "spatial", "groups", "dtype", "uniform_group"),
    [
        (32, 49, 2, np.float32, None),  # windows of channels (16 float32 channels a window)
        (16, 196, 1, np.float32, None),  # channels of a few vectors (simd.apply_channels)
        (1024, 1, 2, np.float64, None),  # one value a channel, in slabs of 512
        (60, 7, 1, np.float64, None),  # channels shorter than a vector, a loop each
        (64, 49, 4, np.float32, 1),  # a group of one weight and bias (streamed) among them
    ],
    ids=["windows", "short channels", "values", "tiny channels", "a uniform group between"],
)
def test_short_channels_past_the_l3(rng, channels, spatial, groups, dtype, uniform_group):
    """NCHW out of place past ``simd._host_stream_bytes()``, slabs of short channels: written
    through the caches first channel first (in place: last first), beside a uniform group's
    streamed slabs, into an output one value off a 64-byte line. The reference's values, nothing
    written around the output, and the very bits of the in-place result (the same plan: slabs
    of their own)."""
    limit = simd._host_stream_bytes()
    if limit is None:
        pytest.skip("this host describes no L3, or is not x86-64: nothing streams")
    itemsize = np.dtype(dtype).itemsize
    samples = -(-limit // (2 * itemsize * channels * spatial))
    x = make_input((samples, channels, spatial), "NCHW", dtype, rng, scale=2.0, offset=5.0)
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    if uniform_group is not None:  # that group's slabs stream as one segment (simd.apply_run)
        per_group = channels // groups
        weight[uniform_group * per_group : (uniform_group + 1) * per_group] = 1.5
        bias[uniform_group * per_group : (uniform_group + 1) * per_group] = -0.5
    slab_length = channels // groups * spatial
    assert _streams(x.ravel(), np.empty_like(x).ravel())
    # normalize_slabs' own slabs, not the weight patterns' nor the short slabs' kernels
    assert not _schedule.channel_patterns(samples, channels // groups, spatial, itemsize)
    assert slab_length > nchw.SHORT_SLAB
    _out_of_place_then_in_place(x, groups, weight, bias)


_streams = numba.njit(lambda x, out: simd.streams(x, out))
_streamed_rows_skew = numba.njit(
    lambda x, out, start, width: simd.streamed_rows_skew(x, out, start, width)
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("samples", "channels", "positions", "groups", "dtype", "eps"),
    [
        (None, 256, 1024, 32, np.float32, 1e-5),  # rows of two positions
        (None, 256, 1024, 32, np.float32, 1e-20),  # moments summed in float64 (NATIVE_MIN_EPS)
        (None, 3, 87381, 1, np.float32, 1e-5),  # one group; rows of 176 positions of 3 channels
        (None, 2048, 64, 32, np.float64, 1e-5),  # rows of one position, groups of whole vectors
        (None, 1000, 262, 8, np.float32, 1e-5),  # 1000 channels: rows of two positions
        (1, 64, None, 8, np.float32, 1e-5),  # one sample, split between the threads where two
    ],
    ids=[
        "two positions a row",
        "float64 sums",
        "one group",
        "float64 group rows",
        "odd C",
        "one sample",
    ],
)
def test_channels_last_outputs_past_the_l3_stream(rng, samples, channels, positions, groups,
                                                   dtype, eps):  # fmt: skip
    """NHWC out of place, input and output together as large as ``simd._host_stream_bytes()``:
    the rows' stores stream past the caches (``simd.apply_streamed_rows``), their first values on
    the output's 64-byte lines, into an output one value off a line. The reference's values,
    nothing written around the output, and, where in place takes the same plan (samples of at
    most ``_schedule.COOPERATIVE_BYTES``), the very bits of the in-place result."""
    limit = simd._host_stream_bytes()
    if limit is None:
        pytest.skip("this host describes no L3, or is not x86-64: nothing streams")
    itemsize = np.dtype(dtype).itemsize
    values = -(-limit // (2 * itemsize))  # values in x for x and out to reach the limit
    if samples is None:
        samples = -(-values // (channels * positions))
    else:
        positions = -(-values // (samples * channels))
    x = make_input((samples, channels, positions), "NHWC", dtype, rng, scale=2.0, offset=5.0)
    weight, bias = rng.standard_normal(channels), rng.standard_normal(channels)
    out = _normalized_off_a_line(x, groups, weight, bias, eps=eps, layout="NHWC")
    lane_width = nhwc.lane_positions(channels, positions) * channels
    assert _streamed_rows_skew(x.ravel(), out.ravel(), 0, lane_width) >= 0  # these rows stream
    assert 2 * x.nbytes >= limit
    expected = reference_group_norm(x, groups, weight, bias, eps, "NHWC")
    np.testing.assert_allclose(out, expected, rtol=0, atol=tolerance(dtype))
    if samples > 1:
        assert channels * positions * itemsize <= _schedule.COOPERATIVE_BYTES  # the fused plan
        nbgn.group_norm(x, groups, weight, bias, eps=eps, out=x, layout="NHWC")
        np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_small_channels_last_samples(rng, dtype):
    """Many small NHWC samples (nhwc.normalize_small_samples, serial then parallel runs of
    samples), far from zero: a NaN in one sample stays in that sample's group."""
    x = make_input((150, 6, 3, 3), "NHWC", dtype, rng, offset=3.0)
    x[97, 1, 2, 4] = np.nan  # sample 97, channel 4: group 2 of 3
    weight, bias = _affine(rng, 6, True)
    expected = reference_group_norm(x, 3, weight, bias, 1e-5, "NHWC")
    result = nbgn.group_norm(x, 3, weight, bias, layout="NHWC")
    assert np.isnan(result[97, ..., 4:]).all()
    assert np.isnan(result).sum() == 3 * 3 * 2
    np.testing.assert_allclose(result, expected, atol=tolerance(dtype))
    nbgn.group_norm(x, 3, weight, bias, layout="NHWC", out=x)
    np.testing.assert_allclose(x, expected, atol=tolerance(dtype))


@pytest.mark.parametrize(
    ("shape", "groups"),
    [
        ((4, 16, 6, 6), 2),
        ((16, 256, 7, 7), 32),
        ((5, 64, 7, 7), 8),  # five samples a group: two pairs, then one alone
        ((12, 72, 7, 7), 9),  # on two threads, a run of items ends inside a group
    ],
)
def test_channel_patterns_path(rng, shape, groups):
    """float32 NCHW with many short channels and per-channel weights: the patterned kernel
    (serial, then parallel on 2+ threads; samples of a group in pairs and alone), far from zero,
    with a constant group (exactly bias, eps=0) and a NaN group (all NaN) among normal ones."""
    n, c = shape[:2]
    unit = c // groups * shape[2] * shape[3]
    plan = _schedule.plan(n * groups, unit, unit * 4)
    assert _schedule.channel_patterns(n, c // groups, shape[2] * shape[3], 4)
    large = np.prod(shape) >= _schedule.SERIAL_ELEMENTS
    assert plan.parallel == (large and numba.get_num_threads() > 1)
    x = make_input(shape, "NCHW", np.float32, rng, offset=3e3)
    per_group = c // groups
    x[1, :per_group] = 7.25  # sample 1, group 0: constant
    x[2, per_group + 3, 1, 1] = np.nan  # sample 2, group 1
    weight, bias = _affine(rng, c, True)
    expected = reference_group_norm(x, groups, weight, bias, 0.0, "NCHW")
    constant = np.broadcast_to(bias[:per_group, None, None], (per_group, *shape[2:]))
    expected[1, :per_group] = constant  # 0 / sqrt(0) in the reference: nbgn gives the bias
    result = nbgn.group_norm(x, groups, weight, bias, eps=0.0)
    np.testing.assert_array_equal(result[1, :per_group], constant.astype(np.float32))
    assert np.isnan(result[2, per_group : 2 * per_group]).all()
    assert np.isnan(result).sum() == per_group * shape[2] * shape[3]
    np.testing.assert_allclose(result, expected, atol=tolerance(np.float32))
    nbgn.group_norm(x, groups, weight, bias, eps=0.0, out=x)
    np.testing.assert_allclose(x, expected, atol=tolerance(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "groups"),
    [
        ((16, 2048, 7, 7), 32),  # late layers: windows of 16 float32 or 8 float64 channels
        ((5, 256, 3, 3), 8),  # channels shorter than a vector: a vector spans several
        ((3, 64, 8, 8), 2),  # WINDOW_MAX_SPATIAL values, the longest
        ((16, 512, 3, 3), 32),  # slabs of 144 values: the short-slab kernel
        ((8, 1024, 2, 2), 32),  # slabs of 128, channels of 4
        ((9, 512, 2), 32),  # slabs of 32, channels of 2 (the shortest)
        ((8, 256, 3, 3), 32),  # short slabs of 8 channels: float32 windows of half a vector
        ((3, 96, 5, 5), 2),  # float32: 3 windows a group, float64: 6
    ],
)
def test_channel_windows_path(rng, shape, groups, dtype):
    """NCHW with short channels, whole windows of them a group, per-channel weights: the
    permuting kernel (simd.apply_channel_windows) where the host has it, in place and not, far
    from zero, with a constant group (exactly bias, eps=0), a NaN group (all NaN) and a group
    whose channels share one weight (one segment) among normal ones."""
    n, c = shape[:2]
    per_group = c // groups
    spatial = int(np.prod(shape[2:]))
    itemsize = np.dtype(dtype).itemsize
    wide = simd.host_window_widths(itemsize)[0]
    if wide and nchw.windows_fit(wide, per_group, spatial):
        assert not _schedule.channel_patterns(n, per_group, spatial, itemsize)
    x = make_input(shape, "NCHW", dtype, rng, offset=3e3)
    x[1, :per_group] = 7.25  # sample 1, group 0: constant
    x[2, per_group + 3, ...] = np.nan  # sample 2, group 1
    weight, bias = _affine(rng, c, True)
    weight[-per_group:] = 1.5  # the last group: one weight and bias
    bias[-per_group:] = -0.25
    expected = reference_group_norm(x, groups, weight, bias, 0.0, "NCHW")
    constant = np.broadcast_to(bias[:per_group].reshape((-1,) + (1,) * len(shape[2:])),
                               (per_group, *shape[2:]))  # fmt: skip
    expected[1, :per_group] = constant
    nan_values = per_group * spatial
    for result in (nbgn.group_norm(x, groups, weight, bias, eps=0.0),
                   nbgn.group_norm(x, groups, weight, bias, eps=0.0, out=x)):  # fmt: skip
        np.testing.assert_array_equal(result[1, :per_group], constant.astype(dtype))
        assert np.isnan(result[2, per_group : 2 * per_group]).all()
        assert np.isnan(result).sum() == nan_values
        np.testing.assert_allclose(result, expected, atol=tolerance(dtype))


@pytest.mark.parametrize(
    ("shape", "groups", "dtype"),
    [
        ((2, 64, 7, 7), 2, np.float32),  # windows of channels
        ((2, 32, 14, 14), 2, np.float32),  # channels of a few vectors (simd.apply_channels)
        ((3, 40, 17), 2, np.float64),  # channels of 17 float64 values: apply_channels, a tail
        ((2, 8, 30, 30), 2, np.float64),  # a loop per channel, slabs below FORWARD_SLAB_BYTES
        ((2, 4, 200, 200), 1, np.float32),  # 640 KB slabs, above it: last channel first
    ],
    ids=["windows", "short channels", "channel tails", "long channels", "large slabs"],
)
def test_out_of_place_order_gives_the_in_place_bits(rng, shape, groups, dtype):
    """Out of place, the NCHW channel loops go first channel first (save in slabs above
    ``nchw.FORWARD_SLAB_BYTES``), in place last first: the same values either way, bit for bit,
    into an output one value off a 64-byte line with nothing around it written, and the
    reference's. Shapes below the streaming limit, with the same plan in place and not."""
    assert 2 * np.prod(shape) * np.dtype(dtype).itemsize < (simd._host_stream_bytes() or np.inf)
    x = make_input(shape, "NCHW", dtype, rng, scale=2.0, offset=5.0)
    weight, bias = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    _out_of_place_then_in_place(x, groups, weight, bias)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "groups"),
    # Short slabs (nchw.SHORT_SLAB): no spatial dims, one value, a few, the limit; serial, then
    # parallel (more than SERIAL_ELEMENTS) with more slabs than a batch.
    [((8, 64), 32), ((8, 64, 1, 1), 8), ((6, 12, 2, 3), 3), ((4, 32, 8, 8), 8), ((64, 1024), 32)],
)
def test_short_slabs_path(rng, shape, groups, dtype, layout):
    """Slabs of at most SHORT_SLAB values, in batches: far from zero, with an outlier as a group's
    first value (in slabs of many values its pivot does not stand, and the slab is summed again),
    a constant group (exactly bias, eps=0), a NaN group and an Inf group among normal ones."""
    n, c = shape[:2]
    per_group = c // groups
    assert per_group * int(np.prod(shape[2:])) <= nchw.SHORT_SLAB
    assert not _schedule.channel_patterns(n, per_group, int(np.prod(shape[2:])), 4)
    x = to_channels_first(make_input(shape, layout, dtype, rng, offset=3e3), layout)
    first_position = (0,) * (len(shape) - 2)
    last_position = tuple(d - 1 for d in shape[2:])
    x[0, :per_group] = 7.25  # sample 0, group 0: constant
    x[(1, per_group, *first_position)] = np.nan  # sample 1, group 1
    x[(2, 0, *first_position)] = 3e3 + 1e5  # sample 2, group 0: an outlier first value
    x[(3, c - 1, *last_position)] = np.inf  # sample 3, last group
    x = np.ascontiguousarray(from_channels_first(x, layout))
    weight, bias = _affine(rng, c, True)
    expected = reference_group_norm(x, groups, weight, bias, 0.0, layout)
    result = nbgn.group_norm(x, groups, weight, bias, eps=0.0, layout=layout)
    first = to_channels_first(result, layout)
    constant = np.broadcast_to(bias[:per_group].reshape(-1, *([1] * (len(shape) - 2))),
                               (per_group, *shape[2:]))  # fmt: skip
    np.testing.assert_array_equal(first[0, :per_group], constant.astype(dtype))
    assert np.isnan(first[1, per_group : 2 * per_group]).all()
    assert np.isnan(first[3, c - per_group :]).all()
    assert np.isnan(result).sum() == 2 * per_group * int(np.prod(shape[2:]))
    expected_first = to_channels_first(expected, layout)
    expected_first[0, :per_group] = constant  # 0 / sqrt(0) in the reference: nbgn gives the bias
    finite = np.isfinite(expected_first)
    np.testing.assert_allclose(first[finite], expected_first[finite], atol=tolerance(dtype))
    nbgn.group_norm(x, groups, weight, bias, eps=0.0, layout=layout, out=x)
    np.testing.assert_array_equal(x, result)


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((4, 256), "NCHW"),  # one short slab of 256 values per sample
        ((1, 4, 16, 16), "NHWC"),  # one small sample of 1024 values
        ((3, 5, 3, 3), "NHWC"),  # small samples in rows of 3 positions and a partial one
    ],
)
def test_outlier_first_value_in_short_paths(rng, shape, layout):
    """float64, a group's first value 1e5 away (about sqrt(n) standard deviations of the group):
    summed about that value, s2's rounding reaches the outlier's own output scaled by its distance
    (2e-12 for 1024 values); the short paths sum such a group again about its mean."""
    x = make_input(shape, layout, np.float64, rng, offset=3e3)
    x.reshape(x.shape[0], -1)[:, 0] += 1e5  # the first value of every sample's first group
    expected = reference_group_norm(x, 1, None, None, 0.0, layout)
    result = nbgn.group_norm(x, 1, eps=0.0, layout=layout)
    np.testing.assert_allclose(result, expected, rtol=0, atol=tolerance(np.float64))


@pytest.mark.parametrize(
    ("shape", "groups", "layout"),
    [
        ((2, 16, 8, 8), 4, "NHWC"),  # samples of SMALL_SAMPLE values: the small-sample path
        ((2, 5, 205), 5, "NHWC"),  # 1025 values: the lanes
        ((4, 256), 1, "NCHW"),  # slabs of SHORT_SLAB values: the short path
        ((4, 257), 1, "NCHW"),  # 257: the general one
        ((2, 20000, 3, 3), 4, "NHWC"),  # rows wider than APPLY_CHUNK: one row per chunk
        # NHWC rows of whole vectors go through simd.apply_rows up to 8 vectors, sweeps beyond.
        ((2, 64, 5, 5), 8, "NHWC"),  # float32 rows of 4 vectors, float64 of 8 (the longest)
        ((2, 72, 5, 5), 8, "NHWC"),  # float32 rows of 9 (lcm(72, 16) = 144), float64 of 9
        ((2, 128, 5, 5), 8, "NHWC"),  # float32 rows of 8 (the longest), float64 of 16
        ((2, 136, 5, 5), 8, "NHWC"),  # float32 rows of 17, float64 of 17
        # Out of place, float32 rows of 8 KiB and 6 KiB go one at a time (a 48 KiB L1); their
        # moments fold 4, 1 and no vectors into a lane vector in float32, 4, 2 and none in float64.
        ((2, 2048, 3, 5), 32, "NHWC"),
        ((2, 1536, 3, 5), 32, "NHWC"),
        ((2, 2000, 3, 5), 8, "NHWC"),
        # NCHW channels of a vector to SHORT_CHANNEL values go through simd.apply_channels, its
        # last vector overlapping the one before; shorter and longer ones through Numba's loops.
        ((1, 256, 7), 4, "NCHW"),  # shorter than a vector (float64 has 8 lanes with AVX-512)
        ((1, 256, 8), 4, "NCHW"),  # float64: one vector a channel; float32: shorter than one
        ((1, 64, 17), 4, "NCHW"),  # a vector and one more value, in place too
        ((1, 64, 7, 7), 4, "NCHW"),  # 49: three vectors and an overlapping fourth (float32)
        ((1, 32, 16, 16), 4, "NCHW"),  # SHORT_CHANNEL values: the longest
        ((1, 32, 257), 4, "NCHW"),  # one more: Numba's loop
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_path_boundaries(rng, shape, groups, layout, dtype):
    _assert_matches_reference(make_input(shape, layout, dtype, rng, offset=3.0), groups, layout)
