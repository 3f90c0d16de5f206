"""swap_norms and SwapReport: what is replaced, what is carried over, undo, dry runs, errors."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_norm.errors import (
    ConfigurationError,
    LightningNormError,
    SelectionError,
    SurgeryError,
    UnknownNormError,
)
from lightning_norm.layers import available_norms
from lightning_norm.layers.base import NormLayer
from lightning_norm.models import VGGLike
from lightning_norm.surgery import SwapOptionsError, SwapReport, is_batchnorm, swap_norms


@pytest.fixture
def registry():
    from lightning_norm.layers import registry as real

    return real


def need(registry, *names):
    missing = [n for n in names if n not in registry.available_norms()]
    if missing:
        pytest.skip(f"registry has no {missing} yet")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus a (conv-BN) projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetLike(nn.Module):
    """stem (conv-BN) -> two blocks -> pool -> head (Linear-BatchNorm1d-ReLU-Linear); 7 BNs."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.layers = nn.Sequential(Block(8, 8), Block(8, 16, stride=2))
        self.head = nn.Sequential(
            nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, classes)
        )

    def forward(self, x):
        x = self.layers(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


RESNET_BNS = [
    "stem.1",
    "layers.0.bn1",
    "layers.0.bn2",
    "layers.1.bn1",
    "layers.1.bn2",
    "layers.1.shortcut.1",
    "head.1",
]


def randomize_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN distinct, non-default state so a transfer cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g))
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(c, generator=g))
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                    m.num_batches_tracked.fill_(7)
    return model


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_batchnorm(m)]


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def tensor_named(module: nn.Module, name: str) -> torch.Tensor | None:
    """The module's parameter or buffer whose last name component is ``name`` (a wrapper's
    ``bn.weight`` counts as ``weight``)."""
    for n, t in [*module.named_parameters(), *module.named_buffers()]:
        if n.rsplit(".", 1)[-1] == name:
            return t
    return None


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


#: Every built-in target (the registry's names before any test registers its own).
TARGETS = available_norms()


# ---------------------------------------------------------------------------------------------
# Swaps on whole models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("to", TARGETS)
def test_resnet_swap_every_target(registry, to):
    need(registry, to)
    model = randomize_bn_(ResNetLike())
    old = {n: copy.deepcopy(m) for n, m in model.named_modules() if n in RESNET_BNS}
    # Instance norm has no statistics on (N, C) input, and the automatic group count (16 groups
    # of one channel) makes GroupNorm constant there: leave the head's BatchNorm1d alone.
    exclude = "head.*" if to in ("instancenorm", "groupnorm") else None
    report = swap_norms(model, to, exclude=exclude)

    expected = [n for n in RESNET_BNS if exclude is None or not n.startswith("head.")]
    assert report.replaced_names == expected
    assert len(report) == len(expected)
    if to != "batchnorm":  # which builds torch's BatchNorm2d/1d again: a way back
        assert bn_names(model) == [n for n in RESNET_BNS if n not in expected]
    modules = dict(model.named_modules())
    for record in report:
        new, bn = modules[record.name], old[record.name]
        assert type(new).__name__ == record.new_type
        assert record.old_type == type(bn).__name__ and record.channels == bn.num_features
        # Whatever the replacement calls weight/bias/running_* and reports as transferred holds
        # the BN's values; a per-channel affine weight must have been transferred.
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            t = tensor_named(new, name)
            if name in record.transferred and t is not None:
                assert torch.equal(t, getattr(bn, name)), (record.name, name)
            if name in ("weight", "bias") and t is not None and t.shape == (bn.num_features,):
                assert name in record.transferred, (record.name, name)
        if to != "none":
            assert "eps" in record.transferred
            assert next(m.eps for m in new.modules() if hasattr(m, "eps")) == bn.eps

    model.train()
    out = model(images())
    assert out.shape == (6, 4) and torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    assert torch.isfinite(model(images())).all()


