"""ICSDrift and the ICS core against a brute-force float64 computation on separate model copies."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_norm.callbacks.ics_drift import ICSDrift
from lightning_norm.errors import ConfigurationError, SelectionError
from lightning_norm.probes.ics import drift_stats, ics_drift, record_forward_order
from lightning_norm.probes.replay import RngState, StepReplay
from lightning_norm.selection import LayerSelection
from tests.helpers import Classifier, MemoryLogger, cpu_trainer, small_convnet


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 8 * 8, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(16, 12),
        nn.Tanh(),
        nn.Linear(12, 4),
    )


class Witness(Callback):
    """Records what a brute-force computation needs: batch, RNG state, W^t and W^{t+1}.

    Listed before ICSDrift, draws no random numbers.
    """

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.current = {
            "step": trainer.global_step,
            "batch": [t.clone() for t in batch],
            "rng": torch.get_rng_state(),
            "before": copy.deepcopy(pl_module.net.state_dict()),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.current["after"] = copy.deepcopy(pl_module.net.state_dict())
        self.steps.append(self.current)


def brute_force_ics(net: nn.Module, rec: dict, layer: int, lr: float | None = None):
    """ICS of ``net[layer]`` by hand: two float64 copies, plain ``backward``.

    Preceding = every module of the Sequential with a smaller index (BN parameters included).
    """
    x, y = (t.double() if t.is_floating_point() else t for t in rec["batch"])
    grads = []
    for mixed in (False, True):
        m = copy.deepcopy(net).double()
        state = {k: v.clone() for k, v in rec["before"].items()}
        if mixed:
            for k, v in rec["after"].items():
                idx = int(k.split(".")[0])
                if idx < layer and not k.endswith(("running_mean", "running_var", "tracked")):
                    state[k] = v.clone()
        m.load_state_dict(state)
        m.train()
        torch.set_rng_state(rec["rng"])
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m[layer].parameters()]))
        if not mixed and lr is not None:  # plain SGD: W^{t+1} = W^t - lr * G, checked by hand
            for k, p in m.named_parameters():
                expected = rec["before"][k] - lr * p.grad
                torch.testing.assert_close(rec["after"][k], expected, rtol=1e-12, atol=1e-14)
    g, gp = grads
    l2 = (g - gp).norm().item()
    cos = (g @ gp).item() / (g.norm().item() * gp.norm().item())
    return l2, cos, l2 / g.norm().item()


def run_fit(
    net, optimizer, lr, momentum=0.0, steps=3, callbacks=(), logger=False, weight_decay=0.0, **kw
):
    torch.manual_seed(0)
    model = Classifier(
        net, lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay
    )
    trainer = cpu_trainer(
        max_steps=steps,
        precision="64-true",
        callbacks=list(callbacks),
        logger=logger,
        log_every_n_steps=1,
        **kw,
    )
    trainer.fit(model)
    return model, trainer


CASES = [
    ("mlp", "sgd", 0.5, 0.0, {}),
    ("mlp", "sgd", 0.2, 0.9, {}),
    ("mlp", "adam", 0.05, 0.0, {}),
    ("conv", "sgd", 0.5, 0.0, {}),
    ("conv", "sgd", 0.2, 0.9, {}),
    ("conv", "adam", 0.05, 0.0, {}),
    # AdamW with weight decay and clipping: W^{t+1} is whatever the Trainer applied; G is the
    # raw (unclipped) loss gradient in both the callback and the brute force
    ("mlp", "adamw", 0.05, 0.0, dict(gradient_clip_val=0.05, weight_decay=0.1)),
]


@pytest.mark.parametrize(("arch", "optimizer", "lr", "momentum", "extra"), CASES)
def test_logged_drift_matches_brute_force(arch, optimizer, lr, momentum, extra):
    torch.manual_seed(1)
    net = mlp() if arch == "mlp" else small_convnet(bn=True)  # both: BN and dropout
    init = copy.deepcopy(net)
    layers = [1, 5, 7] if arch == "mlp" else [0, 4, 9]
    witness, rec = Witness(), MemoryLogger()
    ics = ICSDrift(layers=[f"net.{i}" for i in layers], relative=True)
    run_fit(net, optimizer, lr, momentum, steps=2, callbacks=[witness, ics], logger=rec, **extra)
    logged = {step: m for step, m in rec.rows if any(k.startswith("ics/") for k in m)}
    assert sorted(logged) == [0, 1]
    nontrivial = 0
    for step_rec in witness.steps:
        metrics = logged[step_rec["step"]]
        for i in layers:
            sgd_lr = lr if optimizer == "sgd" and momentum == 0 else None
            l2, cos, rel = brute_force_ics(init, step_rec, i, lr=sgd_lr)
            name = f"ics/net.{i}"
            assert metrics[f"{name}/l2"] == pytest.approx(l2, rel=1e-6, abs=1e-12)
            assert metrics[f"{name}/cosine"] == pytest.approx(cos, rel=1e-6)
            assert metrics[f"{name}/relative"] == pytest.approx(rel, rel=1e-6, abs=1e-12)
            nontrivial += l2 > 1e-3
    # the first layer has nothing before it; the later ones really drift
    assert all(logged[s][f"ics/net.{layers[0]}/l2"] == 0.0 for s in logged)
    assert nontrivial >= len(witness.steps) * (len(layers) - 1) - 1


def _params_buffers_opt(model, trainer):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = trainer.optimizers[0].state_dict()["state"]
    return state, opt


def test_seeded_fit_is_bit_identical_with_and_without_the_callback():
    results = []
    for callbacks in ([], [ICSDrift(every_n_steps=2)]):
        torch.manual_seed(3)
        net = small_convnet(bn=True)  # BN running stats and dropout masks
        rec = MemoryLogger()
        torch.manual_seed(0)
        model = Classifier(net, lr=0.1, optimizer="adam")
        trainer = cpu_trainer(max_steps=5, callbacks=callbacks, logger=rec, log_every_n_steps=1)
        trainer.fit(model)
        state, opt = _params_buffers_opt(model, trainer)
        after = torch.rand(3)  # the global RNG stream continues identically
        losses = [m["train_loss"] for _, m in rec.rows if "train_loss" in m]
        ics_keys = {k for _, m in rec.rows for k in m if k.startswith("ics/")}
        results.append((state, opt, after, losses, ics_keys, trainer.callback_metrics))
    (s0, o0, r0, l0, k0, c0), (s1, o1, r1, l1, k1, c1) = results
    assert s0.keys() == s1.keys()
    for k in s0:  # parameters, running stats, num_batches_tracked
        assert torch.equal(s0[k], s1[k]), k
    for idx in o0:
        for k in o0[idx]:
            assert torch.equal(torch.as_tensor(o0[idx][k]), torch.as_tensor(o1[idx][k]))
    assert torch.equal(r0, r1)
    assert l0 == l1 and len(l0) == 5
    assert not k0 and {"ics/net.0/l2", "ics/net.9/cosine"} <= k1
    assert set(c0) == set(c1)  # no probe value in callback_metrics


def test_core_on_a_plain_model_with_shared_and_container_parameters():
    """Order is by first forward call; a container's own parameter precedes its children."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
            self.b = nn.Linear(4, 4).double()  # registered first, runs second
            self.a = nn.Linear(4, 4).double()

        def forward(self, x):
            h = torch.tanh(self.a(x * self.scale))
            h = torch.tanh(self.b(h))
            return self.a(h)  # `a` runs again: its first call decides its position

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(8, 4, dtype=torch.float64)

    def loss_fn(m):
        return (m(x) ** 2).mean()

    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    rng = RngState.capture()
    loss_fn(net).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.3 * p.grad
    result = ics_drift(StepReplay(net, loss_fn, rng_state=rng), before, ["a", "b"])
    assert result.order == ["", "a", "b"]

    def grad_at(values, layer):
        m = copy.deepcopy(net)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(values[n])
                p.grad = None
        loss_fn(m).backward()
        sub = getattr(m, layer)
        return torch.cat([sub.weight.grad.reshape(-1), sub.bias.grad.reshape(-1)])

    after = {n: p.detach().clone() for n, p in net.named_parameters()}
    # a: only the root's `scale` precedes it; b: `scale` and `a`
    for layer, preceding in (("a", ["scale"]), ("b", ["scale", "a.weight", "a.bias"])):
        mixed = {n: after[n] if n in preceding else before[n] for n in before}
        g, gp = grad_at(before, layer), grad_at(mixed, layer)
        drift = result.layers[layer]
        assert drift.l2.item() == pytest.approx((g - gp).norm().item(), rel=1e-9)
        cos = (g @ gp).item() / (g.norm() * gp.norm()).item()
        assert drift.cosine.item() == pytest.approx(cos, rel=1e-9)
        assert drift.replays == 1
    assert torch.equal(net.scale, after["scale"])  # the probe left W^{t+1} in place


