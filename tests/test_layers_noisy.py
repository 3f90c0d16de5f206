"""NoisyBatchNorm: the injected noise follows S18 Algorithm 1; none in eval; reproducible."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_norm.errors import ConfigurationError
from lightning_norm.layers import NoisyBatchNorm
from tests.test_layers import ALL_BN_STATE, trained_bn

C = 256


def constant_bn_output(layer: NoisyBatchNorm, value: float) -> None:
    """Make the inner BN output exactly ``value`` everywhere (weight 0, bias ``value``)."""
    with torch.no_grad():
        layer.bn.weight.zero_()
        layer.bn.bias.fill_(value)


def draws(shape=(64, C, 4, 4), seed=0, **kwargs):
    """The per-element shift ``m`` and scale ``s`` of one training forward, recovered exactly:
    with BN output 0 the layer returns ``m``; with BN output 1 and the same generator state it
    returns ``s + m``."""
    layer = NoisyBatchNorm(shape[1], generator=torch.Generator(), **kwargs).double()
    x = torch.randn(shape, dtype=torch.float64)
    constant_bn_output(layer, 0.0)
    layer.generator.manual_seed(seed)
    m = layer(x).detach()
    constant_bn_output(layer, 1.0)
    layer.generator.manual_seed(seed)
    s = layer(x).detach() - m
    rows = lambda t: t.transpose(0, 1).reshape(shape[1], -1)  # noqa: E731
    return rows(m), rows(s)


def test_noise_statistics_follow_algorithm_1():
    m, s = draws()
    n_mu, n_sigma, r_mu, r_sigma = 0.5, 1.25, 0.1, 0.1
    n = m.shape[1]  # 1024 draws per unit
    # Per unit j, m_ij ~ U(mu_j - r_mu, mu_j + r_mu): range 2 r_mu, spread r_mu / sqrt(3).
    mu_j = (m.amax(1) + m.amin(1)) / 2
    width = m.amax(1) - m.amin(1)
    assert (width <= 2 * r_mu + 1e-12).all() and (width > 2 * r_mu * 0.98).all()
    torch.testing.assert_close(
        m.std(1), torch.full((C,), r_mu / math.sqrt(3), dtype=torch.float64), rtol=0.1, atol=0
    )
    assert (mu_j.abs() <= n_mu + 1e-3).all()
    # mu_j ~ U(-n_mu, n_mu) across the 256 units: mean 0, std n_mu / sqrt(3), fills the range.
    assert abs(float(mu_j.mean())) < 4 * n_mu / math.sqrt(3 * C)
    assert abs(float(mu_j.std()) - n_mu / math.sqrt(3)) < 0.15 * n_mu / math.sqrt(3)
    assert float(mu_j.min()) < -0.9 * n_mu and float(mu_j.max()) > 0.9 * n_mu
    # Per unit j, s_ij ~ N(sigma_j, r_sigma); sigma_j ~ U(1, n_sigma).
    sigma_j = s.mean(1)
    assert (sigma_j > 1 - 4 * r_sigma / math.sqrt(n)).all()
    assert (sigma_j < n_sigma + 4 * r_sigma / math.sqrt(n)).all()
    assert float(sigma_j.min()) < 1.03 and float(sigma_j.max()) > n_sigma - 0.03
    torch.testing.assert_close(
        s.std(1), torch.full((C,), r_sigma, dtype=torch.float64), rtol=0.1, atol=0
    )
    # Gaussian, not uniform: the fraction beyond 2 standard deviations is about 4.55 %.
    z = (s - sigma_j[:, None]) / r_sigma
    assert abs(float((z.abs() > 2).double().mean()) - 0.0455) < 0.005


def test_noise_constants_are_configurable():
    m, s = draws(shape=(32, 64, 4, 4), n_mu=0.0, n_sigma=1.0, r_mu=0.3, r_sigma=0.0)
    torch.testing.assert_close(s, torch.ones_like(s))  # sigma_j = 1 exactly, no spread
    assert float(m.abs().max()) <= 0.3
    assert float((m.amax(1) - m.amin(1)).min()) > 0.55


@pytest.mark.parametrize("shape", [(256, 8), (64, 8, 5), (16, 8, 4, 4), (8, 8, 2, 3, 4)])
def test_every_position_gets_its_own_draw(shape):
    layer = NoisyBatchNorm(8, generator=torch.Generator().manual_seed(0))
    constant_bn_output(layer, 0.0)
    y = layer(torch.randn(shape))
    assert y.shape == shape
    assert y.unique().numel() == y.numel()  # continuous draws: all distinct


def test_eval_mode_is_the_batchnorm_alone():
    layer = NoisyBatchNorm(4)
    with torch.no_grad():
        layer.bn.running_mean.uniform_()
        layer.bn.weight.uniform_()
    ref = nn.BatchNorm2d(4)
    ref.load_state_dict(layer.bn.state_dict())
    x = torch.randn(6, 4, 3, 3)
    layer.eval(), ref.eval()
    state = torch.get_rng_state()
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), state)  # no draws at all in eval


def test_train_mode_output_is_bn_then_noise():
    torch.manual_seed(0)
    layer = NoisyBatchNorm(4, generator=torch.Generator().manual_seed(7)).double()
    x = torch.randn(10, 4, 3, dtype=torch.float64)
    a = nn.functional.batch_norm(x, None, None, layer.bn.weight, layer.bn.bias, True)
    y = layer(x)
    # Same draws as the layer makes: per-unit (2, C) then m and s of x's shape.
    g = torch.Generator().manual_seed(7)
    u = torch.rand(2, 4, generator=g, dtype=torch.float64)
    mu, sigma = u[0] * 1.0 - 0.5, 1 + u[1] * 0.25
    m = torch.empty_like(x).uniform_(-0.1, 0.1, generator=g) + mu[None, :, None]
    s = torch.empty_like(x).normal_(0.0, 0.1, generator=g) + sigma[None, :, None]
    torch.testing.assert_close(y, s * a + m, rtol=1e-12, atol=1e-12)


def test_generator_reproducibility_and_fresh_draws():
    x = torch.randn(8, 4, 3, 3)
    a = NoisyBatchNorm(4, generator=torch.Generator().manual_seed(3))
    b = NoisyBatchNorm(4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not torch.equal(a(x), a(x))  # a new draw every training forward
    state = torch.get_rng_state()
    a(x)
    assert torch.equal(torch.get_rng_state(), state)  # a generator leaves the global RNG alone
    torch.manual_seed(1)
    y1 = NoisyBatchNorm(4)(x)
    torch.manual_seed(1)
    torch.testing.assert_close(NoisyBatchNorm(4)(x), y1, rtol=0, atol=0)


def test_gradients_flow_through_the_noise_scale():
    layer = NoisyBatchNorm(3, generator=torch.Generator()).double()
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    layer.generator.manual_seed(0)
    layer(x).sum().backward()
    # y = s * BN(x) + m: the gradient is BN's backward of s.
    layer.generator.manual_seed(0)
    with torch.no_grad():
        constant_bn_output_copy = NoisyBatchNorm(3, generator=layer.generator).double()
        constant_bn_output(constant_bn_output_copy, 0.0)
        m = constant_bn_output_copy(x)
        layer.generator.manual_seed(0)
        constant_bn_output(constant_bn_output_copy, 1.0)
        s = constant_bn_output_copy(x) - m
    x_ref = x.detach().clone().requires_grad_()
    bn = nn.functional.batch_norm(x_ref, None, None, None, None, True)
    (bn * s).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)


def test_load_from_batchnorm_and_errors():
    bn = trained_bn(momentum=0.3, batches=5)
    layer = NoisyBatchNorm(3)
    got = layer.load_from_batchnorm(bn)
    assert got == ALL_BN_STATE
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(layer.bn.state_dict()[k], v)
    assert (layer.bn.eps, layer.bn.momentum) == (1e-3, 0.3)
    with pytest.raises(ConfigurationError, match="n_sigma"):
        NoisyBatchNorm(3, n_sigma=0.5)
    with pytest.raises(ConfigurationError, match="r_mu"):
        NoisyBatchNorm(3, r_mu=-1)
    with pytest.raises(ConfigurationError, match="generator"):
        NoisyBatchNorm(3, generator=0)
    if torch.cuda.is_available():
        cuda_gen = NoisyBatchNorm(3, generator=torch.Generator(device="cuda"))
        with pytest.raises(ConfigurationError, match="Create it there"):
            cuda_gen(torch.randn(4, 3))


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 4, 4)])
def test_without_affine_eval_is_plain_normalization(shape):
    layer = NoisyBatchNorm(3, affine=False, track_running_stats=False).eval()
    x = torch.randn(shape)
    assert layer.bn.weight is None
    ref = nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=0)
