"""S18 experiments: data modules, variant modules by surgery, runner settings, LightningCLI."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norm.errors import ConfigurationError, UnknownNormError
from lightning_norm.experiments import (
    DLN_VARIANTS,
    VGG_VARIANTS,
    CIFAR10DataModule,
    DigitsDataModule,
    DLNDataModule,
    DLNRegression,
    ReproduceConfig,
    S18Classifier,
    dln_tensors,
)

ROOT = Path(__file__).resolve().parents[1]


def test_digits_split_and_standardization_match_float64_recomputation():
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(batch_size=100, val_fraction=0.2, seed=3)
    dm.setup()
    xtr, ytr = dm.train_set.tensors
    xva, _ = dm.val_set.tensors
    assert xtr.shape == (1797 - 359, 1, 8, 8) and xva.shape == (359, 1, 8, 8)
    raw = load_digits()
    images = np.asarray(raw.images, dtype=np.float64) / 16.0
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(3)).numpy()
    tr = perm[359:]
    mean, std = images[tr].mean(), images[tr].std(ddof=1)
    expect = (images[tr] - mean) / std
    np.testing.assert_allclose(xtr[:, 0].double().numpy(), expect, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ytr.numpy(), raw.target[tr])
    batches = list(dm.train_dataloader())
    assert all(len(b[0]) == 100 for b in batches)  # drop_last: every step the same batch size
    assert len(batches) == (1797 - 359) // 100


def test_digits_upsampling_and_bad_settings():
    dm = DigitsDataModule(size=16)
    dm.setup()
    assert dm.train_set.tensors[0].shape[-2:] == (16, 16)
    with pytest.raises(ConfigurationError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.0)
    with pytest.raises(ConfigurationError, match="at most"):
        DigitsDataModule(batch_size=5000).train_dataloader()


def test_dln_data_is_a_linear_map_of_gaussian_inputs():
    x, y = dln_tensors(num_samples=50, width=4, seed=1)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=g).double()
    x_ref = torch.randn(50, 4, generator=g).double()
    np.testing.assert_allclose(x.double().numpy(), x_ref.numpy())
    np.testing.assert_allclose(y.double().numpy(), (x_ref @ a.T).numpy(), rtol=1e-5, atol=1e-5)
    (batch,) = list(DLNDataModule(num_samples=50, width=4, seed=1).train_dataloader())
    assert batch[0].shape == (50, 4)  # full batch


@pytest.mark.parametrize("variant", VGG_VARIANTS)
def test_every_vgg_variant_is_surgery_of_the_bn_model(variant):
    bn = S18Classifier(norm="batchnorm", width=0.25)
    model = S18Classifier(norm=variant, width=0.25)
    assert (
        model.norm_slots
        == bn.norm_slots
        == ["net.features.1", "net.features.4", "net.features.8", "net.features.11"]
    )
    modules = dict(model.named_modules())
    bns = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if variant == "batchnorm":
        assert bns == model.norm_slots
    else:
        # only a noisy BN may keep a BatchNorm, as its inner child
        assert all(n.rsplit(".", 1)[0] in model.norm_slots for n in bns)
        assert all(type(modules[s]) is not type(bn.net.features[1]) for s in model.norm_slots)
    if variant == "none":
        assert all(isinstance(modules[s], nn.Identity) for s in model.norm_slots)
    # same convolutions (same seed would give the same init; here: same shapes)
    assert [p.shape for n, p in model.named_parameters() if "features.0." in n] == [
        p.shape for n, p in bn.named_parameters() if "features.0." in n
    ]
    model.train()
    out = model(torch.randn(4, 1, 8, 8))
    assert out.shape == (4, 10)


def test_classifier_loss_and_accuracy_match_a_hand_computation():
    torch.manual_seed(0)
    model = S18Classifier(norm="none", width=0.25)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)
    loss = model.training_step((x, y), 0)
    logits = model(x).double()
    ref = -(logits.log_softmax(1)[torch.arange(6), y]).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert logged["train/acc"].item() == pytest.approx((logits.argmax(1) == y).double().mean())
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.1
    assert opt.param_groups[0]["momentum"] == 0


@pytest.mark.parametrize("variant", DLN_VARIANTS)
def test_dln_variants_and_loss(variant):
    torch.manual_seed(0)
    model = DLNRegression(norm=variant, depth=5, width=3)
    assert len(model.linear_layers) == 5 and len(model.norm_slots) == 4
    model.log = lambda *a, **k: None
    x, y = torch.randn(8, 3), torch.randn(8, 3)
    loss = model.training_step((x, y), 0)
    out = model(x).double()
    assert loss.item() == pytest.approx(((out - y.double()) ** 2).sum(1).mean().item(), rel=1e-6)
    if variant == "none":  # no norm: exactly the product of the weight matrices
        prod = torch.eye(3, dtype=torch.float64)
        for name in model.linear_layers:
            w = dict(model.named_modules())[name].weight.detach().double()
            prod = w @ prod
        np.testing.assert_allclose(
            out.detach().numpy(), (x.double() @ prod.T).numpy(), rtol=1e-5, atol=1e-6
        )


def test_module_settings_fail_at_construction():
    with pytest.raises(UnknownNormError):
        S18Classifier(norm="nope")
    with pytest.raises(ConfigurationError, match="arch"):
        S18Classifier(arch="vgg99")
    with pytest.raises(ConfigurationError, match="lr"):
        S18Classifier(lr=0)
    with pytest.raises(ConfigurationError, match="depth"):
        DLNRegression(depth=1)


def test_reproduce_config_defaults_and_errors():
    cfg = ReproduceConfig().resolved()
    assert (cfg.steps, cfg.lr, cfg.variants, cfg.probe_every) == (300, 0.1, VGG_VARIANTS, 12)
    dln = ReproduceConfig(setup="dln").resolved()
    assert (dln.steps, dln.lr, dln.variants, dln.monitor_every) == (1000, 1e-4, DLN_VARIANTS, 5)
    with pytest.raises(ConfigurationError, match="Unknown variant"):
        ReproduceConfig(variants=["batchnorm", "bogus"]).resolved()
    with pytest.raises(ConfigurationError, match="Unknown setup"):
        ReproduceConfig(setup="resnet").resolved()
    with pytest.raises(ConfigurationError, match="steps"):
        ReproduceConfig(steps=0).resolved()
    with pytest.raises(ConfigurationError, match="repeat"):
        ReproduceConfig(variants=["lp1", "lp1"]).resolved()


def test_cifar10_without_torchvision_says_how_to_fix(monkeypatch):
    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    with pytest.raises(ConfigurationError, match="pip install torchvision"):
        CIFAR10DataModule("unused").prepare_data()
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigurationError, match="pip install torchvision"):
        ReproduceConfig(dataset="cifar10").resolved()  # before anything trains


@pytest.mark.parametrize(
    ("script", "config"),
    [
        ("s18_vgg", "s18_vgg.yaml"),
        ("s18_vgg", "s18_vgg_cifar10.yaml"),
        ("s18_dln", "s18_dln.yaml"),
    ],
)
def test_shipped_lightningcli_configs_parse(script, config, monkeypatch, tmp_path):
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.chdir(tmp_path)
    cli = importlib.import_module(script).cli_main(
        [
            "--config",
            str(ROOT / "examples" / "configs" / config),
            "--model.norm",
            "lp1",
            "--trainer.accelerator",
            "cpu",
        ],
        run=False,
    )
    assert cli.model.hparams.norm == "lp1"
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"ActivationMoments", "ICSDrift", "LossLandscape"} <= names
    assert cli.trainer.max_steps > 0
