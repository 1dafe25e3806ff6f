"""GroupNorm: a layer object holding weight and bias, like torch.nn.GroupNorm."""

import numpy as np
import pytest
from reference import make_input, reference_group_norm

import nbgn


def test_defaults():
    layer = nbgn.GroupNorm(4, 16)
    assert layer.weight.dtype == np.float32
    np.testing.assert_array_equal(layer.weight, np.ones(16))
    np.testing.assert_array_equal(layer.bias, np.zeros(16))
    assert (layer.num_groups, layer.num_channels, layer.eps) == (4, 16, 1e-5)
    assert layer.affine
    assert layer.layout == "NCHW"
    assert repr(layer) == "GroupNorm(4, 16, eps=1e-05, affine=True, layout='NCHW')"


def test_without_affine():
    layer = nbgn.GroupNorm(2, 8, affine=False)
    assert layer.weight is None
    assert layer.bias is None


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_uses_its_parameters(rng, layout):
    layer = nbgn.GroupNorm(4, 8, eps=1e-3, layout=layout)
    layer.weight[:] = rng.standard_normal(8)
    layer.bias = rng.standard_normal(8).astype(np.float32)
    x = make_input((3, 8, 5, 5), layout, np.float32, rng)
    expected = reference_group_norm(x, 4, layer.weight, layer.bias, 1e-3, layout)
    np.testing.assert_allclose(layer(x), expected, atol=3e-5)
    out = np.empty_like(x)
    assert layer(x, out=out) is out
    np.testing.assert_allclose(out, expected, atol=3e-5)
    assert layer(x, out=x) is x
    np.testing.assert_allclose(x, expected, atol=3e-5)


def test_matches_torch_layer(rng):
    torch = pytest.importorskip("torch")
    layer = nbgn.GroupNorm(4, 8)
    reference = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(rng.standard_normal(8).astype(np.float32)))
        reference.bias.copy_(torch.from_numpy(rng.standard_normal(8).astype(np.float32)))
    layer.weight[:] = reference.weight.detach().numpy()
    layer.bias[:] = reference.bias.detach().numpy()
    x = make_input((2, 8, 6, 6), "NCHW", np.float32, rng)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)
