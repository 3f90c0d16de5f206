"""The normalization registry: create_norm, register_norm, available_norms."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from lightning_norm.errors import ConfigurationError, LightningNormError, UnknownNormError
from lightning_norm.layers import (
    BatchNorm,
    FrozenBatchNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNormChannelsFirst,
    LpBatchNorm,
    NoisyBatchNorm,
    available_norms,
    create_norm,
    register_norm,
    registry,
    resolve_norm,
)

REQUIRED = [
    "noisy_bn",
    "lp1",
    "lp2",
    "lpinf",
    "layernorm",
    "layernorm_cf",
    "groupnorm",
    "instancenorm",
    "frozen_bn",
    "batchnorm",
    "none",
]


@pytest.fixture
def clean_registry():
    saved = dict(registry._REGISTRY), dict(registry._NAMES)
    yield
    registry._REGISTRY.clear(), registry._NAMES.clear()
    registry._REGISTRY.update(saved[0]), registry._NAMES.update(saved[1])


def test_required_names_build_the_right_layers():
    assert set(REQUIRED) <= set(available_norms())
    expected = {
        "noisy_bn": NoisyBatchNorm,
        "lp1": LpBatchNorm,
        "lp2": LpBatchNorm,
        "lpinf": LpBatchNorm,
        "layernorm": LayerNorm,
        "layernorm_cf": LayerNormChannelsFirst,
        "groupnorm": GroupNorm,
        "instancenorm": InstanceNorm,
        "frozen_bn": FrozenBatchNorm,
        "batchnorm": BatchNorm,
        "none": nn.Identity,
    }
    for name, cls in expected.items():
        layer = create_norm(name, 8)
        assert type(layer) is cls, name
    assert [create_norm(n, 8).p for n in ("lp1", "lp2", "lpinf")] == [1.0, 2.0, math.inf]


def test_names_ignore_case_dashes_and_underscores():
    assert isinstance(create_norm("Noisy-BN", 4), NoisyBatchNorm)
    assert isinstance(create_norm("LP_INF", 4), LpBatchNorm)
    assert isinstance(create_norm("layer_norm_cf", 4), LayerNormChannelsFirst)


def test_unknown_name_lists_choices():
    with pytest.raises(UnknownNormError) as err:
        create_norm("weightnorm", 4)
    for name in REQUIRED:
        assert name in str(err.value)
    assert isinstance(err.value, LightningNormError) and isinstance(err.value, KeyError)


def test_resolve_norm_finds_the_factory_without_building():
    assert resolve_norm("Noisy-BN") is resolve_norm("noisy_bn")
    assert resolve_norm(GroupNorm) is GroupNorm
    factory = functools.partial(GroupNorm, num_groups=2)
    assert resolve_norm(factory) is factory
    with pytest.raises(UnknownNormError, match="groupnorm"):
        resolve_norm("weightnorm")
    with pytest.raises(ConfigurationError, match=r"nn\.Module class or a factory"):
        resolve_norm(3)


def test_signature_lookup_is_cached_per_factory():
    facts = registry._cached_signature_facts
    create_norm("groupnorm", 8)
    before = facts.cache_info()
    for _ in range(3):
        create_norm("groupnorm", 8)
    after = facts.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (3, 0)

    # an unhashable callable still works, just without the cache
    class Unhashable:
        __hash__ = None

        def __call__(self, num_channels, *, eps=1e-5, source=None):
            return nn.GroupNorm(1, num_channels, eps=eps)

    assert create_norm(Unhashable(), 4, eps=1e-3).eps == 1e-3


def test_options_are_checked_before_building():
    with pytest.raises(ConfigurationError, match="num_groups") as err:
        create_norm("lp1", 4, num_groups=2)
    assert "eps, momentum, affine, track_running_stats" in str(err.value)
    with pytest.raises(ConfigurationError, match="accepts: no options"):
        create_norm("none", 4, eps=1e-3)
    with pytest.raises(ConfigurationError, match="p"):  # p is fixed by the name
        create_norm("lp2", 4, p=1)
    assert create_norm("lp", 4, p="inf").p == math.inf
    gn = create_norm("groupnorm", 8, num_groups=2, eps=1e-3)
    assert (gn.num_groups, gn.eps) == (2, 1e-3)
    noisy = create_norm("noisy_bn", 4, n_mu=0.1, r_sigma=0.0)
    assert (noisy.n_mu, noisy.r_sigma) == (0.1, 0.0)


def test_source_supplies_defaults_and_rank():
    src = nn.BatchNorm2d(6, eps=1e-3, momentum=0.05, affine=False)
    lp = create_norm("lp1", 6, source=src)
    assert (lp.eps, lp.momentum, lp.affine) == (1e-3, 0.05, False)
    assert create_norm("lp1", 6, source=src, eps=0.5).eps == 0.5  # explicit options win
    noisy = create_norm("noisy_bn", 6, source=src)
    assert (noisy.bn.eps, noisy.bn.momentum, noisy.bn.affine) == (1e-3, 0.05, False)
    assert type(create_norm("batchnorm", 6, source=src)) is nn.BatchNorm2d
    assert type(create_norm("batchnorm", 6, source=nn.BatchNorm3d(6))) is nn.BatchNorm3d
    assert type(create_norm("batchnorm", 6, source=nn.BatchNorm1d(6))) is nn.BatchNorm1d
    # back from one of ours: rank unknown, the rank-agnostic BatchNorm with the inner BN's eps
    back = create_norm("batchnorm", 6, source=noisy)
    assert type(back) is BatchNorm and back.eps == 1e-3
    assert type(create_norm("instancenorm", 6, source=src)) is nn.InstanceNorm2d
    assert type(create_norm("instancenorm", 6, source=nn.BatchNorm3d(6))) is nn.InstanceNorm3d
    assert type(create_norm("instancenorm", 6, source=nn.BatchNorm1d(6))) is InstanceNorm
    assert create_norm("instancenorm", 6, source=nn.BatchNorm2d(6)).affine is True
    assert create_norm("layernorm", 6, source=src).affine is False


def test_class_and_factory_targets():
    gn = create_norm(GroupNorm, 8, num_groups=4)
    assert isinstance(gn, GroupNorm) and gn.num_groups == 4
    bn = create_norm(nn.BatchNorm2d, 8, momentum=0.5)
    assert isinstance(bn, nn.BatchNorm2d) and bn.momentum == 0.5
    made = create_norm(functools.partial(nn.GroupNorm, 2), 8)  # partial: (num_channels, ...)
    assert isinstance(made, nn.GroupNorm) and made.num_channels == 8
    seen = {}

    def factory(num_channels, scale=1.0, source=None):
        seen["source"] = source
        return nn.Identity()

    src = nn.BatchNorm2d(8)
    create_norm(factory, 8, source=src, scale=2.0)
    assert seen["source"] is src
    with pytest.raises(ConfigurationError, match="scale"):
        create_norm(factory, 8, shift=1.0)
    with pytest.raises(ConfigurationError, match=r"not an nn\.Module"):
        create_norm(lambda c: 3, 8)
    with pytest.raises(ConfigurationError, match="registered name"):
        create_norm(3, 8)


def test_register_norm_decorator_duplicates_and_overwrite(clean_registry):
    @register_norm("My_Norm")
    def my_norm(num_channels, eps=1e-6):
        return nn.GroupNorm(1, num_channels, eps=eps)

    assert "My_Norm" in available_norms()
    assert create_norm("my-norm", 4, eps=0.1).eps == 0.1
    with pytest.raises(ConfigurationError, match="already registered"):
        register_norm("mynorm", nn.Identity)
    register_norm("mynorm", LayerNorm, overwrite=True)
    assert isinstance(create_norm("my_norm", 4), LayerNorm)
    with pytest.raises(ConfigurationError, match="callable"):
        register_norm("broken", 3)
    with pytest.raises(ConfigurationError, match="non-empty"):
        register_norm("", nn.Identity)


@pytest.mark.parametrize("name", REQUIRED)
def test_every_registered_layer_runs_forward_backward(name):
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    layer = create_norm(name, 8, source=nn.BatchNorm2d(8))
    y = layer(x)
    assert y.shape == x.shape
    if y.requires_grad:
        y.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    layer.eval()
    assert layer(x).shape == x.shape
