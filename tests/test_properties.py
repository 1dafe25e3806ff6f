"""Property tests: random shapes, strides, layouts, dtypes, eps, affine and in place."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import from_channels_first, reference_group_norm, to_channels_first

import nbgn

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def problems(draw):
    groups = draw(st.integers(1, 4))
    channels = groups * draw(st.integers(1, 4))
    spatial = draw(st.lists(st.integers(1, 6), min_size=0, max_size=3))
    n = draw(st.integers(1, 3))
    layout = draw(st.sampled_from(["NCHW", "NHWC"]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    offset = draw(st.sampled_from([0.0, 1.0, -50.0, 1e3]))
    scale = draw(st.sampled_from([1.0, 1e-2, 30.0]))
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((n, channels, *spatial)) * scale + offset
    x = np.ascontiguousarray(from_channels_first(data, layout)).astype(dtype)
    return x, groups, layout, rng


@SETTINGS
@given(
    problem=problems(),
    eps=st.sampled_from([1e-5, 1e-3, 0.5]),
    affine=st.booleans(),
    mode=st.sampled_from(["allocate", "out", "in_place"]),
    step=st.sampled_from([1, 2]),
)
def test_matches_reference(problem, eps, affine, mode, step):
    x, groups, layout, rng = problem
    if step > 1:  # a strided view of a larger array, along the first spatial (or last) axis
        wide = np.repeat(x, step, axis=x.ndim - 1 if layout == "NCHW" else 0)
        x = wide[..., ::step] if layout == "NCHW" else wide[::step]
    channels = x.shape[1] if layout == "NCHW" else x.shape[-1]
    weight = rng.standard_normal(channels) if affine else None
    bias = rng.standard_normal(channels) if affine else None
    expected = reference_group_norm(x, groups, weight, bias, eps, layout)
    if mode == "allocate":
        result = nbgn.group_norm(x, groups, weight, bias, eps=eps, layout=layout)
    elif mode == "out":
        result = nbgn.group_norm(
            x, groups, weight, bias, eps=eps, layout=layout, out=np.empty_like(x)
        )
    else:
        result = nbgn.group_norm(x, groups, weight, bias, eps=eps, layout=layout, out=x)
    scale = 1.0 if weight is None else max(1.0, np.abs(weight).max())
    atol = (3e-5 if x.dtype == np.float32 else 1e-11) * scale
    np.testing.assert_allclose(result, expected, rtol=0, atol=atol)


def _spread(x, groups, layout):
    grouped = to_channels_first(x.astype(np.float64), layout).reshape(x.shape[0], groups, -1)
    return grouped.max(axis=-1) - grouped.min(axis=-1)


@SETTINGS
@given(problem=problems())
def test_groups_come_out_with_mean_0_and_variance_1(problem):
    x, groups, layout, _ = problem
    if np.any(_spread(x, groups, layout) == 0):  # a constant group comes out as bias: tested apart
        return
    y = nbgn.group_norm(x, groups, eps=0.0, layout=layout)
    mean, var = nbgn.group_moments(y, groups, layout=layout)
    tol = 2e-4 if x.dtype == np.float32 else 1e-10
    np.testing.assert_allclose(mean, 0.0, atol=tol)
    np.testing.assert_allclose(var, 1.0, atol=tol)


@SETTINGS
@given(
    problem=problems(),
    shift=st.sampled_from([-1e3, 7.0, 1e4]),
    factor=st.sampled_from([1e-3, 0.5, 64.0]),
)
def test_invariant_to_adding_a_constant_and_positive_scaling(problem, shift, factor):
    x, groups, layout, _ = problem
    x = x.astype(np.float64)
    if np.any(_spread(x, groups, layout) < 1e-3):
        return
    y = nbgn.group_norm(x, groups, eps=0.0, layout=layout)
    np.testing.assert_allclose(
        nbgn.group_norm(x + shift, groups, eps=0.0, layout=layout), y, atol=1e-7
    )
    np.testing.assert_allclose(
        nbgn.group_norm(x * factor, groups, eps=0.0, layout=layout), y, atol=1e-9
    )


@SETTINGS
@given(problem=problems(), affine=st.booleans())
def test_nchw_and_nhwc_agree_and_in_place_equals_allocating(problem, affine):
    x, groups, layout, rng = problem
    channels = x.shape[1] if layout == "NCHW" else x.shape[-1]
    weight = rng.standard_normal(channels) if affine else None
    bias = rng.standard_normal(channels) if affine else None
    allocated = nbgn.group_norm(x, groups, weight, bias, layout=layout)
    in_place = x.copy()
    nbgn.group_norm(in_place, groups, weight, bias, layout=layout, out=in_place)
    np.testing.assert_array_equal(in_place, allocated)
    other = "NHWC" if layout == "NCHW" else "NCHW"
    x_other = np.ascontiguousarray(from_channels_first(to_channels_first(x, layout), other))
    y_other = nbgn.group_norm(x_other, groups, weight, bias, layout=other)
    back = from_channels_first(to_channels_first(y_other, other), layout)
    atol = 2e-5 if x.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(
        back, allocated, atol=atol * max(1.0, np.abs(weight).max() if affine else 1.0)
    )
