"""NormSync and the synchronized layers: conversion, revert, and exactness over 2 gloo processes."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from lightning_norm.layers import BatchNorm, LpBatchNorm, NoisyBatchNorm
from lightning_norm.layers.sync import SyncLpBatchNorm, SyncNoisyBatchNorm
from lightning_norm.plugins import NormSync


def mixed_model() -> nn.Module:
    shared = nn.BatchNorm2d(4)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        shared,
        NoisyBatchNorm(4, generator=torch.Generator().manual_seed(0)),
        LpBatchNorm(4, p=1),
        nn.Sequential(shared, LpBatchNorm(4, p=math.inf)),
        nn.Flatten(),
        nn.Linear(4 * 25, 6),
        nn.BatchNorm1d(6),
    )


def test_apply_converts_in_place_and_revert_restores_classes():
    model = mixed_model()
    before = {k: v for k, v in model.state_dict().items()}
    objects = {n: m for n, m in model.named_modules()}
    hook_calls = []
    model[1].register_forward_hook(lambda *a: hook_calls.append(1))
    model[1].qconfig = "kept"  # Lightning's own revert copies this by hand; we keep everything
    plugin = NormSync()
    assert plugin.apply(model) is model
    assert type(model[1]) is nn.SyncBatchNorm and model[4][0] is model[1]  # shared: one module
    assert type(model[2]) is SyncNoisyBatchNorm and type(model[2].bn) is nn.SyncBatchNorm
    assert type(model[3]) is SyncLpBatchNorm and type(model[4][1]) is SyncLpBatchNorm
    assert type(model[7]) is nn.SyncBatchNorm
    assert all(objects[n] is m for n, m in model.named_modules())  # same objects
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in after)
    plugin.apply(model)  # idempotent
    assert type(model[3]) is SyncLpBatchNorm
    model(torch.randn(2, 3, 5, 5))  # no process group: behaves as the unsynchronized layers
    assert hook_calls == [1, 1]  # shared module called twice, hook still attached
    model[2].__dict__["_rank_generator"] = torch.Generator()  # as after a synchronized step
    plugin.revert(model)
    assert "_rank_generator" not in model[2].__dict__
    assert [type(m) for m in model.modules()] == [type(m) for m in mixed_model().modules()]
    assert type(model[2].bn) is BatchNorm and model[1].qconfig == "kept"
    assert not any("process_group" in m.__dict__ for m in model.modules())
    assert all(objects[n] is m for n, m in model.named_modules())


def test_revert_leaves_modules_it_did_not_convert_and_batchnorm_flag():
    model = nn.Sequential(nn.SyncBatchNorm(3), nn.BatchNorm2d(3), LpBatchNorm(3))
    plugin = NormSync(batchnorm=False)
    plugin.apply(model)
    assert [type(m) for m in model] == [nn.SyncBatchNorm, nn.BatchNorm2d, SyncLpBatchNorm]
    NormSync().revert(plugin.apply(model))  # a fresh plugin can revert: the record is on modules
    assert [type(m) for m in model] == [nn.SyncBatchNorm, nn.BatchNorm2d, LpBatchNorm]


def test_user_subclass_of_our_layer_gets_a_synchronized_subclass():
    class MyLp(LpBatchNorm):
        def extra_repr(self):
            return "mine"

    model = nn.Sequential(MyLp(3))
    NormSync().apply(model)
    assert isinstance(model[0], SyncLpBatchNorm) and isinstance(model[0], MyLp)
    assert repr(model[0]).endswith("(mine)\n)") or "mine" in repr(model[0])
    NormSync().revert(model)
    assert type(model[0]) is MyLp


def test_lightnings_torch_sync_batchnorm_keeps_noise_and_lp_behaviour():
    """Trainer(sync_batchnorm=True) converts every _BatchNorm; ours must keep their behaviour."""
    x = torch.randn(8, 4, 5, 5)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            NoisyBatchNorm(4, generator=torch.Generator()),
            LpBatchNorm(4, p=1),
            LpBatchNorm(4, p=math.inf),
        )

    plain, converted = build(), TorchSyncBatchNorm().apply(build())
    assert type(converted[0]) is NoisyBatchNorm and type(converted[0].bn) is nn.SyncBatchNorm
    assert type(converted[1]) is LpBatchNorm  # not a _BatchNorm: left alone
    for model in (plain, converted):
        model[0].generator.manual_seed(1)
    y_plain, y_conv = plain(x), converted(x)
    torch.testing.assert_close(y_conv, y_plain, rtol=0, atol=0)
    bn_only = nn.functional.batch_norm(x, None, None, training=True)
    assert (y_conv[:, :, 0] - plain[1:](bn_only)[:, :, 0]).abs().max() > 0.01  # noise is there
    converted[0].generator.manual_seed(1)
    assert not torch.equal(converted(x), converted(x))  # fresh draws each step