def test_drift_stats_and_forward_order():
    l2, cos, rel, norm = drift_stats([torch.tensor([3.0, 0.0])], [torch.tensor([0.0, 4.0])])
    assert (l2.item(), cos.item(), rel.item(), norm.item()) == (5.0, 0.0, 5.0 / 3.0, 3.0)
    _, cos, rel, _ = drift_stats([torch.zeros(2)], [torch.ones(2)])
    assert math.isnan(cos.item()) and math.isnan(rel.item())
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with record_forward_order(net) as order:
        net(torch.zeros(1, 2))
    assert order == ["", "0", "1"]
    assert not net._forward_pre_hooks and not net[0]._forward_pre_hooks


def test_configuration_errors():
    with pytest.raises(ConfigurationError, match="LayerSelection, a module name"):
        ICSDrift(layers=[1, 2])
    with pytest.raises(ConfigurationError, match="every_n_steps"):
        ICSDrift(every_n_steps=0)
    with pytest.raises(ConfigurationError, match="loss_fn"):
        ICSDrift(loss_fn="mse")
    with pytest.raises(SelectionError, match="not modules"):
        run_fit(mlp(), "sgd", 0.1, steps=1, callbacks=[ICSDrift(layers="net.99")])
    with pytest.raises(SelectionError, match="no trainable parameter"):
        run_fit(mlp(), "sgd", 0.1, steps=1, callbacks=[ICSDrift(layers=["net.3"])])
    with pytest.raises(ConfigurationError, match="accumulate_grad_batches"):
        run_fit(mlp(), "sgd", 0.1, steps=1, callbacks=[ICSDrift()], accumulate_grad_batches=2)

    class TwoOptimizers(Classifier):
        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[1].parameters(), lr=0.1),
                torch.optim.SGD(self.net[5].parameters(), lr=0.1),
            ]

        def training_step(self, batch, batch_idx):  # manual, as Lightning 2 requires
            return None

    model = TwoOptimizers(mlp())
    model.automatic_optimization = False
    with pytest.raises(ConfigurationError, match="automatic optimization"):
        cpu_trainer(max_steps=1, callbacks=[ICSDrift()]).fit(model)


