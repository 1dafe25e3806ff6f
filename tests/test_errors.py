"""Every documented error: its type, a message naming the parameter, and nothing written before it."""

import numpy as np
import pytest

import nbgn


def _x(dtype=np.float32, shape=(2, 8, 4, 4)):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


BAD_DTYPES = [np.int32, np.int64, np.uint8, np.bool_, np.complex64, np.float16, object]


@pytest.mark.parametrize("function", [nbgn.group_norm, nbgn.baseline.group_norm])
@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_non_float_input_is_a_type_error(function, dtype):
    x = np.ones((2, 4, 3, 3), dtype=dtype)
    original = x.copy()
    with pytest.raises(TypeError, match=r"x has .*dtype.*astype\(np\.float32\)"):
        function(x, 2)
    with pytest.raises(TypeError, match="x has"):
        function(x, 2, out=x)
    np.testing.assert_array_equal(x, original)


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_moments_reject_non_float_input(dtype):
    with pytest.raises(TypeError, match="x has"):
        nbgn.group_moments(np.ones((2, 4, 3), dtype=dtype), 2)


def test_byte_swapped_float_is_refused_with_the_fix():
    x = _x().astype(">f4")
    with pytest.raises(TypeError, match=r"non-native byte order.*astype\(np\.float32\)"):
        nbgn.group_norm(x, 4)


def test_float16_is_named_as_a_float_without_kernels():
    with pytest.raises(TypeError, match=r"float16, a float width nbgn has no kernels for"):
        nbgn.group_norm(_x(np.float16), 4)


def test_masked_arrays_are_refused_before_anything_is_written():
    data = _x()
    masked = np.ma.masked_array(data.copy(), mask=data > 1)
    for call in (
        lambda: nbgn.group_norm(masked, 4),
        lambda: nbgn.group_norm(masked, 4, out=masked),
        lambda: nbgn.group_moments(masked, 4),
    ):
        with pytest.raises(TypeError, match=r"x is a masked array.*filled"):
            call()
    target = np.ma.masked_array(np.zeros_like(data))
    with pytest.raises(TypeError, match=r"out is a masked array.*np\.asarray\(out\)"):
        nbgn.group_norm(data, 4, out=target)
    np.testing.assert_array_equal(masked.data, data)
    assert not target.data.any()


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_ndarray_subclasses_are_normalized_as_plain_arrays(tmp_path):
    """np.matrix and np.memmap: allocating, into out, and in place (written through, returned as
    given)."""
    plain = _x(shape=(4, 8))
    expected = nbgn.group_norm(plain, 2)
    matrix = np.asmatrix(plain.copy())
    np.testing.assert_array_equal(nbgn.group_norm(matrix, 2), expected)
    assert nbgn.group_norm(matrix, 2, out=matrix) is matrix
    np.testing.assert_array_equal(np.asarray(matrix), expected)
    mapped = np.memmap(tmp_path / "x.bin", dtype=np.float32, mode="w+", shape=plain.shape)
    mapped[:] = plain
    target = np.asmatrix(np.zeros_like(plain))
    assert nbgn.group_norm(mapped, 2, out=target) is target
    np.testing.assert_array_equal(np.asarray(target), expected)
    assert nbgn.group_norm(mapped, 2, out=mapped) is mapped
    np.testing.assert_array_equal(np.asarray(mapped), expected)


# (description, kwargs or callable producing kwargs, error type, message pattern)
INVALID_CALLS = [
    ("zero groups", {"num_groups": 0}, ValueError, r"num_groups must be a positive integer, got 0"),
    ("negative groups", {"num_groups": -2}, ValueError, r"num_groups must be a positive"),
    (
        "groups not dividing C",
        {"num_groups": 3},
        ValueError,
        r"num_groups=3 does not divide the 8 channels.*\[1, 2, 4, 8\]",
    ),
    ("float groups", {"num_groups": 2.0}, TypeError, r"num_groups must be a positive integer"),
    ("bool groups", {"num_groups": True}, TypeError, r"num_groups must be a positive integer"),
    (
        "unknown layout",
        {"layout": "NHCW"},
        ValueError,
        r"layout must be 'NCHW'.*'NHWC'.*got 'NHCW'",
    ),
    ("lowercase layout", {"layout": "nchw"}, ValueError, r"layout must be"),
    (
        "weight too short",
        {"weight": np.ones(7)},
        ValueError,
        r"weight must have shape \(8,\).*got shape \(7,\)",
    ),
    ("bias 2-D", {"bias": np.zeros((8, 1))}, ValueError, r"bias must have shape \(8,\)"),
    (
        "integer weight",
        {"weight": np.ones(8, dtype=np.int64)},
        TypeError,
        r"weight has dtype int64",
    ),
    ("complex bias", {"bias": np.zeros(8, dtype=complex)}, TypeError, r"bias has dtype complex"),
    ("negative eps", {"eps": -1e-5}, ValueError, r"eps must be finite and >= 0"),
    ("nan eps", {"eps": float("nan")}, ValueError, r"eps must be finite"),
    ("inf eps", {"eps": float("inf")}, ValueError, r"eps must be finite"),
    ("string eps", {"eps": "small"}, TypeError, r"eps must be a real number"),
    (
        "out wrong shape",
        {"out": np.empty((2, 8, 4, 5), np.float32)},
        ValueError,
        r"out has shape \(2, 8, 4, 5\), but x has shape \(2, 8, 4, 4\)",
    ),
    (
        "out wrong dtype",
        {"out": np.empty((2, 8, 4, 4), np.float64)},
        ValueError,
        r"out has dtype float64, but x has dtype float32",
    ),
    ("out not an array", {"out": [0.0]}, TypeError, r"out must be a numpy.ndarray"),
]


