"""Every callback in one Trainer, used as a demanding user would: DDP, resume, reuse, bf16."""

from __future__ import annotations

import math
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_norm import swap_norms
from lightning_norm.callbacks import (
    ActivationMoments,
    GradientNorms,
    ICSDrift,
    LossLandscape,
    NormSurgery,
)
from lightning_norm.callbacks._base import MonitorCallback
from lightning_norm.errors import ConfigurationError
from lightning_norm.layers import LpBatchNorm
from lightning_norm.plugins import NormSync
from lightning_norm.probes.replay import is_replaying
from tests.helpers import Classifier, MemoryLogger, cpu_trainer, random_images, small_convnet

PREFIXES = (
    "activation/",
    "grad_norm/",
    "weight_norm/",
    "update_ratio/",
    "dist_from_init/",
    "ics/",
    "landscape/",
)


def all_callbacks() -> list[Callback]:
    return [
        NormSurgery("lp1"),
        ActivationMoments(num_units=2, quantile_samples=64),
        GradientNorms(),
        ICSDrift(every_n_steps=2),
        LossLandscape(every_n_steps=2, num_points=3, slice_at_end=False),
    ]


def no_dropout_net() -> nn.Sequential:
    """The helpers' convnet without dropout: Lightning does not checkpoint the global RNG."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 4),
    )


class FullModule(Classifier):
    """Classifier with a test loop too (validate/test after fit)."""

    def __init__(self, net: nn.Module | None = None, **kwargs):
        torch.manual_seed(0)
        super().__init__(net if net is not None else no_dropout_net(), **kwargs)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def test_dataloader(self):
        return DataLoader(random_images(16, seed=5), batch_size=8)


def metrics(logger: MemoryLogger) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for step, row in logger.rows:
        out.setdefault(step, {}).update({k: v for k, v in row.items() if k.startswith(PREFIXES)})
    return {s: m for s, m in out.items() if m}


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def hooks_left(module: nn.Module) -> list[str]:
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    left = [
        f"{name or '<root>'}.{kind}"
        for name, m in module.named_modules()
        for kind in kinds[:4]
        if getattr(m, kind)
    ]
    left += [f"{n}.grad_hooks" for n, p in module.named_parameters() if p._backward_hooks]
    from torch.nn.modules import module as torch_module

    for g in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        if getattr(torch_module, g):
            left.append(g)
    return left


# -- 1. DDP ------------------------------------------------------------------------------------
class Dump(Callback):
    """Lets every rank's monitors write to its own MemoryLogger, then saves what each saw."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_start(self, trainer, pl_module):
        for cb in trainer.callbacks:
            if isinstance(cb, MonitorCallback):
                cb.is_global_zero = True  # measure and write on every rank

    def on_train_end(self, trainer, pl_module):
        logger = trainer.loggers[0]
        out = {
            "metrics": metrics(logger),
            "params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "types": [type(m).__name__ for m in pl_module.modules()],
        }
        torch.save(out, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


def _ddp_run(folder, *, max_steps=4, swap_first=True, ckpt_path=None, checkpoint=False):
    """A 2-process ddp_spawn fit with every callback; each rank's :class:`Dump`."""
    L.seed_everything(0)
    module = FullModule(momentum=0.9, n=32, batch_size=16)  # one batch per rank and epoch
    if swap_first:  # as NormSurgery's docs advise under ddp_spawn (it then finds none)
        swap_norms(module, "lp1")
    extra = [ModelCheckpoint(dirpath=folder / "ck", every_n_train_steps=2, save_top_k=-1)]
    trainer = cpu_trainer(
        strategy="ddp_spawn",
        devices=2,
        max_steps=max_steps,
        logger=MemoryLogger(),
        plugins=[NormSync()],
        callbacks=[*all_callbacks(), Dump(str(folder)), *(extra if checkpoint else [])],
        enable_checkpointing=checkpoint,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return torch.load(folder / "rank0.pt"), torch.load(folder / "rank1.pt")


@pytest.mark.ddp
def test_ddp_spawn_with_every_callback_agrees_on_both_ranks(tmp_path):
    r0, r1 = _ddp_run(tmp_path, max_steps=3, swap_first=False)  # NormSurgery swaps in workers
    assert "SyncLpBatchNorm" in r0["types"] and r0["types"] == r1["types"]
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    m0, m1 = r0["metrics"], r1["metrics"]
    assert sorted(m0) == sorted(m1) == [0, 1, 2]
    keys = set().union(*m0.values())
    for prefix in PREFIXES:
        assert any(k.startswith(prefix) for k in keys), prefix
    for step in m0:
        assert m0[step].keys() == m1[step].keys(), step
        for k, v in m0[step].items():
            assert same(v, m1[step][k]), (step, k, v, m1[step][k])


@pytest.mark.ddp
def test_ddp_spawn_resume_with_every_callback_matches_an_uninterrupted_run(tmp_path):
    for d in ("full", "first", "resumed"):
        (tmp_path / d).mkdir()
    full, _ = _ddp_run(tmp_path / "full")
    _ddp_run(tmp_path / "first", checkpoint=True)
    (ckpt,) = (tmp_path / "first" / "ck").glob("*step=2.ckpt")
    r0, r1 = _ddp_run(tmp_path / "resumed", ckpt_path=str(ckpt))
    for k, v in full["params"].items():
        assert torch.equal(v, r0["params"][k]) and torch.equal(v, r1["params"][k]), k
    assert sorted(r0["metrics"]) == [2, 3]
    for step, row in r0["metrics"].items():
        assert row.keys() == full["metrics"][step].keys() == r1["metrics"][step].keys(), step
        for k, v in row.items():
            assert same(v, full["metrics"][step][k]) and same(v, r1["metrics"][step][k]), k


# -- 2. checkpoint and resume ------------------------------------------------------------------
def _run(tmp_path, name, max_steps, ckpt_path=None, checkpoint=False):
    L.seed_everything(0)
    # One batch per epoch: Lightning itself replays a different batch after resuming from a
    # checkpoint taken at an epoch's last batch (it restarts the epoch's iterator), so with
    # several batches per epoch even a run without callbacks would not resume bit-identically.
    module = FullModule(momentum=0.9, n=16, batch_size=16)
    logger = MemoryLogger()
    callbacks = all_callbacks()
    extra = []
    if checkpoint:
        extra.append(ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=4, save_top_k=-1))
    trainer = cpu_trainer(
        max_steps=max_steps,
        logger=logger,
        callbacks=[*callbacks, *extra],
        enable_checkpointing=checkpoint,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, callbacks, metrics(logger)


def test_resume_with_every_callback_matches_an_uninterrupted_run(tmp_path):
    full, full_cbs, full_metrics = _run(tmp_path, "full", 8)
    _run(tmp_path, "first", 8, checkpoint=True)
    (ckpt,) = (tmp_path / "first").glob("*step=4.ckpt")
    resumed, res_cbs, res_metrics = _run(tmp_path, "resumed", 8, ckpt_path=str(ckpt))

    assert isinstance(resumed.net[1], LpBatchNorm)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # callback state: the origin of dist_from_init and the sampled units
    grads_full, grads_res = full_cbs[2], res_cbs[2]
    assert grads_res._init is not None
    for a, b in zip(grads_full._init, grads_res._init, strict=True):
        assert torch.equal(a, b)
    assert full_cbs[1]._units() == res_cbs[1]._units() != {}
    assert res_cbs[3].probes_run == full_cbs[3].probes_run
    assert res_cbs[4]._probes == full_cbs[4]._probes
    # what the resumed run logs (steps 4..7) is what the uninterrupted run logged there
    assert sorted(res_metrics) == [4, 5, 6, 7]
    for step, row in res_metrics.items():
        assert row.keys() == full_metrics[step].keys(), step
        for k, v in row.items():
            assert same(v, full_metrics[step][k]), (step, k, v, full_metrics[step][k])


# -- 3. a second fit / validate / test ---------------------------------------------------------
def test_second_fit_validate_and_test_leave_no_hooks(tmp_path):
    module = FullModule()
    logger = MemoryLogger()
    callbacks = all_callbacks()
    trainer = cpu_trainer(max_steps=2, logger=logger, callbacks=callbacks, limit_val_batches=1)
    trainer.fit(module)
    assert hooks_left(module) == []
    swapped = module.net[1]
    assert isinstance(swapped, LpBatchNorm)

    trainer.validate(module)
    assert hooks_left(module) == []
    trainer.test(module)
    assert hooks_left(module) == []

    # the same Trainer, further (resuming its loop), and a new Trainer with the same callbacks
    trainer.fit_loop.epoch_loop.max_steps = 4
    weights_at_2 = torch.cat([p.detach().flatten() for p in module.parameters()])
    trainer.fit(module)
    assert hooks_left(module) == []
    assert module.net[1] is swapped  # swapped once
    cpu_trainer(max_steps=2, logger=logger, callbacks=callbacks).fit(module)
    assert hooks_left(module) == []
    assert module.net[1] is swapped
    logged = metrics(logger)
    # the continued fit measures from the first fit's initialisation (was: from its own start)
    init = FullModule()
    w = torch.cat([p.detach().flatten() for p in init.parameters()])
    assert logged[2]["dist_from_init/total"] == pytest.approx(
        (weights_at_2 - w).norm().item(), rel=1e-5
    )
    assert {2, 3} <= set(logged)
    assert "activation/net.1/mean" in logged[3] and "grad_norm/total" in logged[3]
    assert "ics/net.0/l2" in logged[2] and "landscape/total/beta_eff" in logged[2]


def test_state_loaded_by_validate_does_not_leak_into_a_later_fit(tmp_path):
    callbacks = all_callbacks()
    first = FullModule()
    trainer = cpu_trainer(max_steps=2, callbacks=callbacks, limit_val_batches=1)
    trainer.fit(first)
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    trainer.validate(first, ckpt_path=tmp_path / "first.ckpt")  # loads the callbacks' state
    torch.manual_seed(1)
    second = Classifier(net=no_dropout_net())  # another initialisation, same shapes
    logger = MemoryLogger()
    cpu_trainer(max_steps=1, callbacks=callbacks, logger=logger).fit(second)
    # a fresh fit measures from its own initialisation, not the validated checkpoint's
    assert metrics(logger)[0]["dist_from_init/total"] == 0.0


def test_refused_setup_and_a_failing_step_leave_no_hooks_and_a_later_fit_works():
    module = FullModule()
    trainer = cpu_trainer(max_steps=2, accumulate_grad_batches=2, callbacks=all_callbacks())
    with pytest.raises(ConfigurationError, match="accumulate_grad_batches=2"):
        trainer.fit(module)  # documented: the probes refuse gradient accumulation
    assert hooks_left(module) == []
    # Was: a GradientAccumulationScheduler turning accumulation on mid-fit got past the check at
    # setup, and the probes silently replayed only the last micro-batch of each step.
    module = FullModule()
    schedule = GradientAccumulationScheduler({1: 2})
    trainer = cpu_trainer(max_steps=6, callbacks=[*all_callbacks(), schedule])
    with pytest.raises(ConfigurationError, match="GradientAccumulationScheduler"):
        trainer.fit(module)
    assert trainer.global_step == 4  # epoch 0 (4 batches) ran; refused as epoch 1 starts
    assert hooks_left(module) == []

    class Failing(FullModule):
        def training_step(self, batch, batch_idx):
            if self.global_step == 1 and not is_replaying():
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = Failing()
    callbacks = all_callbacks()
    with pytest.raises(RuntimeError, match="boom"):
        cpu_trainer(max_steps=3, callbacks=callbacks).fit(module)
    assert hooks_left(module) == [] and not is_replaying()
    logger = MemoryLogger()
    cpu_trainer(max_steps=1, callbacks=callbacks, logger=logger).fit(module)
    assert hooks_left(module) == []
    assert "activation/net.1/mean" in metrics(logger)[0]


# -- 4. bf16-mixed ------------------------------------------------------------------------------
def test_bf16_mixed_with_every_callback(tmp_path, caplog):
    L.seed_everything(0)
    module = FullModule(net=small_convnet())  # with dropout: the replays must redraw its masks
    logger = MemoryLogger()
    cpu_trainer(max_steps=3, precision="bf16-mixed", logger=logger, callbacks=all_callbacks()).fit(
        module
    )
    logged = metrics(logger)
    assert sorted(logged) == [0, 1, 2]
    keys = set().union(*logged.values())
    for prefix in PREFIXES:
        assert any(k.startswith(prefix) for k in keys), prefix
    for step, row in logged.items():
        for k, v in row.items():
            if not k.endswith("cosine") and "delta" not in k:
                assert math.isfinite(v), (step, k, v)
    assert hooks_left(module) == []
    # the probes' replays (under the same autocast) reproduce the real step's loss
    assert "replayed loss" not in caplog.text


def test_64_true_with_every_callback():
    """Was: GradientNorms failed on float64 parameters (a float32 norm of a float64 tensor)."""
    module = FullModule()
    logger = MemoryLogger()
    trainer = cpu_trainer(
        max_steps=2, precision="64-true", logger=logger, callbacks=all_callbacks()
    )
    trainer.fit(module)
    logged = metrics(logger)
    assert sorted(logged) == [0, 1]
    assert module.net[0].weight.dtype == torch.float64
    conv = FullModule().net[0]  # the same initial weights (seeded), in float64 here
    w0 = torch.cat([conv.weight.double().flatten(), conv.bias.double()])
    assert logged[0]["weight_norm/net.0"] == pytest.approx(w0.norm().item(), rel=1e-6)
    assert logged[0]["dist_from_init/net.0"] == 0.0
    assert "ics/net.0/l2" in logged[0] and "landscape/total/beta_eff" in logged[0]
    assert hooks_left(module) == []


def test_bf16_true_with_every_callback_and_a_slice(tmp_path):
    """Was: the landscape slice's figure failed on bfloat16 losses (numpy has no bfloat16)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    module = FullModule()
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    landscape = LossLandscape(
        every_n_steps=2,
        num_points=3,
        slice_steps=(1,),
        slice_points=3,
        slice_2d=True,
        slice_points_2d=3,
    )
    callbacks = [*all_callbacks()[:-1], landscape]
    cpu_trainer(max_steps=2, precision="bf16-true", logger=logger, callbacks=callbacks).fit(module)
    assert module.net[0].weight.dtype == torch.bfloat16
    data = torch.load(tmp_path / "run" / "version_0" / "landscape" / "slice_step0000001.pt")
    assert data["losses_1d"].shape == (3,) and torch.isfinite(data["losses_1d"]).all()
    assert data["losses_2d"].shape == (3, 3)
    assert hooks_left(module) == []