@pytest.mark.parametrize("to", ["groupnorm", "lp1"])
def test_vgg_swap_and_undo_restores_identical_model(registry, to):
    need(registry, to)
    model = randomize_bn_(VGGLike("vgg_tiny", num_classes=4, width=0.5))
    before_state = clone_state(model)
    before_modules = dict(model.named_modules())
    report = swap_norms(model, to)
    assert len(report) == 4 and bn_names(model) == []
    assert report.model is model
    # the swapped model trains: forward/backward in train mode (updates the new layers' state)
    model(images()).logsumexp(1).mean().backward()
    for record in report:
        new = dict(model.named_modules())[record.name]
        old = before_modules[record.name]
        assert torch.equal(tensor_named(new, "weight"), before_state[record.name + ".weight"])
        assert torch.equal(tensor_named(new, "bias"), before_state[record.name + ".bias"])
        assert new is not old

    assert report.undo() is model
    assert_same_state(clone_state(model), before_state)
    after_modules = dict(model.named_modules())
    assert list(after_modules) == list(before_modules)
    assert all(after_modules[n] is m for n, m in before_modules.items())
    with pytest.raises(SurgeryError, match="already undone"):
        report.undo()


def test_batchnorm_target_computes_what_the_original_did(registry):
    """Going BN -> "batchnorm" must not change a single output value, train or eval."""
    model = randomize_bn_(ResNetLike())
    reference = copy.deepcopy(model)
    swap_norms(model, "batchnorm")
    x = images()
    for train in (False, True):
        model.train(train), reference.train(train)
        assert torch.equal(model(x), reference(x))
    # the training forward above updated the running statistics identically
    new_state, ref_state = model.state_dict(), reference.state_dict()
    for name in RESNET_BNS:
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(new_state[f"{name}.{buf}"], ref_state[f"{name}.{buf}"])


def test_frozen_bn_matches_the_float64_formula(registry):
    bn = randomize_bn_(nn.Sequential(nn.BatchNorm2d(5, eps=1e-3)))[0]
    model = nn.Sequential(nn.Identity(), bn)
    report = swap_norms(model, "frozen_bn")
    assert set(report.records[0].transferred) >= {"weight", "bias", "running_mean", "running_var"}
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    expected = torch.empty_like(x)
    w, b = bn.weight.double(), bn.bias.double()
    rm, rv = bn.running_mean.double(), bn.running_var.double()
    for c in range(5):
        expected[:, c] = (x[:, c] - rm[c]) / math.sqrt(rv[c] + 1e-3) * w[c] + b[c]
    for train in (True, False):  # frozen: the same in train mode
        model.train(train)
        got = model(x.float()).double()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lp2_running_scale_from_bn_statistics(registry):
    need(registry, "lp2")
    bn = randomize_bn_(nn.Sequential(nn.BatchNorm2d(3)))[0]
    report = swap_norms(nn.Sequential(bn), "lp2")
    new = report.model[0]
    # RMS of the uncentred activations: E[x^2] = Var[x] + E[x]^2, per channel
    expected = [
        math.sqrt(float(v) + float(m) ** 2)
        for m, v in zip(bn.running_mean, bn.running_var, strict=True)
    ]
    torch.testing.assert_close(
        new.running_scale.double(), torch.tensor(expected, dtype=torch.float64)
    )
    assert torch.equal(new.running_mean, bn.running_mean)


# ---------------------------------------------------------------------------------------------
# Where modules sit: root, shared, nested in our layers, dict keys, SyncBatchNorm, lazy
# ---------------------------------------------------------------------------------------------


def test_root_batchnorm_is_replaced_and_report_holds_the_new_root(registry):
    bn = randomize_bn_(nn.Sequential(nn.BatchNorm2d(8)))[0]
    state = clone_state(bn)
    report = swap_norms(bn, "groupnorm")
    assert report.replaced_names == [""]
    new_root = report.model
    assert new_root is not bn and not is_batchnorm(new_root)
    assert torch.equal(new_root.weight, state["weight"])
    assert "<root>" in str(report)
    assert report.undo() is bn and report.model is bn
    assert_same_state(clone_state(bn), state)


def test_shared_batchnorm_gets_one_shared_replacement(registry):
    bn = randomize_bn_(nn.Sequential(nn.BatchNorm2d(4)))[0]
    shared_parent = nn.Sequential(nn.BatchNorm2d(4))
    model = nn.Module()
    model.a = nn.Sequential(nn.Conv2d(3, 4, 1), bn)
    model.b = nn.Sequential(bn, nn.ReLU())
    model.x = shared_parent  # a shared parent: one slot, two names
    model.y = shared_parent
    report = swap_norms(model, "groupnorm")
    assert len(report) == 2
    by_name = {r.names: r for r in report}
    assert set(by_name) == {("a.1", "b.0"), ("x.0", "y.0")}
    assert model.a[1] is model.b[0] and not is_batchnorm(model.a[1])
    assert model.x[0] is model.y[0] and not is_batchnorm(model.x[0])
    assert torch.equal(model.a[1].weight, bn.weight)
    report.undo()
    assert model.a[1] is bn and model.b[0] is bn
    assert is_batchnorm(model.x[0]) and model.x is model.y