def test_selection_state_and_no_leak(tmp_path):
    ics = ICSDrift(layers=LayerSelection(types=(nn.Linear,), include="net.[57]"), every_n_steps=2)
    model, _ = run_fit(mlp(), "sgd", 0.1, steps=4, callbacks=[ics])
    assert [n for n, _ in ics.layers] == ["net.5", "net.7"]
    assert ics.probes_run == 2 and ics.last_step == 2
    assert set(ics.last_metrics) == {f"ics/net.{i}/{m}" for i in (5, 7) for m in ("l2", "cosine")}
    other = ICSDrift(every_n_steps=3)
    other.load_state_dict(ics.state_dict())
    assert other.probes_run == 2 and other.state_key != ics.state_key
    other.load_state_dict({})  # an older checkpoint without the fields
    assert other.probes_run == 0
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert "log" not in model.__dict__


def test_a_skipped_step_is_not_probed():
    class SkipOdd(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return None if batch_idx % 2 else loss

    torch.manual_seed(0)
    ics = ICSDrift(layers=["net.5"])
    cpu_trainer(max_steps=4, limit_train_batches=4, callbacks=[ics]).fit(SkipOdd(mlp()))
    assert ics.probes_run == 2  # batches 0 and 2; replaying 1 and 3 would raise ReplayError


# ---------------------------------------------------------------- DDP


class _Interleaved(Classifier):
    """Rank r of w gets samples r, r + w, ...: the ranks' batches together are the single batch."""

    def train_dataloader(self):
        from torch.utils.data import DataLoader, DistributedSampler

        from tests.helpers import random_images

        ds = random_images(self.n, seed=self.data_seed)
        world = self.trainer.world_size
        sampler = DistributedSampler(ds, num_replicas=world, rank=self.global_rank, shuffle=False)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)


def _ddp_model(batch_size):
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 8 * 8, 10),
        nn.Tanh(),
        nn.Linear(10, 6),
        nn.Tanh(),
        nn.Linear(6, 4),
    )
    return _Interleaved(net, lr=0.5, optimizer="sgd", momentum=0.5, n=32, batch_size=batch_size)


def _csv_ics(path) -> dict[tuple[int, str], float]:
    import csv

    out = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k.startswith("ics/") and v != "":
                    out[(int(row["step"]), k)] = float(v)
    return out


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_equals_single_process_on_the_concatenated_batch(tmp_path):
    layers = ["net.1", "net.3", "net.5"]
    for name, kw, bs in (("single", {}, 16), ("ddp", dict(strategy="ddp_spawn", devices=2), 8)):
        trainer = cpu_trainer(
            max_steps=2,
            precision="64-true",
            log_every_n_steps=1,
            logger=CSVLogger(tmp_path, name=name, version=0),
            callbacks=[ICSDrift(layers=layers, relative=True)],
            use_distributed_sampler=False,
            **kw,
        )
        trainer.fit(_ddp_model(bs))
    single = _csv_ics(tmp_path / "single" / "version_0" / "metrics.csv")
    ddp = _csv_ics(tmp_path / "ddp" / "version_0" / "metrics.csv")
    assert set(single) == set(ddp) and len(single) == 2 * 3 * 3
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert single[(1, "ics/net.5/l2")] > 1e-3
