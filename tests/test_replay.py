"""StepReplay (plain PyTorch) and its Lightning adapter: exact replay, no trace, silent logging."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from torch import nn

from lightning_norm.callbacks._probe import capture_step, check_probe_support, make_replay
from lightning_norm.errors import ConfigurationError
from lightning_norm.probes.replay import (
    ReplayError,
    RngState,
    StepReplay,
    all_reduce_mean,
    preserved_rng,
)
from tests.helpers import Classifier, cpu_trainer, small_convnet


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Dropout(0.3), nn.Linear(7, 3)
    ).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (16,), generator=g
    )


def _loss(x, y):
    return lambda m: nn.functional.cross_entropy(m(x), y)


def test_rng_state_roundtrip():
    state = RngState.capture()
    a = (torch.rand(3), random.random(), np.random.rand())
    state.restore()
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def test_replay_matches_the_real_step_and_leaves_no_trace():
    net, (x, y) = _net(), _data()
    torch.manual_seed(123)
    rng = RngState.capture()
    # the "real step": forward + backward on a copy (dropout draws from the global stream)
    real = copy.deepcopy(net)
    real_loss = nn.functional.cross_entropy(real(x), y)
    real_loss.backward()
    after_real = torch.rand(4)  # the stream position the real step leaves behind

    torch.manual_seed(999)  # the caller's stream at probe time, unrelated to the step's
    expected_next = torch.rand(4)
    torch.manual_seed(999)
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    replay = StepReplay(net, _loss(x, y), rng_state=rng)
    loss, grads = replay.loss_and_grad()
    assert torch.equal(torch.rand(4), expected_next)  # caller's stream untouched
    assert loss.item() == real_loss.item()
    for n, p in real.named_parameters():
        assert torch.equal(grads[n], p.grad), n
    for n, b in net.named_buffers():  # running stats and num_batches_tracked untouched
        assert torch.equal(b, buffers[n]), n
    for n, p in net.named_parameters():
        assert torch.equal(p, params[n]) and p.grad is None, n
    assert not torch.equal(after_real, expected_next)  # the test itself is not vacuous


def test_overridden_parameters_match_brute_force_float64():
    net, (x, y) = _net(), _data()
    rng = RngState.capture()
    g = torch.Generator().manual_seed(5)
    new = {
        n: p.detach() + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)
        for n, p in net.named_parameters()
        if n.startswith("0.")
    }
    # brute force: a separate copy holding the new values, same RNG draws
    other = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if n in new:
                p.copy_(new[n])
    rng.restore()
    ref = nn.functional.cross_entropy(other(x), y)
    ref.backward()
    replay = StepReplay(net, _loss(x, y), rng_state=rng)
    loss, grads = replay.loss_and_grad(new, wrt=["4.weight", "0.bias"])
    assert set(grads) == {"4.weight", "0.bias"}
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grads["4.weight"], other[4].weight.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads["0.bias"], other[0].bias.grad, rtol=1e-12, atol=1e-15)
    assert replay.loss(new).item() == loss.item()  # loss-only path, same draws
    for t in new.values():
        assert not t.requires_grad and t.grad is None


def test_unused_parameter_gets_zero_gradient():
    net = nn.ModuleDict({"a": nn.Linear(2, 1), "b": nn.Linear(2, 1)})
    x = torch.randn(3, 2)
    _, grads = StepReplay(net, lambda m: m["a"](x).sum()).loss_and_grad(wrt=["b.weight"])
    assert torch.equal(grads["b.weight"], torch.zeros(1, 2))


def test_restores_everything_when_the_loss_raises():
    net, (x, _) = _net(), _data()
    buffers = {n: b.clone() for n, b in net.named_buffers()}

    def boom(m):
        m(x)  # updates the (cloned) running stats and draws dropout masks, then fails
        raise RuntimeError("boom")

    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    with pytest.raises(RuntimeError, match="boom"):
        StepReplay(net, boom, rng_state=RngState.capture()).loss()
    assert torch.equal(torch.rand(2), expected)
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n])
    torch.manual_seed(7)
    with pytest.raises(KeyError), preserved_rng():
        torch.rand(5)
        raise KeyError("inside")
    assert torch.equal(torch.rand(2), expected)


def test_bad_input_is_refused():
    net, (x, y) = _net(), _data()
    with pytest.raises(ReplayError, match="Not parameters"):
        StepReplay(net, _loss(x, y)).loss({"nope.weight": torch.zeros(1)})
    with pytest.raises(ReplayError, match="scalar floating-point"):
        StepReplay(net, lambda m: m(x)).loss()
    with pytest.raises(ReplayError, match=r"nn\.Module"):
        StepReplay(object(), _loss(x, y))  # type: ignore[arg-type]


def test_all_reduce_mean_without_process_group_is_identity():
    t = [torch.ones(2), torch.tensor(3.0)]
    out = all_reduce_mean(t)
    assert all(torch.equal(a, b) for a, b in zip(out, t, strict=True))


# ---------------------------------------------------------------- Lightning adapter


class _Recorder(Logger):
    """A logger that keeps every ``log_metrics`` call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[dict, int]] = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))


