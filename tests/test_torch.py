"""Against PyTorch's torch.nn.functional.group_norm, including channels_last tensors."""

import numpy as np
import pytest
from reference import make_input

import nbgn

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "groups"),
    [((4, 16, 12, 12), 4), ((2, 32, 7, 9), 8), ((1, 64, 33, 33), 32), ((3, 6, 10), 3), ((5, 6), 2)],
)
def test_nchw_matches_torch(rng, shape, groups, dtype, affine):
    x = make_input(shape, "NCHW", dtype, rng, scale=2.0, offset=1.0)
    weight = rng.standard_normal(shape[1]).astype(dtype) if affine else None
    bias = rng.standard_normal(shape[1]).astype(dtype) if affine else None
    expected = F.group_norm(
        torch.from_numpy(x),
        groups,
        None if weight is None else torch.from_numpy(weight),
        None if bias is None else torch.from_numpy(bias),
    ).numpy()
    atol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(nbgn.group_norm(x, groups, weight, bias), expected, atol=atol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "groups"), [((4, 16, 12, 12), 4), ((2, 64, 20, 20), 32)])
def test_channels_last_matches_torch(rng, shape, groups, dtype):
    x = make_input(shape, "NCHW", dtype, rng)
    weight = rng.standard_normal(shape[1]).astype(dtype)
    bias = rng.standard_normal(shape[1]).astype(dtype)
    tensor = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    expected = F.group_norm(tensor, groups, torch.from_numpy(weight), torch.from_numpy(bias))
    assert expected.is_contiguous(memory_format=torch.channels_last)
    atol = 1e-5 if dtype == np.float32 else 1e-12
    nhwc = tensor.permute(0, 2, 3, 1).numpy()  # the same memory, as an NHWC array
    assert nhwc.flags.c_contiguous
    result = nbgn.group_norm(nhwc, groups, weight, bias, layout="NHWC")
    np.testing.assert_allclose(result, expected.permute(0, 2, 3, 1).numpy(), atol=atol)
    # The channels_last tensor's NCHW-shaped view, normalized in place through the shared memory.
    view = tensor.numpy()
    nbgn.group_norm(view, groups, weight, bias, out=view)
    np.testing.assert_allclose(tensor.numpy(), expected.numpy(), atol=atol)
