"""lightning_norm.layers: every layer against a float64 hand computation of its formula."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_norm.errors import ConfigurationError
from lightning_norm.layers import (
    BatchNorm,
    FrozenBatchNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNormChannelsFirst,
    LpBatchNorm,
    NormLayer,
)

SHAPES = [(6, 4), (5, 4, 7), (3, 4, 5, 6), (2, 4, 3, 4, 5)]
P_VALUES = [1, 2, math.inf]


def per_channel(x: torch.Tensor) -> torch.Tensor:
    """``(C, n)``: every value of each channel (batch and positions) in one row."""
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def randomize_affine(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias"):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor):
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))


#: What a layer that keeps everything of a BatchNorm reports from ``load_from_batchnorm``.
ALL_BN_STATE = [
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "eps",
    "momentum",
]


def trained_bn(momentum: float, batches: int, eps: float = 1e-3) -> nn.BatchNorm2d:
    """A 3-channel BatchNorm2d with non-default settings, affine values and running stats."""
    bn = nn.BatchNorm2d(3, eps=eps, momentum=momentum)
    randomize_affine(bn)
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([1.5, 0.2, 3.0]))
    bn.num_batches_tracked.fill_(batches)
    return bn


def data(shape, seed=0, shift=0.7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + shift).requires_grad_()


# --- hand references (float64, written from the formulas, no torch norm ops) -----------------


def ref_lp(x, p, w, b, eps, mu=None, scale=None):
    rows = per_channel(x.detach())
    if mu is None:
        mu = rows.mean(1)
        inf = p == math.inf
        scale = rows.abs().amax(1) if inf else (rows.abs() ** p).mean(1) ** (1 / p)
    y = (x.detach() - bcast(mu, x)) / (bcast(scale, x) + eps)
    if w is not None:
        y = y * bcast(w.detach(), x) + bcast(b.detach(), x)
    return y, mu, scale


def ref_bn(x, w, b, eps, mean=None, var=None):
    rows = per_channel(x.detach())
    if mean is None:
        mean, var = rows.mean(1), ((rows - rows.mean(1, keepdim=True)) ** 2).mean(1)
    y = (x.detach() - bcast(mean, x)) / torch.sqrt(bcast(var, x) + eps)
    if w is not None:
        y = y * bcast(w.detach(), x) + bcast(b.detach(), x)
    return y


def ref_norm_over(x, groups_of, w, b, eps):
    """Normalize each slice ``x[idx]`` for idx from ``groups_of(x)`` over its own values."""
    xd = x.detach()
    y = torch.empty_like(xd)
    for idx in groups_of(xd):
        v = xd[idx]
        y[idx] = (v - v.mean()) / torch.sqrt(((v - v.mean()) ** 2).mean() + eps)
    if w is not None:
        y = y * bcast(w.detach(), x) + bcast(b.detach(), x)
    return y


def assert_matches_reference(layer: nn.Module, x: torch.Tensor, groups_of) -> None:
    """``layer`` (affine values randomized) against ``ref_norm_over``, in train and eval mode."""
    randomize_affine(layer)
    expected = ref_norm_over(x, groups_of, layer.weight, layer.bias, 1e-5)
    for mode in (True, False):
        torch.testing.assert_close(layer.train(mode)(x), expected, rtol=1e-10, atol=1e-10)


# --- BatchNorm and FrozenBatchNorm -----------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_any_rank_train_and_eval(shape, affine):
    bn = BatchNorm(4, affine=affine, momentum=0.25).double()
    randomize_affine(bn)
    x = data(shape)
    w, b = bn.weight, bn.bias
    torch.testing.assert_close(bn(x), ref_bn(x, w, b, 1e-5), rtol=1e-10, atol=1e-10)
    rows = per_channel(x.detach())
    n = rows.shape[1]
    unbiased = rows.var(1, unbiased=True) if n > 1 else torch.ones(4)
    torch.testing.assert_close(bn.running_mean, 0.25 * rows.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, 0.75 + 0.25 * unbiased, rtol=1e-12, atol=1e-12)
    bn.eval()
    y = bn(x)
    torch.testing.assert_close(y, ref_bn(x, w, b, 1e-5, bn.running_mean, bn.running_var))
    assert isinstance(bn, NormLayer)


def test_batchnorm_rejects_bad_input():
    with pytest.raises(ConfigurationError, match="channels"):
        BatchNorm(4)(torch.randn(3, 5, 2))
    with pytest.raises(ConfigurationError, match="expects"):
        BatchNorm(4)(torch.randn(4))
    with pytest.raises(ConfigurationError, match="num_channels"):
        BatchNorm(0)


@pytest.mark.parametrize("shape", SHAPES)
def test_frozen_batchnorm_uses_fixed_buffers(shape):
    src = nn.BatchNorm1d(4).double()
    randomize_affine(src)
    src.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    src.running_var.copy_(torch.tensor([1.5, 0.2, 3.0, 1.0]))
    frozen = FrozenBatchNorm(4).double()
    assert frozen.load_from_batchnorm(src) == [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "eps",
    ]
    x = data(shape)
    expected = ref_bn(x, src.weight, src.bias, 1e-5, src.running_mean, src.running_var)
    for mode in (True, False):
        frozen.train(mode)
        torch.testing.assert_close(frozen(x), expected, rtol=1e-12, atol=1e-12)
    assert not list(frozen.parameters())
    torch.testing.assert_close(frozen.running_mean, src.running_mean)  # unchanged by training


# --- LpBatchNorm -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("affine", [True, False])
def test_lp_batchnorm_matches_formula(shape, p, affine):
    layer = LpBatchNorm(4, p=p, affine=affine, momentum=0.3).double()
    randomize_affine(layer)
    x = data(shape)
    expected, mu, scale = ref_lp(x, p, layer.weight, layer.bias, 1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    # running estimates: EMA from (0, 1) with momentum 0.3, no bias correction
    torch.testing.assert_close(layer.running_mean, 0.3 * mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_scale, 0.7 + 0.3 * scale, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == 1
    layer.eval()
    x2 = data(shape, seed=5)
    expected_eval, _, _ = ref_lp(
        x2, p, layer.weight, layer.bias, 1e-5, layer.running_mean, layer.running_scale
    )
    torch.testing.assert_close(layer(x2), expected_eval, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES[1:3])
@pytest.mark.parametrize("p", P_VALUES)
def test_lp_batchnorm_gradients_match_autograd_of_formula(shape, p):
    layer = LpBatchNorm(4, p=p).double()
    randomize_affine(layer)
    x = data(shape)
    grad_out = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layer(x).backward(grad_out)
    # The formula written with plain differentiable ops, independent of the layer's code.
    x_ref = x.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    rows = x_ref.transpose(0, 1).reshape(4, -1)
    mu = rows.mean(1)
    scale = rows.abs().amax(1) if p == math.inf else (rows.abs() ** p).mean(1) ** (1 / p)
    y = (x_ref - bcast(mu, x_ref)) / (bcast(scale, x_ref) + 1e-5) * bcast(w, x_ref)
    (y + bcast(b, x_ref)).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, b.grad, rtol=1e-9, atol=1e-10)


def test_lp_batchnorm_fused_and_plain_paths_agree_and_double_backward():
    torch.manual_seed(0)
    for p in P_VALUES:
        fused = LpBatchNorm(3, p=p).double()
        plain = LpBatchNorm(3, p=p).double()
        plain.fused = False
        x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
        g1 = torch.autograd.grad(fused(x).pow(2).sum(), x, create_graph=True)[0]
        g2 = torch.autograd.grad(plain(x).pow(2).sum(), x, create_graph=True)[0]
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
        if p != math.inf:  # second derivatives (Hessian-vector products) through the fused path
            v = torch.randn_like(x)
            h1 = torch.autograd.grad((g1 * v).sum(), x)[0]
            h2 = torch.autograd.grad((g2 * v).sum(), x)[0]
            torch.testing.assert_close(h1, h2, rtol=1e-8, atol=1e-10)


def test_lp_batchnorm_cumulative_average_and_no_running_stats():
    layer = LpBatchNorm(2, p=1, momentum=None).double()
    xs = [data((8, 2), seed=s) for s in range(3)]
    mus = []
    for x in xs:
        layer(x)
        mus.append(per_channel(x.detach()).mean(1))
    torch.testing.assert_close(layer.running_mean, torch.stack(mus).mean(0), rtol=1e-12, atol=0)
    free = LpBatchNorm(2, p=2, track_running_stats=False).double().eval()
    x = data((8, 2))
    torch.testing.assert_close(free(x), ref_lp(x, 2, free.weight, free.bias, 1e-5)[0])
    assert free.running_mean is None


def test_lp_batchnorm_p_parsing_and_errors():
    assert LpBatchNorm(3, p="inf").p == math.inf
    assert LpBatchNorm(3, p=float("inf")).p == math.inf
    assert LpBatchNorm(3, p=1).p == 1.0
    for bad in (3, 0.5, "two", None, True):
        with pytest.raises(ConfigurationError, match="1, 2 or inf"):
            LpBatchNorm(3, p=bad)
    with pytest.raises(ConfigurationError, match="more than one value"):
        LpBatchNorm(3)(torch.randn(1, 3))


def test_lp_batchnorm_load_from_batchnorm():
    bn = trained_bn(momentum=0.2, batches=7)
    lp2 = LpBatchNorm(3, p=2)
    got = lp2.load_from_batchnorm(bn)
    assert got == ALL_BN_STATE
    torch.testing.assert_close(lp2.weight, bn.weight)
    torch.testing.assert_close(lp2.running_scale, torch.sqrt(bn.running_var + bn.running_mean**2))
    assert (lp2.eps, lp2.momentum, int(lp2.num_batches_tracked)) == (1e-3, 0.2, 7)
    lp1 = LpBatchNorm(3, p=1)
    assert "running_var" not in lp1.load_from_batchnorm(bn)
    torch.testing.assert_close(lp1.running_scale, torch.ones(3))
    with pytest.raises(ConfigurationError, match="channels"):
        LpBatchNorm(4).load_from_batchnorm(bn)


def test_lp_batchnorm_half_precision_statistics_do_not_overflow():
    layer = LpBatchNorm(2, p=2)
    x = torch.full((64, 2, 32, 32), 100.0)  # sum x^2 = 6.5e8 overflows float16
    x[:, :, 0, 0] = -100.0
    ref, _, _ = ref_lp(x.double(), 2, layer.weight.double(), layer.bias.double(), 1e-5)
    y = layer.half()(x.half())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)


# --- LayerNorm, channels-first LayerNorm, GroupNorm, InstanceNorm ------------------------------


def samples(x):
    return [(n,) for n in range(x.shape[0])]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_per_sample_over_all_dims(shape, affine):
    assert_matches_reference(LayerNorm(4, affine=affine).double(), data(shape), samples)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_channels_first_per_position(shape, affine):
    layer = LayerNormChannelsFirst(4, affine=affine).double()
    x = data(shape)

    def positions(xd):
        import itertools

        for n in range(xd.shape[0]):
            for pos in itertools.product(*[range(s) for s in xd.shape[2:]]):
                yield (n, slice(None), *pos)

    assert_matches_reference(layer, x, positions)
    if x.dim() == 2 and affine:
        ln = nn.LayerNorm(4).double()
        ln.load_state_dict(layer.state_dict())
        torch.testing.assert_close(layer(x), ln(x))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("groups", [1, 2, None])
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm_per_sample_per_group(shape, groups, affine):
    c = 4
    layer = GroupNorm(c, num_groups=groups, affine=affine).double()
    g = layer.num_groups
    assert g == (groups or math.gcd(c, 32))
    x = data(shape)
    per = c // g

    def sample_groups(xd):
        return [(n, slice(k * per, (k + 1) * per)) for n in range(xd.shape[0]) for k in range(g)]

    if per * math.prod(shape[2:]) == 1:
        with pytest.raises(ConfigurationError, match="single value per sample"):
            layer(x)
        return
    assert_matches_reference(layer, x, sample_groups)


def test_groupnorm_group_choice_and_errors():
    assert GroupNorm(64).num_groups == 32
    assert GroupNorm(48).num_groups == 16
    assert GroupNorm(3).num_groups == 1
    with pytest.raises(ConfigurationError, match="divisor"):
        GroupNorm(6, num_groups=4)


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("affine", [True, False])
def test_instancenorm_per_sample_and_channel(shape, affine):
    layer = InstanceNorm(4, affine=affine).double()
    x = data(shape)

    def cells(xd):
        return [(n, c) for n in range(xd.shape[0]) for c in range(xd.shape[1])]

    assert_matches_reference(layer, x, cells)


def test_instancenorm_refuses_features_without_positions():
    with pytest.raises(ConfigurationError, match=r"\(N, C\) input"):
        InstanceNorm(4)(torch.randn(8, 4))


def test_degenerate_layernorms_refuse():
    with pytest.raises(ConfigurationError, match="single value"):
        LayerNorm(1)(torch.randn(8, 1))
    with pytest.raises(ConfigurationError, match="one channel"):
        LayerNormChannelsFirst(1)(torch.randn(8, 1, 3))


@pytest.mark.parametrize("cls", [LayerNorm, LayerNormChannelsFirst, GroupNorm, InstanceNorm])
def test_affine_layers_load_from_batchnorm(cls):
    bn = nn.BatchNorm2d(4)
    randomize_affine(bn)
    layer = cls(4)
    assert layer.load_from_batchnorm(bn) == ["weight", "bias"]
    torch.testing.assert_close(layer.weight, bn.weight)
    torch.testing.assert_close(layer.bias, bn.bias)
    assert cls(4, affine=False).load_from_batchnorm(bn) == []


def test_lp_inf_gradient_is_shared_among_tied_maxima():
    x = data((3, 2, 4, 4)).detach()
    x[0, 0, 0, 0], x[0, 0, 1, 1], x[2, 0, 3, 2] = 9.0, -9.0, 9.0  # three ties, two in one row
    x[1, 1, 2, 2] = -9.0
    x = x.requires_grad_()
    layer = LpBatchNorm(2, p=math.inf).double()
    grad_out = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    layer(x).backward(grad_out)
    x_ref = x.detach().clone().requires_grad_()
    rows = x_ref.transpose(0, 1).reshape(2, -1)
    mu, scale = rows.mean(1), rows.abs().amax(1)  # amax shares the gradient among ties
    ((x_ref - bcast(mu, x_ref)) / (bcast(scale, x_ref) + 1e-5)).backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