@pytest.mark.parametrize("function", [nbgn.group_norm, nbgn.baseline.group_norm])
@pytest.mark.parametrize(("kwargs", "error", "pattern"), [c[1:] for c in INVALID_CALLS],
                         ids=[c[0] for c in INVALID_CALLS])  # fmt: skip
def test_invalid_arguments(function, kwargs, error, pattern):
    x = _x()
    original = x.copy()
    call = {"num_groups": 4, **kwargs}
    with pytest.raises(error, match=pattern):
        function(x, **call)
    np.testing.assert_array_equal(x, original)
    if "out" not in kwargs:  # the same refusal in place leaves x untouched
        with pytest.raises(error, match=pattern):
            function(x, out=x, **call)
        np.testing.assert_array_equal(x, original)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_fewer_than_two_dimensions(shape):
    with pytest.raises(ValueError, match=r"at least 2.*x\[None\]"):
        nbgn.group_norm(np.ones(shape, np.float32), 1)
    with pytest.raises(ValueError, match="at least 2"):
        nbgn.group_moments(np.ones(shape), 1)


def test_read_only_out_in_place_is_refused_and_untouched():
    x = _x()
    x.flags.writeable = False
    original = x.copy()
    with pytest.raises(ValueError, match="out is read-only"):
        nbgn.group_norm(x, 4, out=x)
    np.testing.assert_array_equal(x, original)
    x.flags.writeable = True


def test_read_only_input_out_of_place_is_fine():
    x = _x()
    x.flags.writeable = False
    assert nbgn.group_norm(x, 4).flags.writeable


@pytest.mark.parametrize(
    "make_out",
    [
        lambda big: big[1:],  # shifted by one sample
        lambda big: big[:-1, ::-1],  # same memory, reversed channels
        lambda big: big[:-1].reshape(-1)[::-1].reshape(big[:-1].shape),
    ],
)
def test_out_overlapping_x_without_being_x_is_refused(make_out):
    big = _x(shape=(3, 8, 4, 4))
    x = big[:-1]
    out = make_out(big)
    original = big.copy()
    with pytest.raises(ValueError, match="out overlaps x without being the same array"):
        nbgn.group_norm(x, 4, out=out)
    np.testing.assert_array_equal(big, original)


def test_out_interleaved_with_x_but_disjoint_is_accepted():
    big = _x(shape=(2, 8, 4, 8))
    x, out = big[..., ::2], big[..., 1::2]
    expected = nbgn.group_norm(x, 4)
    nbgn.group_norm(x, 4, out=out)
    np.testing.assert_allclose(big[..., 1::2], expected, atol=1e-6)


def test_a_second_view_of_the_same_memory_is_in_place():
    x = _x()
    alias = x[:]
    expected = nbgn.group_norm(x, 4)
    assert nbgn.group_norm(x, 4, out=alias) is alias
    np.testing.assert_allclose(x, expected, atol=1e-6)


def test_layer_errors():
    with pytest.raises(
        ValueError, match=r"num_groups=3 does not divide num_channels=8; .*\[1, 2, 4, 8\]"
    ):
        nbgn.GroupNorm(3, 8)
    # The divisors are found up to the square root: a prime channel count does not take seconds.
    with pytest.raises(ValueError, match=r"\[1, 11, 909091, 10000001\]"):
        nbgn.GroupNorm(3, 10_000_001)
    with pytest.raises(TypeError, match="num_channels must be an integer >= 0, got float"):
        nbgn.GroupNorm(2, 8.0)
    with pytest.raises(ValueError, match="layout must be"):
        nbgn.GroupNorm(2, 8, layout="CHW")
    with pytest.raises(ValueError, match="eps must be finite"):
        nbgn.GroupNorm(2, 8, eps=-1.0)
    layer = nbgn.GroupNorm(2, 8)
    with pytest.raises(ValueError, match=r"x has 6 channels.*num_channels=8"):
        layer(np.ones((2, 6, 3, 3), np.float32))
