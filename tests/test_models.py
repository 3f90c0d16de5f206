import math

import pytest
import torch
from torch import nn

from lightning_norm.models import DeepLinearNetwork, VGGLike


@pytest.mark.parametrize("bn", [True, False])
def test_vgg_like_shapes_and_norms(bn):
    model = VGGLike("vgg_small", num_classes=7, in_channels=1, width=0.25, batch_norm=bn)
    out = model(torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 7)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert n_conv == 4 and n_bn == (4 if bn else 0)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [16, 32, 64, 64]


def test_vgg_glorot_init_bounds():
    torch.manual_seed(0)
    model = VGGLike("vgg_tiny", batch_norm=False)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * 9
            fan_out = m.out_channels * 9
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound
            assert m.weight.abs().max() > 0.9 * bound  # uniform fills its range
            assert torch.all(m.bias == 0)


def test_deep_linear_network_is_the_product_of_its_matrices():
    model = DeepLinearNetwork(depth=5, width=4).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    product = torch.eye(4, dtype=torch.float64)
    for layer in model.layers:
        product = layer.weight @ product
    torch.testing.assert_close(model(x), x @ product.T)
    assert all(layer.bias is None for layer in model.layers)


def test_deep_linear_network_with_bn():
    model = DeepLinearNetwork(depth=25, width=10, batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 24
    assert model(torch.randn(8, 10)).shape == (8, 10)