class _ReplayAtZero(Callback):
    """Replays each step with every parameter at zero: a loss the real step never logs."""

    def __init__(self):
        self.capture = None
        self.real, self.probed, self.replayed = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.capture = capture_step(trainer, batch, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.snapshot = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        replay = make_replay(trainer, pl_module, self.capture)
        zeros = {n: torch.zeros_like(p) for n, p in pl_module.named_parameters()}
        self.replayed.append(replay.loss(self.snapshot).item())  # W^t: the real step's loss
        # last, so an unsilenced self.log would leave this value in the logged metrics
        self.probed.append(replay.loss(zeros).item())
        self.real.append(outputs["loss"].item())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_replay_reproduces_the_step_and_does_not_log(precision):
    """Bit-equal replayed loss; under bf16 autocast only if the precision context is replayed."""
    torch.manual_seed(0)
    model = Classifier(small_convnet(bn=True))  # BN + dropout
    cb, rec = _ReplayAtZero(), _Recorder()
    trainer = cpu_trainer(
        max_steps=3, callbacks=[cb], logger=rec, log_every_n_steps=1, precision=precision
    )
    trainer.fit(model)
    assert cb.replayed == cb.real  # same batch, dropout masks, BN batch statistics
    logged = [m["train_loss"] for m, _ in rec.calls if "train_loss" in m]
    assert logged == pytest.approx(cb.real, rel=1e-6)
    assert all(abs(p - r) > 1e-3 for p, r in zip(cb.probed, cb.real, strict=True))
    assert trainer.callback_metrics["train_loss"].item() == pytest.approx(cb.real[-1], rel=1e-6)
    assert "log" not in model.__dict__ and "log_dict" not in model.__dict__


def test_probe_support_refuses_accumulation_and_manual_optimization():
    model = Classifier()
    trainer = cpu_trainer(accumulate_grad_batches=2)
    trainer.strategy.connect(model)
    with pytest.raises(ConfigurationError, match="accumulate_grad_batches=1"):
        check_probe_support(trainer, model, "Probe")
    model.automatic_optimization = False
    with pytest.raises(ConfigurationError, match="automatic optimization"):
        check_probe_support(cpu_trainer(), model, "Probe")


class _WithMetric(Classifier):
    """Updates a torchmetrics metric in ``training_step``, as real modules do."""

    def __init__(self):
        super().__init__(small_convnet(bn=False))
        from torchmetrics import MeanMetric

        self.mean_loss = MeanMetric()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.mean_loss(loss.detach())
        self.log("mean_loss", self.mean_loss)
        return loss


class _Probe(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.capture = capture_step(trainer, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = pl_module.mean_loss
        before = (m.mean_value.clone(), m.weight.clone(), m._update_count)
        zeros = {n: torch.zeros_like(p) for n, p in pl_module.named_parameters()}
        make_replay(trainer, pl_module, self.capture).loss(zeros)
        assert torch.equal(m.mean_value, before[0]) and torch.equal(m.weight, before[1])
        assert m._update_count == before[2] and before[2] > 0
        self.checked = getattr(self, "checked", 0) + 1


def test_metric_state_is_restored_after_a_replay():
    torch.manual_seed(0)
    cb, rec = _Probe(), _Recorder()
    cpu_trainer(max_steps=2, callbacks=[cb], logger=rec, log_every_n_steps=1).fit(_WithMetric())
    assert cb.checked == 2