def test_batchnorm_inside_our_own_layer_is_skipped_with_a_reason(registry):
    class Wrapper(NormLayer):  # like noisy BN after sync_batchnorm turned its child into SyncBN
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(x)

    model = nn.Sequential(Wrapper(), nn.BatchNorm2d(4))
    report = swap_norms(model, "groupnorm")
    assert report.replaced_names == ["1"]
    assert [s.name for s in report.skipped] == ["0.bn"]
    assert "lightning_norm layer '0'" in report.skipped[0].reason
    assert isinstance(model[0].bn, nn.BatchNorm2d)


# A BatchNorm1d gets GroupNorm's automatic group count, which warns (tested below).
@pytest.mark.filterwarnings("ignore:GroupNorm replacing a BatchNorm1d:UserWarning")
def test_module_dict_keys_and_a_second_swap(registry):
    model = nn.ModuleDict({"a-b": nn.BatchNorm1d(4), "c": nn.Linear(4, 4)})
    report = swap_norms(model, "groupnorm")
    assert report.replaced_names == ["a-b"]
    assert not is_batchnorm(model["a-b"])
    # a second swap finds no torch BatchNorm left: our layers are not replaced again
    with pytest.warns(UserWarning, match="no BatchNorm"):
        assert len(swap_norms(model, "lp1" if "lp1" in registry.available_norms() else "none")) == 0


def test_sync_batchnorm_is_replaced(registry):
    model = randomize_bn_(nn.SyncBatchNorm.convert_sync_batchnorm(ResNetLike()))
    state = clone_state(model)
    report = swap_norms(model, "batchnorm")
    assert {r.old_type for r in report} == {"SyncBatchNorm"} and len(report) == 7
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    for name in RESNET_BNS:
        new = dict(model.named_modules())[name]
        assert torch.equal(new.running_var, state[name + ".running_var"])
    model.eval()
    assert torch.isfinite(model(images())).all()


def test_lazy_batchnorm_uninitialized_is_refused_and_materialized_is_swapped(registry):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(SurgeryError, match="forward pass"):
        swap_norms(model, "groupnorm")
    assert isinstance(model[1], nn.LazyBatchNorm2d)  # untouched
    model(images())  # materializes (and becomes a BatchNorm2d)
    report = swap_norms(model, "groupnorm")
    assert report.replaced_names == ["1"] and report.records[0].channels == 4


# ---------------------------------------------------------------------------------------------
# What is carried over
# ---------------------------------------------------------------------------------------------


def test_mode_requires_grad_dtype_eps_momentum_are_carried(registry):
    model = nn.Sequential(
        nn.BatchNorm2d(4, eps=1e-3, momentum=0.3),
        nn.BatchNorm2d(4),
        nn.BatchNorm2d(4),
    ).double()
    model[0].eval()
    model[1].weight.requires_grad_(False)
    for p in model[2].parameters():
        p.requires_grad_(False)
    report = swap_norms(model, "batchnorm")
    assert [m.training for m in model] == [False, True, True]
    assert model[0].eps == 1e-3 and model[0].momentum == 0.3
    assert {"eps", "momentum"} <= set(report.records[0].transferred)
    assert [p.requires_grad for p in model[1].parameters()] == [False, True]
    assert [p.requires_grad for p in model[2].parameters()] == [False, False]
    assert {t.dtype for t in model.parameters()} == {torch.float64}
    assert {t.dtype for n, t in model.named_buffers() if "running" in n} == {torch.float64}


@pytest.mark.parametrize("to", ["groupnorm", "noisy_bn"])
def test_all_frozen_source_freezes_the_replacement(registry, to):
    need(registry, to)
    model = nn.Sequential(nn.BatchNorm2d(4))
    model.requires_grad_(False)
    swap_norms(model, to)
    params = list(model.parameters())
    assert params and not any(p.requires_grad for p in params)


def test_device_is_carried(registry):
    model = nn.Sequential(nn.BatchNorm2d(4, device="meta"))
    swap_norms(model, "groupnorm")
    assert {t.device.type for t in model.parameters()} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("to", ["lp1", "noisy_bn", "groupnorm"])
def test_cuda_model_stays_on_cuda(registry, to):
    model = randomize_bn_(ResNetLike()).cuda()
    report = swap_norms(model, to, exclude="head.*")
    assert {t.device.type for t in model.state_dict().values()} == {"cuda"}
    assert len(report) == 6
    assert torch.isfinite(model(images().cuda())).all()


