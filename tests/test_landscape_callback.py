"""LossLandscape in a Trainer: logged values vs brute force, no trace left, bad settings, DDP."""

from __future__ import annotations

import copy
import math
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_norm.callbacks.loss_landscape import LossLandscape
from lightning_norm.errors import ConfigurationError
from tests.helpers import Classifier, MemoryLogger, cpu_trainer, small_convnet


class Recorder(L.Callback):
    """Records, per step, the batch, the RNG state before the forward, w, g and the lr."""

    def __init__(self):
        self.steps: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps[trainer.global_step] = {
            "batch": [t.clone() for t in batch],
            "rng": torch.get_rng_state(),
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        rec = self.steps[trainer.global_step]
        rec["w"] = [p.detach().clone() for p in pl_module.parameters()]
        rec["g"] = [p.grad.detach().clone() for p in pl_module.parameters()]
        rec["lr"] = optimizer.param_groups[0]["lr"]


def mlp_bn(classes=4, bn=True):
    """Pool the 3x8x8 images to 3x2x2, then linear -> BN -> tanh -> linear (118 parameters)."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 6),
        nn.BatchNorm1d(6) if bn else nn.Identity(),
        nn.Tanh(),
        nn.Linear(6, classes),
    )


def brute(net, x, y, rng, flat):
    """Loss and flat gradient of a copy of ``net`` at flat parameters, RNG replayed by hand."""
    m = copy.deepcopy(net).train()
    with torch.no_grad():
        offset = 0
        for p in m.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    with torch.random.fork_rng():
        torch.set_rng_state(rng)
        loss = nn.functional.cross_entropy(m(x), y)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    return loss.item(), torch.cat([g.reshape(-1) for g in grads])


def brute_hessian(net, x, y, rng, flat):
    def f(v):
        m = copy.deepcopy(net).train()
        names = [n for n, _ in m.named_parameters()]
        params, offset = {}, 0
        for n, p in m.named_parameters():
            params[n] = v[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        with torch.random.fork_rng():
            torch.set_rng_state(rng)
            out = torch.func.functional_call(m, params, (x,))
        assert names
        return nn.functional.cross_entropy(out, y)

    return torch.autograd.functional.hessian(f, flat, vectorize=True)


def norm(v):
    return math.sqrt(sum(t * t for t in v.tolist()))


def rel_close(a, b, tol=1e-6):
    return abs(float(a) - float(b)) <= tol * max(abs(float(b)), 1e-12)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_logged_values_match_brute_force(kind):
    L.seed_everything(0)
    net = mlp_bn() if kind == "mlp" else small_convnet(width=4)
    model = Classifier(net, lr=0.2, momentum=0.9, batch_size=16, n=32)
    logger, recorder = MemoryLogger(), Recorder()
    # The Hessian check runs on the MLP only: power iteration on the conv net's close top
    # eigenvalues needs hundreds of products, too slow for the suite (the core test covers it).
    cb = LossLandscape(
        every_n_steps=2,
        hessian=kind == "mlp",
        hessian_iters=500,
        hessian_tol=1e-12,
        slice_at_end=False,
        seed=3,
    )
    trainer = cpu_trainer(max_steps=3, logger=logger, callbacks=[recorder, cb], precision="64-true")
    trainer.fit(model)
    logged = logger.by_step("landscape/")
    assert sorted(logged) == [0, 2]
    for step, metrics in logged.items():
        rec = recorder.steps[step]
        x, y = rec["batch"]
        w = torch.cat([t.reshape(-1) for t in rec["w"]])
        g = torch.cat([t.reshape(-1) for t in rec["g"]])
        # The step's gradient is the one the replay computes at w.
        _, g0 = brute(model.net, x, y, rec["rng"], w)
        assert torch.allclose(g0, g, rtol=1e-9, atol=1e-12)
        etas = [rec["lr"] * m for m in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)]
        losses, diffs, betas = [], [], []
        for eta in etas:
            loss, g_eta = brute(model.net, x, y, rec["rng"], w - eta * g)
            losses.append(loss)
            diffs.append(norm(g - g_eta))
            betas.append(norm(g - g_eta) / (eta * norm(g)))
        prefix = "landscape/total/"
        for i, (eta, loss) in enumerate(zip(etas, losses, strict=True)):
            assert rel_close(metrics[f"{prefix}curve_eta_{i}"], eta)
            assert rel_close(metrics[f"{prefix}curve_loss_{i}"], loss)
        assert rel_close(metrics[prefix + "loss_min"], min(losses))
        assert rel_close(metrics[prefix + "loss_max"], max(losses))
        assert rel_close(metrics[prefix + "loss_range"], max(losses) - min(losses))
        assert rel_close(metrics[prefix + "grad_pred_max"], max(diffs))
        assert rel_close(metrics[prefix + "grad_pred_mean"], sum(diffs) / len(diffs))
        assert rel_close(metrics[prefix + "beta_eff"], max(betas))
        assert metrics[prefix + "nonfinite"] == 0
        if kind == "mlp":
            eig = torch.linalg.eigvalsh(brute_hessian(model.net, x, y, rec["rng"], w))
            top = eig[eig.abs().argmax()].item()
            assert rel_close(metrics[prefix + "hessian_top_eig"], top)
        else:
            assert prefix + "hessian_top_eig" not in metrics


def fit_state(with_callback: bool, tmp_path):
    L.seed_everything(1)
    model = Classifier(small_convnet(width=4), lr=0.1, momentum=0.9, batch_size=8, n=32)
    logger = MemoryLogger()
    callbacks = []
    if with_callback:
        callbacks.append(
            LossLandscape(
                every_n_steps=1,
                num_points=3,
                hessian=True,
                hessian_iters=3,
                hessian_trace_samples=2,
                slice_steps=[1],
                slice_2d=True,
                slice_points=3,
                slice_points_2d=2,
                save_dir=str(tmp_path / "slices"),
            )
        )
    else:
        logger_only = MemoryLogger()
        logger = logger_only
    trainer = cpu_trainer(max_steps=5, logger=logger, callbacks=callbacks, log_every_n_steps=1)
    trainer.fit(model)
    opt = trainer.optimizers[0]
    train_logs = [(s, m) for s, m in logger.rows if "train_loss" in m]
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "momentum": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        "rng": torch.get_rng_state(),
        "train_logs": train_logs,
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "landscape": logger.by_step("landscape/"),
    }


def test_fit_is_bit_identical_with_and_without_callback(tmp_path):
    a = fit_state(True, tmp_path)
    b = fit_state(False, tmp_path)
    assert len(a["landscape"]) == 5  # it did probe every step
    assert "landscape/total/hessian_trace" in a["landscape"][0]
    assert "landscape/total/hessian_top_eig" in a["landscape"][0]
    for k in b["state"]:  # parameters and BN running stats / num_batches_tracked
        assert torch.equal(a["state"][k], b["state"][k]), k
    for x, y in zip(a["momentum"], b["momentum"], strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a["rng"], b["rng"])
    assert a["train_logs"] == b["train_logs"]
    assert a["callback_metrics"] == b["callback_metrics"]
    files = sorted(os.listdir(tmp_path / "slices"))
    assert files == ["slice_step0000001.pt", "slice_step0000005.pt"]  # slice_steps + fit end
    data = torch.load(tmp_path / "slices" / files[0])
    assert data["losses_1d"].shape == (3,) and data["losses_2d"].shape == (2, 2)


def test_slices_match_brute_force_and_reach_tensorboard(tmp_path):
    L.seed_everything(2)
    model = Classifier(mlp_bn(), lr=0.1, batch_size=16, n=32)
    recorder = Recorder()
    cb = LossLandscape(every_n_steps=1000, hessian=False, slice_points=5, seed=4)
    trainer = cpu_trainer(
        max_steps=2,
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        callbacks=[recorder, cb],
        precision="64-true",
    )
    trainer.fit(model)
    data = cb.last_slice
    assert data is not None and data["step"] == 2 and data["batch_step"] == 0
    rec = recorder.steps[0]  # the last probed step's batch, with the final parameters
    x, y = rec["batch"]
    # The direction, drawn plainly: Gaussian per parameter from the callback's seeded stream,
    # each row of a matrix rescaled to the row's norm, vectors (biases, BN affines) zero.
    gen = torch.Generator().manual_seed(4 * 1_000_003 + 2)
    w_parts, d_parts = [], []
    for p in model.parameters():
        d = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if p.ndim <= 1:
            d = torch.zeros_like(d)
        else:
            for i in range(p.shape[0]):
                d[i] *= norm(p[i].detach().reshape(-1)) / norm(d[i].reshape(-1))
        w_parts.append(p.detach().reshape(-1))
        d_parts.append(d.reshape(-1))
    w, d = torch.cat(w_parts), torch.cat(d_parts)
    for a, loss in zip(data["alphas"].tolist(), data["losses_1d"].tolist(), strict=True):
        assert rel_close(loss, brute(model.net, x, y, rec["rng"], w + a * d)[0])
    assert os.path.exists(os.path.join(trainer.log_dir, "landscape", "slice_step0000002.pt"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.log_dir).Reload()
    tags = acc.Tags()
    assert "landscape/total/slice_1d" in tags["images"]
    assert "landscape/total/curve_loss_7" in tags["scalars"]
    assert [e.step for e in acc.Scalars("landscape/total/beta_eff")] == [0]


def test_diverging_probe_is_counted_and_training_goes_on():
    L.seed_everything(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 8), nn.ReLU(), nn.Linear(8, 4))
    model = Classifier(net, lr=0.1, batch_size=16, n=32)
    logger = MemoryLogger()
    cb = LossLandscape(
        every_n_steps=1,
        eta_range=(1e-3, 1e36),
        num_points=4,
        spacing="log",
        relative=False,
        hessian=False,
        slice_at_end=False,
    )
    trainer = cpu_trainer(max_steps=2, logger=logger, callbacks=[cb])
    trainer.fit(model)
    assert trainer.global_step == 2
    m = logger.by_step("landscape/")[0]
    assert 1 <= m["landscape/total/nonfinite"] < 4
    assert math.isfinite(m["landscape/total/loss_min"])
    assert not math.isfinite(m["landscape/total/curve_loss_3"])


def test_bad_settings_fail_early(tmp_path):
    with pytest.raises(ConfigurationError, match="low <= high"):
        LossLandscape(eta_range=(4.0, 0.5))
    with pytest.raises(ConfigurationError, match="hessian_iters"):
        LossLandscape(hessian_iters=0)
    with pytest.raises(ConfigurationError, match="slice_steps"):
        LossLandscape(slice_steps=[-1])
    with pytest.raises(ConfigurationError, match="one_d"):
        LossLandscape(one_d="copy")
    with pytest.raises(ConfigurationError, match="every_n_steps"):
        LossLandscape(every_n_steps=0)
    model = Classifier(small_convnet(width=4), n=16)
    with pytest.warns(UserWarning, match="no logger"):
        cpu_trainer(callbacks=[LossLandscape()], max_steps=1, default_root_dir=tmp_path).fit(model)
    with pytest.raises(ConfigurationError, match="accumulate_grad_batches"):
        cpu_trainer(
            callbacks=[LossLandscape()], logger=MemoryLogger(), accumulate_grad_batches=2
        ).fit(model)


def test_state_key_and_state_dict():
    a, b = LossLandscape(num_points=4), LossLandscape(num_points=8)
    assert a.state_key != b.state_key
    a.load_state_dict({"probes": 3})
    assert a.state_dict() == {"probes": 3, "slices": 0}


# -- DDP ----------------------------------------------------------------------------------------


class Dump(L.Callback):
    def __init__(self, folder):
        self.folder = folder
        self.batch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = [t.clone() for t in batch]

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, LossLandscape))
        values = {k: float(v) for k, v in cb.last_metrics.items()}
        values["batch"] = self.batch
        torch.save(values, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_values_describe_the_global_batch(tmp_path):
    L.seed_everything(0)
    net = mlp_bn(bn=False)
    model = Classifier(net, lr=0.3, batch_size=8, n=32)
    init = [p.detach().clone().double() for p in model.parameters()]
    cb = LossLandscape(
        every_n_steps=1000, hessian=True, hessian_iters=500, hessian_tol=1e-12, slice_at_end=False
    )
    trainer = cpu_trainer(
        max_steps=1,
        strategy="ddp_spawn",
        devices=2,
        logger=MemoryLogger(),
        callbacks=[cb, Dump(str(tmp_path))],
        precision="64-true",
    )
    trainer.fit(model)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    b0, b1 = r0.pop("batch"), r1.pop("batch")
    assert r0 == r1  # identical on every rank
    # The global batch of step 0 is the two ranks' batches together (8 samples each); with no BN
    # the mean of the two ranks' mean losses is the mean loss over those 16 samples.
    x = torch.cat([b0[0], b1[0]]).double()
    y = torch.cat([b0[1], b1[1]])
    assert x.shape[0] == 16
    ref = copy.deepcopy(net).double()
    with torch.no_grad():
        for p, v in zip(ref.parameters(), init, strict=True):
            p.copy_(v)
    rng = torch.get_rng_state()
    w = torch.cat([t.reshape(-1) for t in init])
    _, g = brute(ref, x, y, rng, w)
    losses, diffs = [], []
    for i in range(8):
        eta = 0.3 * (0.5 + 0.5 * i)
        loss, g_eta = brute(ref, x, y, rng, w - eta * g)
        assert rel_close(r0[f"landscape/total/curve_loss_{i}"], loss)
        losses.append(loss)
        diffs.append(norm(g - g_eta) / (eta * norm(g)))
    assert rel_close(r0["landscape/total/loss_range"], max(losses) - min(losses))
    assert rel_close(r0["landscape/total/beta_eff"], max(diffs))
    eig = torch.linalg.eigvalsh(brute_hessian(ref, x, y, rng, w))
    assert rel_close(r0["landscape/total/hessian_top_eig"], eig[eig.abs().argmax()].item())


class TwoGroups(Classifier):
    def configure_optimizers(self):
        first = list(self.net[2].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD([{"params": first, "lr": 0.2}, {"params": rest, "lr": 0.05}])


def test_parameter_groups_move_by_their_own_lr():
    L.seed_everything(5)
    model = TwoGroups(mlp_bn(), batch_size=16, n=32)
    logger, recorder = MemoryLogger(), Recorder()
    cb = LossLandscape(every_n_steps=1000, num_points=2, eta_range=(1.0, 3.0), slice_at_end=False)
    trainer = cpu_trainer(max_steps=1, logger=logger, callbacks=[recorder, cb], precision="64-true")
    trainer.fit(model)
    metrics = logger.by_step("landscape/")[0]
    rec = recorder.steps[0]
    x, y = rec["batch"]
    first = {id(p) for p in model.net[2].parameters()}
    # Per-parameter learning rate, in model.parameters() order: 0.2 for net.2, 0.05 elsewhere.
    lrs = torch.cat(
        [torch.full((p.numel(),), 0.2 if id(p) in first else 0.05) for p in model.parameters()]
    ).double()
    w = torch.cat([t.reshape(-1) for t in rec["w"]])
    g = torch.cat([t.reshape(-1) for t in rec["g"]])
    betas = []
    for i, m in enumerate((1.0, 3.0)):
        step = m * lrs * g  # the SGD step of each group, scaled by the grid multiplier
        loss, g_eta = brute(model.net, x, y, rec["rng"], w - step)
        assert rel_close(metrics[f"landscape/total/curve_eta_{i}"], m * 0.2)  # first group's lr
        assert rel_close(metrics[f"landscape/total/curve_loss_{i}"], loss)
        betas.append(norm(g - g_eta) / norm(step))
    assert rel_close(metrics["landscape/total/beta_eff"], max(betas))


def test_bf16_autocast_probe_runs_and_leaves_no_trace(tmp_path):
    def fit(callbacks):
        L.seed_everything(0)
        model = Classifier(small_convnet(width=4), lr=0.1, momentum=0.9, batch_size=8, n=32)
        logger = MemoryLogger()
        trainer = cpu_trainer(
            max_steps=3, logger=logger, callbacks=callbacks, precision="bf16-mixed"
        )
        trainer.fit(model)
        return model.state_dict(), logger.by_step("landscape/")

    cb = LossLandscape(every_n_steps=1, hessian=True, hessian_iters=3, save_dir=str(tmp_path / "s"))
    with_cb, logged = fit([cb])
    without, _ = fit([])
    for k in without:
        assert torch.equal(with_cb[k], without[k]), k
    assert sorted(logged) == [0, 1, 2]
    assert all(math.isfinite(v) for m in logged.values() for v in m.values())