# ---------------------------------------------------------------------------------------------
# include / exclude / dry_run
# ---------------------------------------------------------------------------------------------


# A BatchNorm1d gets GroupNorm's automatic group count, which warns (tested below).
@pytest.mark.filterwarnings("ignore:GroupNorm replacing a BatchNorm1d:UserWarning")
@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(include="layers.*"), RESNET_BNS[1:6]),
        (dict(exclude=["stem.*", "head.*"]), RESNET_BNS[1:6]),
        (dict(include="layers.1.*", exclude="*shortcut*"), RESNET_BNS[3:5]),
        (dict(include=lambda name, m: m.num_features == 16), RESNET_BNS[3:7]),
        (dict(exclude=lambda name, m: isinstance(m, nn.BatchNorm1d)), RESNET_BNS[:6]),
    ],
)
def test_include_exclude(registry, kwargs, expected):
    model = ResNetLike()
    report = swap_norms(model, "groupnorm", **kwargs)
    assert report.replaced_names == expected
    assert bn_names(model) == [n for n in RESNET_BNS if n not in expected]
    assert sorted(s.name for s in report.skipped) == sorted(set(RESNET_BNS) - set(expected))
    assert all(("include" in s.reason) or ("exclude" in s.reason) for s in report.skipped)


def test_shared_module_excluded_under_any_of_its_names(registry):
    bn = nn.BatchNorm2d(4)
    model = nn.Module()
    model.a, model.b = nn.Sequential(bn), nn.Sequential(bn)
    report = swap_norms(model, "groupnorm", exclude="b.*")
    assert len(report) == 0 and model.a[0] is bn and model.b[0] is bn


def test_include_matching_nothing_is_an_error_naming_the_layers(registry):
    model = ResNetLike()
    with pytest.raises(SelectionError, match=r"layers\.0\.bn1"):
        swap_norms(model, "groupnorm", include="features.*")
    with pytest.raises(SelectionError, match="glob"):
        swap_norms(model, "groupnorm", include=3)
    assert bn_names(model) == RESNET_BNS


def test_dry_run_changes_nothing(registry):
    model = randomize_bn_(ResNetLike())
    state, modules = clone_state(model), dict(model.named_modules())
    report = swap_norms(model, "groupnorm", dry_run=True, exclude="head.*")
    assert report.dry_run and len(report) == 6 and report.skipped[0].name == "head.1"
    assert "dry run" in str(report)
    assert_same_state(clone_state(model), state)
    assert all(dict(model.named_modules())[n] is m for n, m in modules.items())
    assert report.undo() is model  # nothing to undo
    real = swap_norms(model, "groupnorm", exclude="head.*")
    assert [r.names for r in real] == [r.names for r in report]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def test_report_table_len_iter_and_plain_data(registry):
    model = ResNetLike()
    report = swap_norms(model, "groupnorm", exclude="head.*")
    assert isinstance(report, SwapReport) and len(report) == 6
    assert [r.name for r in report] == RESNET_BNS[:6]
    text = str(report)
    lines = text.splitlines()
    assert lines[0].startswith("SwapReport: 6 module(s) -> groupnorm")
    assert lines[1].split() == ["name", "old", "new", "channels", "transferred"]
    for name, line in zip(RESNET_BNS[:6], lines[2:8], strict=True):
        cells = line.split()
        assert cells[0] == name and cells[1] == "BatchNorm2d"
        assert cells[3] == str(dict(model.named_modules())[name].num_channels)
        assert "weight" in line and "bias" in line
    assert "Skipped (1):" in text and "head.1: matched by exclude='head.*'" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["target"] == "groupnorm" and len(data["records"]) == 6
    assert data["records"][0]["names"] == ["stem.1"] and data["skipped"][0]["name"] == "head.1"


def test_undo_refuses_when_the_model_changed_since(registry):
    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    report = swap_norms(model, "groupnorm")
    replacement = model[0]
    model[1] = nn.Identity()
    with pytest.raises(SurgeryError, match="changed since"):
        report.undo()
    assert model[0] is replacement  # nothing restored halfway


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def small() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())


def test_unknown_name_lists_the_choices_and_changes_nothing(registry):
    model = small()
    with pytest.raises(UnknownNormError, match="groupnorm") as info:
        swap_norms(model, "groupnrom")
    assert "groupnrom" in str(info.value)
    assert isinstance(info.value, LightningNormError)
    assert isinstance(model[1], nn.BatchNorm2d)
    with pytest.raises(ConfigurationError, match=r"nn\.Module class or a factory"):
        swap_norms(model, 3)


@pytest.mark.parametrize(
    ("compile_", "what"),
    [
        (lambda m: torch.jit.script(m), "TorchScript"),
        (lambda m: torch.jit.trace(m, torch.randn(2, 3, 4, 4)), "traced"),
        (lambda m: torch.fx.symbolic_trace(m), "FX"),
        (lambda m: nn.Sequential(torch.jit.script(m), nn.ReLU()), "inside '0'"),
    ],
)
def test_compiled_models_are_refused(registry, compile_, what):
    model = compile_(small().eval())
    with pytest.raises(SurgeryError, match=what) as info:
        swap_norms(model, "groupnorm")
    assert "first" in str(info.value)


def test_torch_compiled_model_is_refused(registry):
    compiled = torch.compile(small())  # wraps lazily; nothing is compiled until called
    with pytest.raises(SurgeryError, match=r"torch\.compile'd") as info:
        swap_norms(compiled, "groupnorm")
    assert "then compile" in str(info.value)


def test_options_that_do_not_fit_are_reported_and_change_nothing(registry):
    model = nn.Sequential(nn.BatchNorm2d(8), nn.BatchNorm2d(6))
    with pytest.raises(SwapOptionsError, match="'1'") as info:
        swap_norms(model, "groupnorm", num_groups=4)  # 6 channels are not 4 groups
    assert isinstance(info.value, SurgeryError) and isinstance(info.value, ConfigurationError)
    with pytest.raises(SwapOptionsError, match="bogus"):
        swap_norms(model, "groupnorm", bogus=1)
    assert all(isinstance(m, nn.BatchNorm2d) for m in model)


def test_no_batchnorm_warns_and_returns_an_empty_report(registry):
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="no BatchNorm"):
        report = swap_norms(model, "groupnorm")
    assert len(report) == 0 and report.model is model and report.skipped == []


def test_not_a_module_is_refused(registry):
    with pytest.raises(SurgeryError, match=r"nn\.Module"):
        swap_norms([nn.BatchNorm2d(2)], "groupnorm")


# ---------------------------------------------------------------------------------------------
# Classes and factories; the factory's warnings reach the caller
# ---------------------------------------------------------------------------------------------


def test_class_and_factory_targets(registry):
    model = randomize_bn_(nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm1d(6)))
    bn_weight = model[0].weight.detach().clone()

    class Scale(nn.Module):
        def __init__(self, num_channels, factor=2.0):
            super().__init__()
            self.weight = nn.Parameter(torch.full((num_channels,), factor))

        def forward(self, x):
            return x * self.weight.view((1, -1) + (1,) * (x.dim() - 2))

    report = swap_norms(model, Scale, factor=3.0)
    assert [r.new_type for r in report] == ["Scale", "Scale"]
    # the BN's weight replaces the class's default (3.0)
    assert torch.equal(model[0].weight, bn_weight)
    assert report.records[0].transferred == ("weight",)

    seen = []

    def factory(num_channels, *, source, tag):
        seen.append((num_channels, type(source).__name__, tag))
        warnings.warn(f"degenerate for {num_channels} channels", UserWarning, stacklevel=2)
        return nn.Identity()

    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm1d(6))
    with pytest.warns(UserWarning, match="degenerate") as caught:
        report = swap_norms(model, factory, tag="t")
    assert [str(w.message) for w in caught] == [f"degenerate for {c} channels" for c in (4, 6)]
    assert seen == [(4, "BatchNorm2d", "t"), (6, "BatchNorm1d", "t")]
    assert report.target.endswith("factory") and "0x" not in report.target


def test_groupnorm_degenerate_case_surfaces(registry):
    """One channel per group on (N, C) input: the swap warns, the groupnorm layer refuses it."""
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    # automatic choice: gcd(2, 32) = 2 groups of one channel
    with pytest.warns(UserWarning, match=r"gcd\(2, 32\) = 2 leaves one channel per group"):
        swap_norms(model, "groupnorm")
    with pytest.raises(ConfigurationError, match="num_groups"):
        model(torch.randn(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit count, or two channels per group: silent
        swap_norms(
            model := nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), "groupnorm", num_groups=1
        )
        swap_norms(nn.Sequential(nn.Linear(3, 64), nn.BatchNorm1d(64)), "groupnorm")
        swap_norms(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)), "groupnorm")
    assert torch.isfinite(model(torch.randn(4, 3))).all()
